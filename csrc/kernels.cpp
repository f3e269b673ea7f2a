// Tessera's own CUDA kernels (csrc/*.cu), compiled at run time with NVRTC and launched through the CUDA driver
// API on libtorch's current stream.
//
// Nothing here needs CUDA headers or links against CUDA: NVRTC (libnvrtc.so.13, shipped beside libtorch by
// PyPI's torch wheel) and the driver (libcuda.so.1) are opened with dlopen on first use, and the few entry
// points are declared below with their C ABI. So the shim builds on a CPU-only machine, and NVRTC can still
// compile the kernels there (it needs no GPU), which is what the CPU tests check.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"
#include "piece_table.h"
#include "kernel_sources.h"  // kCrossEntropySource, kLayerNormSource, kAdamwSource: csrc/*.cu behind common.cuh

namespace tessera_kernels {

constexpr int kThreads = 256;  // threads per block: THREADS in the .cu sources, defined by `compile`

// --- NVRTC ------------------------------------------------------------------------------------------------
using nvrtcProgram = void*;
struct Nvrtc {
    int (*version)(int*, int*);
    int (*create)(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*);
    int (*compile)(nvrtcProgram, int, const char* const*);
    int (*log_size)(nvrtcProgram, size_t*);
    int (*log)(nvrtcProgram, char*);
    int (*cubin_size)(nvrtcProgram, size_t*);
    int (*cubin)(nvrtcProgram, char*);
    int (*destroy)(nvrtcProgram*);
    const char* (*error_string)(int);
};

// The directory holding the shared library that defines `symbol`.
std::string dir_of(const void* symbol) {
    Dl_info info{};
    if (dladdr(symbol, &info) == 0 || info.dli_fname == nullptr) return "";
    std::string path = info.dli_fname;
    auto slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

// NVRTC from the nvidia-* wheel beside libtorch (site-packages/torch/lib -> site-packages/nvidia/cu13/lib),
// else from the loader's search path.
void* open_nvrtc(std::string& tried) {
    std::vector<std::string> paths;
    auto torch = dir_of(reinterpret_cast<void*>(&at::globalContext));
    if (!torch.empty()) paths.push_back(torch + "/../../nvidia/cu13/lib/libnvrtc.so.13");
    paths.push_back("libnvrtc.so.13");
    for (const auto& path : paths) {
        tried += (tried.empty() ? "" : ", ") + path;
        if (void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) return h;
    }
    return nullptr;
}

template <typename F>
void bind(void* lib, F& f, const char* name, const char* from) {
    f = reinterpret_cast<F>(dlsym(lib, name));
    TORCH_CHECK(f != nullptr, from, " has no ", name);
}

const Nvrtc& nvrtc() {
    static Nvrtc api = [] {
        std::string tried;
        void* lib = open_nvrtc(tried);
        TORCH_CHECK(lib != nullptr, "NVRTC (libnvrtc.so.13) was not found (tried ", tried,
                    "); it comes with PyPI's torch wheel as nvidia-cuda-nvrtc");
        Nvrtc a{};
        bind(lib, a.version, "nvrtcVersion", "libnvrtc");
        bind(lib, a.create, "nvrtcCreateProgram", "libnvrtc");
        bind(lib, a.compile, "nvrtcCompileProgram", "libnvrtc");
        bind(lib, a.log_size, "nvrtcGetProgramLogSize", "libnvrtc");
        bind(lib, a.log, "nvrtcGetProgramLog", "libnvrtc");
        bind(lib, a.cubin_size, "nvrtcGetCUBINSize", "libnvrtc");
        bind(lib, a.cubin, "nvrtcGetCUBIN", "libnvrtc");
        bind(lib, a.destroy, "nvrtcDestroyProgram", "libnvrtc");
        bind(lib, a.error_string, "nvrtcGetErrorString", "libnvrtc");
        // NVRTC opens its builtins library by name only, which fails for a wheel's directory that is not on
        // the search path: load the one of its own version from its own directory first.
        int major = 0, minor = 0;
        a.version(&major, &minor);
        auto builtins = dir_of(reinterpret_cast<void*>(a.version)) + "/libnvrtc-builtins.so." +
                        std::to_string(major) + "." + std::to_string(minor);
        dlopen(builtins.c_str(), RTLD_NOW | RTLD_GLOBAL);  // if absent, compiling names the problem
        return a;
    }();
    return api;
}

// Compiles `source` for sm_<major><minor> and returns the cubin.
std::vector<char> compile(const char* source, const char* name, int major, int minor) {
    const auto& n = nvrtc();
    nvrtcProgram prog = nullptr;
    TORCH_CHECK(n.create(&prog, source, name, 0, nullptr, nullptr) == 0, "nvrtcCreateProgram failed");
    struct Destroy {
        const Nvrtc& n;
        nvrtcProgram& p;
        ~Destroy() { n.destroy(&p); }
    } destroy{n, prog};
    auto arch = "--gpu-architecture=sm_" + std::to_string(major) + std::to_string(minor);
    auto threads = "-DTHREADS=" + std::to_string(kThreads);
    const char* opts[] = {arch.c_str(), "--std=c++17", threads.c_str()};
    int rc = n.compile(prog, 3, opts);
    size_t log_size = 0;
    n.log_size(prog, &log_size);
    std::string log(log_size, '\0');
    if (log_size > 0) n.log(prog, log.data());
    TORCH_CHECK(rc == 0, "NVRTC could not compile ", name, " for sm_", major, minor, ": ", n.error_string(rc), "\n",
                log.c_str());
    size_t size = 0;
    TORCH_CHECK(n.cubin_size(prog, &size) == 0 && size > 0, "NVRTC gave no cubin for ", name);
    std::vector<char> cubin(size);
    TORCH_CHECK(n.cubin(prog, cubin.data()) == 0, "nvrtcGetCUBIN failed for ", name);
    return cubin;
}

// --- the CUDA driver --------------------------------------------------------------------------------------
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;
using CUstream = void*;
struct Driver {
    int (*init)(unsigned);
    int (*ctx_get_current)(CUcontext*);
    int (*primary_ctx_retain)(CUcontext*, int);
    int (*ctx_set_current)(CUcontext);
    int (*device_get)(int*, int);
    int (*device_attribute)(int*, int, int);
    int (*module_load_data)(CUmodule*, const void*);
    int (*module_get_function)(CUfunction*, CUmodule, const char*);
    int (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void**,
                  void**);
    int (*error_string)(int, const char**);
};

const Driver& driver() {
    static Driver api = [] {
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
        TORCH_CHECK(lib != nullptr, "cannot load the CUDA driver (libcuda.so.1)");
        Driver d{};
        bind(lib, d.init, "cuInit", "libcuda");
        bind(lib, d.ctx_get_current, "cuCtxGetCurrent", "libcuda");
        bind(lib, d.primary_ctx_retain, "cuDevicePrimaryCtxRetain", "libcuda");
        bind(lib, d.ctx_set_current, "cuCtxSetCurrent", "libcuda");
        bind(lib, d.device_get, "cuDeviceGet", "libcuda");
        bind(lib, d.device_attribute, "cuDeviceGetAttribute", "libcuda");
        bind(lib, d.module_load_data, "cuModuleLoadData", "libcuda");
        bind(lib, d.module_get_function, "cuModuleGetFunction", "libcuda");
        bind(lib, d.launch, "cuLaunchKernel", "libcuda");
        bind(lib, d.error_string, "cuGetErrorString", "libcuda");
        TORCH_CHECK(d.init(0) == 0, "cuInit failed");  // libtorch has done it already; harmless again
        return d;
    }();
    return api;
}

void cu_check(int rc, const char* what) {
    if (rc == 0) return;
    const char* msg = nullptr;
    driver().error_string(rc, &msg);
    TORCH_CHECK(false, what, " failed: ", msg != nullptr ? msg : "CUDA driver error ", rc);
}

// Makes `device`'s primary context (the one libtorch's runtime calls use) current on this thread, if another
// context (or none: backward may run on a thread that has made no CUDA call yet) is.
void make_current(int device) {
    static std::mutex mu;
    static std::map<int, CUcontext> primary;  // retained once per device, for the process's life
    const auto& d = driver();
    CUcontext want = nullptr;
    {
        std::lock_guard<std::mutex> lock(mu);
        auto it = primary.find(device);
        if (it == primary.end()) {
            int dev = 0;
            cu_check(d.device_get(&dev, device), "cuDeviceGet");
            cu_check(d.primary_ctx_retain(&want, dev), "cuDevicePrimaryCtxRetain");
            primary.emplace(device, want);
        } else {
            want = it->second;
        }
    }
    CUcontext ctx = nullptr;
    cu_check(d.ctx_get_current(&ctx), "cuCtxGetCurrent");
    if (ctx != want) cu_check(d.ctx_set_current(want), "cuCtxSetCurrent");
}

// A kernel source, and the functions it defines.
struct Source {
    const char* text;
    const char* name;
    std::vector<const char*> functions;
};

const Source& cross_entropy_source() {
    static const Source s{kCrossEntropySource, "cross_entropy.cu", {"ce_forward", "ce_backward"}};
    return s;
}

const Source& layer_norm_source() {
    static const Source s{kLayerNormSource, "layer_norm.cu", {"add_ln_forward", "add_ln_backward", "add_ln_backward_wb"}};
    return s;
}

const Source& adamw_source() {
    static const Source s{kAdamwSource, "adamw.cu", {"sum_squares", "adamw_update"}};
    return s;
}

// `source`'s functions on `device`, in its order: compiled for the device's architecture and loaded on first
// use, then kept for the process's life.
const std::vector<CUfunction>& functions(const Source& source, int device) {
    static std::mutex mu;
    static std::map<std::pair<int, const char*>, std::vector<CUfunction>> loaded;
    std::lock_guard<std::mutex> lock(mu);
    auto key = std::make_pair(device, source.name);
    auto it = loaded.find(key);
    if (it != loaded.end()) return it->second;
    c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    const auto& d = driver();
    make_current(device);
    int dev = 0, major = 0, minor = 0;
    cu_check(d.device_get(&dev, device), "cuDeviceGet");
    cu_check(d.device_attribute(&major, 75, dev), "cuDeviceGetAttribute(compute capability major)");
    cu_check(d.device_attribute(&minor, 76, dev), "cuDeviceGetAttribute(compute capability minor)");
    auto cubin = compile(source.text, source.name, major, minor);
    CUmodule module = nullptr;
    cu_check(d.module_load_data(&module, cubin.data()), "cuModuleLoadData");
    std::vector<CUfunction> fns;
    for (const char* name : source.functions) {
        CUfunction f = nullptr;
        cu_check(d.module_get_function(&f, module, name), name);
        fns.push_back(f);
    }
    return loaded.emplace(key, std::move(fns)).first->second;
}

// `blocks` blocks of kThreads threads, on libtorch's current stream for `t`'s device.
void launch(CUfunction f, const at::Tensor& t, int64_t blocks, std::vector<void*> args) {
    TORCH_CHECK(blocks <= INT32_MAX, "too many blocks for one launch: ", blocks);
    if (blocks == 0) return;
    c10::DeviceGuard guard(t.device());
    make_current(t.get_device());
    auto stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
    cu_check(driver().launch(f, static_cast<unsigned>(blocks), 1, 1, kThreads, 1, 1, 0, stream.native_handle(),
                             args.data(), nullptr),
             "cuLaunchKernel");
}

// adamw.cu's `AdamwHyper`, laid out the same (natural alignment on both sides); its `Pieces` is piece_table.h's
// `PieceTable`.
constexpr int64_t kChunk = kThreads * 32;  // adamw.cu's CHUNK
struct AdamwHyper {
    float lr, beta1, beta2, weight_decay, eps, step, max_norm;
};
static_assert(sizeof(AdamwHyper) == 28, "AdamwHyper must match adamw.cu");

// `grads` (fp32 or bf16, contiguous, on `device`; `offsets[i]`: where gradient i starts) as launch tables.
std::vector<std::pair<PieceTable, int64_t>> grad_tables(const std::vector<at::Tensor>& grads,
                                                        const std::vector<int64_t>& offsets, const at::Device& device) {
    std::vector<PieceRef> refs;
    for (size_t i = 0; i < grads.size(); i++) {
        const auto& g = grads[i];
        bool bf16 = g.scalar_type() == at::kBFloat16;
        TORCH_CHECK((bf16 || g.scalar_type() == at::kFloat) && g.is_contiguous() && g.device() == device,
                    "the optimizer kernels take contiguous fp32 or bf16 gradients on the parameters' device, not ",
                    g.toString(), " on ", g.device());
        refs.push_back({reinterpret_cast<uint64_t>(g.data_ptr()), offsets[i], g.numel(), bf16});
    }
    return piece_tables(refs, kChunk);
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
    TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kBFloat16 && logits.dim() == 2 &&
                    logits.is_contiguous(),
                "the cross-entropy kernels take contiguous bf16 CUDA logits (N, V), not ", logits.toString(), " ",
                logits.sizes());
    TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == logits.size(0) &&
                    targets.device() == logits.device() && targets.is_contiguous(),
                "the cross-entropy kernels take contiguous int64 targets (N) on the logits' device");
    TORCH_CHECK(logits.size(1) <= INT32_MAX, "vocabulary too large for the kernels: ", logits.size(1));
}

}  // namespace tessera_kernels

