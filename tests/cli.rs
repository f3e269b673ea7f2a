//! The `tessera` binary as a user runs it.

use std::process::Command;

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// A small byte-level corpus in `dir/corpus`, prepared by the real binary.
fn byte_corpus(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("corpus");
    std::fs::create_dir(dir.join("in")).unwrap();
    std::fs::write(dir.join("in/a.txt"), "hello tessera ".repeat(200)).unwrap();
    let out = tessera()
        .args(["data", "prepare", "--tokenizer", "byte", "--out"])
        .arg(&data)
        .arg("--input")
        .arg(dir.join("in"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    data
}

#[test]
fn binary_runs_without_ld_library_path() {
    let out = tessera().env_remove("LD_LIBRARY_PATH").arg("presets").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("gpt-125m") && text.contains("gpt-70b"));
}

#[test]
fn asking_for_cuda_on_a_cpu_host_is_a_clear_error() {
    if tessera::device::resolve(tessera::config::DeviceSpec::Cuda(0)).is_ok() {
        return; // a CUDA host: nothing to check here
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = byte_corpus(tmp.path());
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!("device = \"cuda\"\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\n", data.display().to_string()),
    )
    .unwrap();
    let out = tessera().arg("train").arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("CUDA is not available") && err.contains("device = \"cpu\""), "{err}");
}

#[test]
fn a_metrics_address_that_cannot_be_served_and_a_resume_path_that_does_not_exist_are_named_with_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let data = byte_corpus(tmp.path());
    let cfg = tmp.path().join("run.toml");
    let text = format!(
        "run_dir = {:?}\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\n[train]\nsteps = 2\nwarmup_steps = 1\nbatch_size = 2\n",
        tmp.path().join("run").display().to_string(),
        data.display().to_string()
    );
    std::fs::write(&cfg, text).unwrap();
    for bad in ["garbage", "192.0.2.1:80"] {
        let out =
            tessera().args(["train", "--quiet", "--config"]).arg(&cfg).args(["--metrics-addr", bad]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("--metrics-addr {bad}: cannot listen there")), "{err}");
    }
    let missing = tmp.path().join("nope/checkpoints/step-000000001");
    let out =
        tessera().args(["train", "--quiet", "--config"]).arg(&cfg).arg("--resume").arg(&missing).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("{}: does not exist", missing.display())), "{err}");
}

#[test]
fn a_negative_number_given_to_plan_is_named_with_its_flag() {
    for (flag, value, want) in [
        ("--params", "-30e9", "--params must be a positive number"),
        ("--mfu", "-0.1", "--mfu"),
        ("--price-per-gpu-hour", "-2", "--price-per-gpu-hour"),
        ("--gpus", "-1", "--gpus"),
    ] {
        let mut cmd = tessera();
        cmd.args(["plan", flag, value]);
        if flag != "--params" {
            cmd.args(["--params", "1e9"]);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(want) && !err.contains("unexpected argument"), "{flag} {value}: {err}");
    }
}

#[test]
fn a_printing_command_whose_reader_goes_away_ends_quietly_instead_of_panicking() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = tessera()
        .args([
            "bench",
            "--model",
            "tiny",
            "--batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--kernels",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // `| head -0`: the reader is gone before the first line
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", out.status);
}
