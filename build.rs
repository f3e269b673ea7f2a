//! Build script: compiles the small C++ shim against libtorch's headers and gives every binary an rpath
//! to libtorch, so `tessera` runs without `LD_LIBRARY_PATH`.
//!
//! `torch-sys` (links = "tch") tells its direct dependents where libtorch's libraries are through
//! `DEP_TCH_LIBTORCH_LIB`; the headers sit beside them in `../include`.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/kernels.cpp");
    println!("cargo:rerun-if-changed=csrc/kernels.h");
    println!("cargo:rerun-if-changed=csrc/piece_table.h");
    println!("cargo:rerun-if-changed=csrc/common.cuh");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");

    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report libtorch's lib directory; run `make setup` first"),
    );
    let root = lib.parent().expect("libtorch lib directory has a parent").to_path_buf();
    let include = root.join("include");

    // The CUDA sources, compiled at run time by NVRTC (csrc/kernels.cpp), go into the shim as C++ strings, each
    // behind csrc/common.cuh (with a #line, so NVRTC's messages name the right file and line).
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let read = |name: &str| {
        let text = std::fs::read_to_string(format!("csrc/{name}")).unwrap_or_else(|e| panic!("csrc/{name}: {e}"));
        assert!(!text.contains(")TESSERA_CU\""), "csrc/{name} contains the raw-string delimiter");
        text
    };
    let common = read("common.cuh");
    let mut header = String::new();
    for (var, name) in [
        ("kCrossEntropySource", "cross_entropy.cu"),
        ("kLayerNormSource", "layer_norm.cu"),
        ("kAdamwSource", "adamw.cu"),
    ] {
        println!("cargo:rerun-if-changed=csrc/{name}");
        let body = read(name);
        header +=
            &format!("static const char {var}[] = R\"TESSERA_CU({common}\n#line 1 \"{name}\"\n{body})TESSERA_CU\";\n");
    }
    std::fs::write(out.join("kernel_sources.h"), header).expect("OUT_DIR is writable");

    cc::Build::new()
        .cpp(true)
        .file("csrc/shim.cpp")
        .file("csrc/kernels.cpp")
        .include(&out)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("tessera_shim");
    println!("cargo:rustc-link-lib=dl");

    // RUNPATH for every binary, test and example of this package. The resolved (canonical) path is used so
    // the binary keeps working when `.venv` is re-linked to the same environment.
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-env=TESSERA_LIBTORCH_LIB={}", lib.display());
}