// --- declared in kernels.h, for shim.cpp --------------------------------------------------------------------

std::pair<at::Tensor, at::Tensor> tessera_ce_forward_kernel(const at::Tensor& logits, const at::Tensor& targets) {
    using namespace tessera_kernels;
    check_inputs(logits, targets);
    const auto& k = functions(cross_entropy_source(), logits.get_device());
    auto n = logits.size(0);
    int v = static_cast<int>(logits.size(1));
    auto lse = at::empty({n}, logits.options().dtype(at::kFloat));
    auto loss = at::empty({n}, logits.options().dtype(at::kFloat));
    void* a0 = logits.data_ptr();
    void* a1 = targets.data_ptr();
    void* a2 = lse.data_ptr();
    void* a3 = loss.data_ptr();
    launch(k[0], logits, n, {&a0, &a1, &a2, &a3, &v});
    return {lse, loss};
}

at::Tensor tessera_ce_backward_kernel(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                      const at::Tensor& scale) {
    using namespace tessera_kernels;
    check_inputs(logits, targets);
    TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == logits.size(0) && lse.is_contiguous(),
                "the log-sum-exp must be (N) fp32");
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1 && scale.device() == logits.device(),
                "the scale must be one fp32 element on the logits' device");
    const auto& k = functions(cross_entropy_source(), logits.get_device());
    auto grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
    int v = static_cast<int>(logits.size(1));
    void* a0 = logits.data_ptr();
    void* a1 = targets.data_ptr();
    void* a2 = lse.data_ptr();
    void* a3 = scale.data_ptr();
    void* a4 = grad.data_ptr();
    launch(k[1], logits, logits.size(0), {&a0, &a1, &a2, &a3, &a4, &v});
    return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tessera_add_ln_forward_kernel(const at::Tensor& x,
                                                                                         const at::Tensor& y,
                                                                                         const at::Tensor& w,
                                                                                         const at::Tensor& b,
                                                                                         double eps) {
    using namespace tessera_kernels;
    TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) > 0 && x.is_contiguous(),
                "the add + LayerNorm kernel takes a contiguous fp32 CUDA residual (..., C), not ", x.toString(), " ",
                x.sizes());
    TORCH_CHECK(y.scalar_type() == at::kBFloat16 && y.sizes() == x.sizes() && y.device() == x.device() &&
                    y.is_contiguous(),
                "the add + LayerNorm kernel adds a contiguous bf16 tensor of the residual's shape and device, not ",
                y.toString(), " ", y.sizes());
    auto c = x.size(-1);
    for (const auto* p : {&w, &b})
        TORCH_CHECK(p->scalar_type() == at::kFloat && p->dim() == 1 && p->size(0) == c && p->is_contiguous() &&
                        p->device() == x.device(),
                    "the LayerNorm's weight and bias must be contiguous fp32 (C) on the residual's device");
    TORCH_CHECK(c <= INT32_MAX, "too wide for the kernel: ", c);
    const auto& k = functions(layer_norm_source(), x.get_device());
    auto n = x.numel() / c;
    auto s = at::empty_like(x);
    auto h = at::empty_like(y);
    auto mean = at::empty({n}, x.options());
    auto rstd = at::empty({n}, x.options());
    int ci = static_cast<int>(c);
    float e = static_cast<float>(eps);
    void* a[] = {x.data_ptr(), y.data_ptr(), w.data_ptr(), b.data_ptr(), s.data_ptr(), h.data_ptr(),
                 mean.data_ptr(), rstd.data_ptr()};
    launch(k[0], x, n, {&a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7], &ci, &e});
    return {s, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tessera_add_ln_backward_kernel(
    const at::Tensor& dh, const at::Tensor& ds, const at::Tensor& s, const at::Tensor& w, const at::Tensor& mean,
    const at::Tensor& rstd) {
    using namespace tessera_kernels;
    TORCH_CHECK(dh.scalar_type() == at::kBFloat16 && dh.sizes() == s.sizes() && dh.is_contiguous(),
                "the add + LayerNorm backward takes a contiguous bf16 gradient of h");
    TORCH_CHECK(!ds.defined() || (ds.scalar_type() == at::kFloat && ds.sizes() == s.sizes() && ds.is_contiguous()),
                "the add + LayerNorm backward takes a contiguous fp32 gradient of s");
    const auto& k = functions(layer_norm_source(), s.get_device());
    int c = static_cast<int>(s.size(-1));
    auto n = s.numel() / c;
    auto dx = at::empty_like(s);
    auto dy = at::empty_like(dh);
    void* a[] = {dh.data_ptr(), ds.defined() ? ds.data_ptr() : nullptr, s.data_ptr(), w.data_ptr(),
                 mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dy.data_ptr()};
    launch(k[1], s, n, {&a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7], &c});
    // About 1024 blocks in all: enough to fill the GPU, few partial rows for libtorch to add up.
    int tiles = (c + 31) / 32;
    int64_t groups = std::max<int64_t>(1, std::min<int64_t>((1024 + tiles - 1) / tiles, (n + 7) / 8));
    auto dw_part = at::empty({groups, c}, s.options());
    auto db_part = at::empty({groups, c}, s.options());
    int64_t rows = n;
    void* p[] = {dh.data_ptr(), s.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dw_part.data_ptr(),
                 db_part.data_ptr()};
    launch(k[2], s, groups * tiles, {&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &rows, &c, &tiles});
    return {dx, dy, dw_part.sum(0), db_part.sum(0)};
}

at::Tensor tessera_grad_norm_kernel(const std::vector<at::Tensor>& grads) {
    using namespace tessera_kernels;
    TORCH_CHECK(!grads.empty() && grads[0].is_cuda(), "the gradient-norm kernel takes CUDA gradients");
    auto device = grads[0].device();
    std::vector<int64_t> offsets(grads.size(), 0);
    auto tables = grad_tables(grads, offsets, device);
    int64_t total = 0;
    for (const auto& t : tables) total += t.second;
    // fp32 whatever the gradients' dtype (the first may be bf16).
    auto partial = at::zeros({std::max<int64_t>(total, 1)}, grads[0].options().dtype(at::kFloat));
    const auto& k = functions(adamw_source(), grads[0].get_device());
    int64_t first = 0;
    for (auto& [table, blocks] : tables) {
        void* out = partial.data_ptr<float>() + first;
        launch(k[0], partial, blocks, {&table, &out});
        first += blocks;
    }
    // The blocks' sums added in a fixed order, in double: the same norm every run.
    return partial.sum(at::kDouble).sqrt().to(at::kFloat);
}

void tessera_adamw_kernel(const at::Tensor& params, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                          const std::vector<at::Tensor>& grads, const std::vector<int64_t>& offsets, int64_t decay_len,
                          double lr, double beta1, double beta2, double weight_decay, double eps, int64_t step,
                          const at::Tensor& norm, double max_norm, const at::Tensor& shadow) {
    using namespace tessera_kernels;
    TORCH_CHECK(params.is_cuda() && params.scalar_type() == at::kFloat && params.dim() == 1 && params.is_contiguous(),
                "the AdamW kernel updates a contiguous 1-D fp32 CUDA parameter range, not ", params.toString(), " ",
                params.sizes());
    for (const auto* s : {&exp_avg, &exp_avg_sq})
        TORCH_CHECK(s->scalar_type() == at::kFloat && s->sizes() == params.sizes() && s->is_contiguous() &&
                        s->device() == params.device(),
                    "the AdamW kernel's moments must be contiguous fp32 tensors shaped and placed as the parameters");
    TORCH_CHECK(grads.size() == offsets.size(), "one offset per gradient piece");
    int64_t covered = 0;
    for (size_t i = 0; i < grads.size(); i++) {
        TORCH_CHECK(offsets[i] == covered, "the gradient pieces must tile the parameters in order");
        covered += grads[i].numel();
    }
    TORCH_CHECK(covered == params.numel(), "the gradient pieces must cover the parameters");
    bool clip = max_norm > 0;
    TORCH_CHECK(!clip || (norm.defined() && norm.scalar_type() == at::kFloat && norm.numel() == 1 &&
                          norm.device() == params.device()),
                "clipping needs the global norm as one fp32 element on the parameters' device");
    TORCH_CHECK(step >= 1, "the AdamW step number starts at 1");
    TORCH_CHECK(!shadow.defined() || (shadow.scalar_type() == at::kBFloat16 && shadow.dim() == 1 &&
                                      shadow.is_contiguous() && shadow.numel() <= params.numel() &&
                                      shadow.device() == params.device()),
                "the bf16 weight copies must be a contiguous 1-D bf16 tensor on the parameters' device, no longer "
                "than they are");
    // As the fused kernel: its double arguments as floats, the step number as the float it keeps on the device.
    auto f = [](double x) { return static_cast<float>(x); };
    AdamwHyper h{f(lr), f(beta1), f(beta2), f(weight_decay), f(eps), f(static_cast<double>(step)),
                 f(clip ? max_norm : 0.0)};
    const auto& k = functions(adamw_source(), params.get_device());
    void* p = params.data_ptr();
    void* m = exp_avg.data_ptr();
    void* v = exp_avg_sq.data_ptr();
    void* n = clip ? norm.data_ptr() : nullptr;
    void* s16 = shadow.defined() ? shadow.data_ptr() : nullptr;
    int64_t s16_len = shadow.defined() ? shadow.numel() : 0;
    for (auto& [table, blocks] : grad_tables(grads, offsets, params.device()))
        launch(k[1], params, blocks, {&table, &p, &m, &v, &n, &decay_len, &s16, &s16_len, &h});
    // The parameters changed behind libtorch's back: move their version on, as an in-place op would, so that
    // whatever was derived from them (the bf16 copies, when not written here) is known to be stale.
    params.unsafeGetTensorImpl()->bump_version();
}

size_t tessera_kernels_compile_check(int major, int minor, int* version) {
    using namespace tessera_kernels;
    int a = 0, b = 0;
    nvrtc().version(&a, &b);
    *version = a * 10 + b;
    size_t total = 0;
    for (const auto* src : {&cross_entropy_source(), &layer_norm_source(), &adamw_source()})
        total += compile(src->text, src->name, major, minor).size();
    return total;
}
