// The libtorch calls tch 0.24 does not wrap. Each function is a C entry point; no C++ exception crosses the
// boundary: every call is wrapped, reports failure by return value, and copies the exception's message into
// the caller's buffer (`err`, `err_len` bytes) so the Rust side can name the problem.
//
// Tensors cross the boundary as tch's `C_tensor*`, which is torch-sys's `torch::Tensor*` (`at::Tensor*`).
//
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <kineto/ActivityType.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/DeviceAccelerator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <dlfcn.h>

#include "kernels.h"

namespace {

void write_err(char* err, size_t err_len, const char* msg) {
    if (err == nullptr || err_len == 0) return;
    std::strncpy(err, msg, err_len - 1);
    err[err_len - 1] = '\0';
}

// Runs `f`, turning an exception into return value 1 and its message into `err`.
template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
    try {
        f();
        return 0;
    } catch (const std::exception& e) {
        write_err(err, err_len, e.what());
    } catch (...) {
        write_err(err, err_len, "unknown C++ exception");
    }
    return 1;
}

std::vector<at::Tensor> list(at::Tensor** ts, int n) {
    std::vector<at::Tensor> out;
    out.reserve(n);
    for (int i = 0; i < n; i++) out.push_back(*ts[i]);
    return out;
}

// Mean next-token cross-entropy over rows of `logits (N, V)` (any float dtype) with `targets (N)` int64,
// computed in fp32, with a backward that never materialises fp32 logits.
//
// PyTorch's `cross_entropy(logits.float(), t)` keeps fp32 log-probabilities for backward and, in backward,
// writes a dense fp32 gradient, runs log_softmax's backward over it, then casts to the logits' dtype: about
// ten full passes over an (N, V) fp32 tensor. Here forward keeps only the per-row log-sum-exp (N floats),
// and backward is one softmax kernel in the logits' own dtype (fp32 accumulation inside), one scaling pass,
// and a scatter of the N target entries computed in fp32: dL/dz_ij = (softmax(z_i)_j - [j = t_i]) · g / N.
//
// With `kernel` set and bf16 CUDA logits, forward and backward are instead Tessera's NVRTC kernels
// (csrc/cross_entropy.cu): one read of the logits each way and one write of the gradient.
struct CrossEntropy : public torch::autograd::Function<CrossEntropy> {
    static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                              const at::Tensor& targets, bool kernel) {
        kernel = kernel && logits.is_cuda() && logits.scalar_type() == at::kBFloat16;
        ctx->saved_data["kernel"] = kernel;
        if (kernel) {
            auto z = logits.contiguous();
            auto t = targets.contiguous();
            auto [lse, loss] = tessera_ce_forward_kernel(z, t);  // (N), (N) fp32
            ctx->save_for_backward({z, t, lse});
            return loss.mean();
        }
        auto t = targets.unsqueeze(1);                                 // (N, 1)
        auto logp = at::log_softmax(logits.to(at::kFloat), 1);          // (N, V) fp32, freed on return
        auto logp_t = logp.gather(1, t).squeeze(1);                     // (N)
        auto z_t = logits.gather(1, t).squeeze(1).to(at::kFloat);       // (N)
        auto lse = z_t - logp_t;                                        // (N) log-sum-exp of each row
        ctx->save_for_backward({logits, targets, lse});
        return -logp_t.mean();
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grad_out) {
        auto saved = ctx->get_saved_variables();
        const auto& logits = saved[0];
        const auto& targets = saved[1];
        const auto& lse = saved[2];
        auto n = logits.size(0);
        auto scale = grad_out[0].to(at::kFloat) / static_cast<double>(n);  // () fp32
        if (ctx->saved_data["kernel"].toBool()) {
            return {tessera_ce_backward_kernel(logits, targets, lse, scale.reshape({1}).contiguous()), at::Tensor(),
                    at::Tensor()};
        }
        auto t = targets.unsqueeze(1);                                      // (N, 1)
        // The dtype is explicit so that autocast, if a caller left it on, cannot promote the result to fp32.
        auto grad = at::softmax(logits, 1, logits.scalar_type());           // (N, V), logits' dtype
        grad.mul_(scale.to(grad.scalar_type()));
        // The target entries, p_t - 1, in fp32 from the saved log-sum-exp: rounding p_t first would lose
        // the small difference for confident predictions.
        auto z_t = logits.gather(1, t).squeeze(1).to(at::kFloat);
        auto g_t = ((z_t - lse).exp() - 1.0) * scale;                       // (N) fp32
        grad.scatter_(1, t, g_t.unsqueeze(1).to(grad.scalar_type()));
        return {grad, at::Tensor(), at::Tensor()};
    }
};

// `(s, h) = (x + y, LayerNorm(x + y))` through Tessera's kernels (csrc/layer_norm.cu): x the fp32 residual
// stream, y a sublayer's bf16 output, h in bf16 for the next sublayer, all `(..., C)`. Backward hands x the
// fp32 gradient and y the same in bf16, as autograd's add and cast would.
struct AddLayerNorm : public torch::autograd::Function<AddLayerNorm> {
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                  const at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
                                                  double eps) {
        // An output nothing used (the last LayerNorm's s) gets an undefined gradient, not a tensor of zeros.
        ctx->set_materialize_grads(false);
        auto [s, h, mean, rstd] =
            tessera_add_ln_forward_kernel(x.contiguous(), y.contiguous(), w.contiguous(), b.contiguous(), eps);
        ctx->save_for_backward({s, w, mean, rstd});
        return {s, h};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grad_out) {
        auto saved = ctx->get_saved_variables();
        const auto& s = saved[0];
        auto ds = grad_out[0].defined() ? grad_out[0].to(at::kFloat).contiguous() : at::Tensor();
        auto dh = grad_out[1].defined() ? grad_out[1].to(at::kBFloat16).contiguous()
                                        : at::zeros(s.sizes(), s.options().dtype(at::kBFloat16));
        auto [dx, dy, dw, db] = tessera_add_ln_backward_kernel(dh, ds, s, saved[1], saved[2], saved[3]);
        return {dx, dy, dw, db, at::Tensor()};
    }
};

// CUDA autocast's state in one thread: libtorch keeps both the flag and the dtype per thread.
struct AutocastState {
    bool enabled;
    c10::ScalarType dtype;
};

// A CUDA autocast region in bfloat16, as `torch.autocast("cuda", torch.bfloat16)` opens one:
// `autocast_enter` returns the thread's previous state for `autocast_exit`, which drops the cast cache when
// the outermost region ends. The dtype is set by the region itself because it is per thread: autograd's
// worker threads inherit the caller's, but a thread of Tessera's own starts with libtorch's float16.
AutocastState autocast_enter(bool enabled) {
    AutocastState prev{at::autocast::is_autocast_enabled(c10::DeviceType::CUDA),
                       at::autocast::get_autocast_dtype(c10::DeviceType::CUDA)};
    at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, c10::kBFloat16);
    at::autocast::set_autocast_enabled(c10::DeviceType::CUDA, enabled);
    at::autocast::increment_nesting();
    return prev;
}

void autocast_exit(AutocastState prev) {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(c10::DeviceType::CUDA, prev.enabled);
    at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, prev.dtype);
}

// The same region for the scope of a C++ block, left also when the block throws.
struct AutocastRegion {
    AutocastState prev;
    explicit AutocastRegion(bool enabled) : prev(autocast_enter(enabled)) {}
    ~AutocastRegion() { autocast_exit(prev); }
};

// A transformer block's forward, implemented in Rust: `fn(ctx, input, &out, err, err_len)` returns 0 and a
// new heap tensor in `out`, or non-zero with a message in `err`. `release(ctx)` drops the Rust side's hold on
// the block.
using BlockFn = int (*)(void* ctx, at::Tensor* input, at::Tensor** out, char* err, size_t err_len);
using ReleaseFn = void (*)(void* ctx);

at::Tensor run_block(BlockFn fn, void* ctx, const at::Tensor& input) {
    char err[1024] = {0};
    at::Tensor in = input;
    at::Tensor* out = nullptr;
    if (fn(ctx, &in, &out, err, sizeof err) != 0 || out == nullptr) {
        delete out;
        TORCH_CHECK(false, "the recomputed block failed: ", err);
    }
    at::Tensor result = *out;
    delete out;
    return result;
}

// Activation recomputation (`torch.utils.checkpoint`, reentrant form): forward runs the block without
// recording a graph and keeps only its input; backward runs it again with autograd on, in the autocast state
// forward had, and backpropagates through that, which accumulates the block's parameter gradients as usual
// and returns the input's. The Rust block is kept alive by a 1-byte tensor whose deleter releases it, saved
// with the node, so it lives exactly as long as the graph that may recompute it.
struct Recompute : public torch::autograd::Function<Recompute> {
    static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, int64_t fn,
                              int64_t block, int64_t release, bool autocast) {
        auto rel = reinterpret_cast<ReleaseFn>(release);
        auto holder = at::from_blob(reinterpret_cast<void*>(block), {1}, [rel](void* p) { rel(p); },
                                    at::TensorOptions().dtype(at::kByte));
        ctx->save_for_backward({input});
        ctx->saved_data["fn"] = fn;
        ctx->saved_data["holder"] = holder;  // its data pointer is the block
        ctx->saved_data["autocast"] = autocast;
        return run_block(reinterpret_cast<BlockFn>(fn), reinterpret_cast<void*>(block), input);
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grad_out) {
        auto input = ctx->get_saved_variables()[0].detach().requires_grad_(true);
        auto fn = reinterpret_cast<BlockFn>(ctx->saved_data["fn"].toInt());
        auto block = ctx->saved_data["holder"].toTensor().data_ptr();
        at::Tensor out;
        {
            at::AutoGradMode grad_mode(true);
            // Backward may run on another thread (CUDA's); autograd hands it the caller's autocast state, and
            // the region sets the forward's again in any case.
            AutocastRegion autocast(ctx->saved_data["autocast"].toBool());
            out = run_block(fn, block, input);
        }
        torch::autograd::backward({out}, {grad_out[0]});
        return {input.grad(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

}  // namespace

extern "C" {

// Makes CUDA autocast (which tch turns on with `tch::autocast`) use bfloat16 instead of libtorch's default
// float16. Returns 0 on success.
int tessera_set_cuda_autocast_bf16() {
    return guarded(nullptr, 0, [] { at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, c10::kBFloat16); });
}

// The dtype CUDA autocast will use, as c10::ScalarType's integer value (5 = Half, 15 = BFloat16).
int tessera_cuda_autocast_dtype() {
    try {
        return static_cast<int>(at::autocast::get_autocast_dtype(c10::DeviceType::CUDA));
    } catch (...) {
        return -1;
    }
}

// A CUDA autocast region in bfloat16, as `torch.autocast("cuda", torch.bfloat16)` opens one, through the
// current API (tch's `autocast` calls the deprecated `at::autocast::set_enabled`, which prints a deprecation
// warning on every call). Returns the thread's previous state (bit 0 the flag, the rest the dtype), to hand
// back to `tessera_cuda_autocast_exit`, or -1 on failure.
int tessera_cuda_autocast_enter(int enabled) {
    try {
        AutocastState prev = autocast_enter(enabled != 0);
        return (prev.enabled ? 1 : 0) | (static_cast<int>(prev.dtype) << 1);
    } catch (...) {
        return -1;
    }
}

// Leaves the region: the cast cache is dropped when the outermost region ends, and the previous state (as
// `tessera_cuda_autocast_enter` returned it) is restored. Nothing to undo after a failed enter.
int tessera_cuda_autocast_exit(int prev) {
    if (prev < 0) return 0;
    try {
        autocast_exit(AutocastState{(prev & 1) != 0, static_cast<c10::ScalarType>(prev >> 1)});
        return 0;
    } catch (...) {
        return 1;
    }
}

int tessera_cuda_autocast_is_enabled() {
    try {
        return at::autocast::is_autocast_enabled(c10::DeviceType::CUDA) ? 1 : 0;
    } catch (...) {
        return -1;
    }
}

// Makes CUDA device `index` current on this thread (`torch.cuda.set_device`), for a library that works on the
// current device rather than on a tensor's: NCCL makes its communicator there.
int tessera_cuda_set_device(int index, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)
            ->setDevice(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
    });
}

// Lets fp32 matmuls use TF32 tensor cores (`torch.set_float32_matmul_precision("high")` when `on`).
int tessera_set_tf32(int on, char* err, size_t err_len) {
    return guarded(err, err_len, [&] { at::globalContext().setFloat32MatmulPrecision(on ? "high" : "highest"); });
}

// One AdamW update of `n` tensors with libtorch's fused kernel (`_fused_adamw_`, the kernel behind
// `torch.optim.AdamW(fused=True)`, on CPU and CUDA). `step` is a 1-element fp32 tensor on the tensors' device
// holding the update's step number (already incremented); the kernel reads it for bias correction.
//
// `grad_scale` (may be null): a 1-element fp32 tensor on the same device; the kernel divides every gradient
// by it before use (meant for loss-scale unscaling; Tessera passes the inverse of the gradient-clipping
// coefficient, so clipping costs no pass of its own).
int tessera_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                        int n, at::Tensor* step, at::Tensor* grad_scale, double lr, double beta1, double beta2,
                        double weight_decay, double eps, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        std::vector<at::Tensor> steps(n, *step);
        std::optional<at::Tensor> scale;
        if (grad_scale != nullptr) scale = *grad_scale;
        auto ps = list(params, n);
        at::_fused_adamw_(ps, list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {}, steps, lr, beta1, beta2,
                          weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false, scale, std::nullopt);
        // `_fused_adamw_` writes the parameters without moving their version counters on (torch 2.11, as
        // `p._version` shows), unlike an in-place op: do it here, so that what was derived from them (the bf16
        // weight copies) is known to be stale. A view shares its base's counter.
        for (auto& p : ps) p.unsafeGetTensorImpl()->bump_version();
    });
}

// The 2-norm of all `n` tensors taken together, as `torch.nn.utils.clip_grad_norm_` computes it: one
// multi-tensor kernel for the per-tensor norms (`_foreach_norm`), then the norm of those. No host sync.
int tessera_global_norm(at::Tensor** tensors, int n, at::Tensor** out, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        auto norms = at::_foreach_norm(list(tensors, n), 2);
        *out = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2));
    });
}

// The same norm through Tessera's own kernel (csrc/adamw.cu): CUDA fp32 tensors only.
int tessera_grad_norm_kernel(at::Tensor** tensors, int n, at::Tensor** out, char* err, size_t err_len) {
    return guarded(err, err_len, [&] { *out = new at::Tensor(tessera_grad_norm_kernel(list(tensors, n))); });
}

// One AdamW update through Tessera's own kernel (csrc/adamw.cu) of the flat `params` and moments from the `n`
// gradient pieces `grads` (fp32 or bf16; `offsets[i]`: where piece i starts), clipped to `max_norm` by `norm`
// (null when `max_norm <= 0`) as each gradient is read, writing the bf16 copies `shadow` of the first
// parameters too (may be null). `step` is the update's number, counted from 1.
int tessera_adamw_kernel(at::Tensor* params, at::Tensor* exp_avg, at::Tensor* exp_avg_sq, at::Tensor** grads,
                         const int64_t* offsets, int n, int64_t decay_len, double lr, double beta1, double beta2,
                         double weight_decay, double eps, int64_t step, at::Tensor* norm, double max_norm,
                         at::Tensor* shadow, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        tessera_adamw_kernel(*params, *exp_avg, *exp_avg_sq, list(grads, n), std::vector<int64_t>(offsets, offsets + n),
                             decay_len, lr, beta1, beta2, weight_decay, eps, step,
                             norm != nullptr ? *norm : at::Tensor(), max_norm,
                             shadow != nullptr ? *shadow : at::Tensor());
    });
}

// `fn(block, input)` with its activations recomputed in backward instead of kept (see `Recompute`). On
// success `out` holds a new tensor; `release(block)` is called once the graph no longer needs the block
// (also when this call fails after taking it over).
int tessera_recompute(at::Tensor* input, BlockFn fn, void* block, ReleaseFn release, int autocast, at::Tensor** out,
                      char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        if (!at::GradMode::is_enabled()) {  // nothing to recompute for: run it once
            struct Release {
                ReleaseFn f;
                void* p;
                ~Release() { f(p); }
            } r{release, block};
            *out = new at::Tensor(run_block(fn, block, *input));
            return;
        }
        *out = new at::Tensor(Recompute::apply(*input, reinterpret_cast<int64_t>(fn),
                                               reinterpret_cast<int64_t>(block), reinterpret_cast<int64_t>(release),
                                               autocast != 0));
    });
}

// Drops `param`'s accumulated gradient (`param.grad = None`), so that the next backward hands its gradient
// over instead of adding it to a zeroed buffer.
int tessera_clear_grad(at::Tensor* param, char* err, size_t err_len) {
    return guarded(err, err_len, [&] { param->mutable_grad().reset(); });
}

// Adds `from`'s gradient into `into`'s, in `into`'s dtype (or gives `into` a converted copy of it, if it had
// none), then drops `from`'s: a bf16 weight copy's gradient folded into its fp32 weight's between
// micro-batches, so that they add up in fp32 as autocast's casts would have added them.
int tessera_fold_grad(at::Tensor* from, at::Tensor* into, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        at::Tensor& g = from->mutable_grad();
        if (!g.defined()) return;
        TORCH_CHECK(g.sizes() == into->sizes(), "fold_grad: a gradient of shape ", g.sizes(),
                    " does not fit a tensor of shape ", into->sizes());
        at::NoGradGuard no_grad;
        at::Tensor& acc = into->mutable_grad();
        if (acc.defined()) {
            acc.add_(g);
        } else {
            acc = g.to(into->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
        }
        g.reset();
    });
}

// A copy of `t` in pinned (page-locked) host memory, from libtorch's caching host allocator, so that a
// non-blocking copy to the GPU can overlap the host's work (`Tensor.pin_memory()`; tch's wrapper passes the
// deprecated device argument).
int tessera_pin_memory(at::Tensor* t, at::Tensor** out, char* err, size_t err_len) {
    return guarded(err, err_len, [&] { *out = new at::Tensor(t->pin_memory()); });
}

// A post-accumulate-grad hook that calls back into Rust with the parameter's index: autograd runs it right
// after the parameter's gradient for this backward pass is complete.
struct IndexHook : public torch::autograd::PostAccumulateGradHook {
    void (*cb)(void*, int);
    void* ctx;
    int index;
    IndexHook(void (*cb)(void*, int), void* ctx, int index) : cb(cb), ctx(ctx), index(index) {}
    void operator()(const torch::autograd::Variable&) override { cb(ctx, index); }
};

// Calls `cb(ctx, index)` each time backward has finished accumulating `param`'s gradient, until cleared.
// `cb` must not unwind (the Rust side catches panics) and `ctx` must outlive the hook.
int tessera_set_grad_hook(at::Tensor* param, void (*cb)(void*, int), void* ctx, int index, char* err,
                          size_t err_len) {
    return guarded(err, err_len, [&] {
        torch::autograd::impl::set_post_acc_grad_hooks(*param, std::make_unique<IndexHook>(cb, ctx, index));
    });
}

int tessera_clear_grad_hook(at::Tensor* param, char* err, size_t err_len) {
    return guarded(err, err_len, [&] { torch::autograd::impl::set_post_acc_grad_hooks(*param, nullptr); });
}

// The mean cross-entropy of `logits (N, V)` against `targets (N)`, as a new tensor in `*out` with the
// autograd function above attached; `kernel`: Tessera's kernels where the logits are bf16 on CUDA.
int tessera_cross_entropy(at::Tensor* logits, at::Tensor* targets, int kernel, at::Tensor** out, char* err,
                          size_t err_len) {
    return guarded(err, err_len,
                   [&] { *out = new at::Tensor(CrossEntropy::apply(*logits, *targets, kernel != 0)); });
}

// `s = x + y` and `h = LayerNorm(s)` (weight `w`, bias `b`) in one pass each way, through the function
// above: `x (..., C)` fp32 and `y` of its shape in bf16 on CUDA. New tensors in `*s` and `*h`.
int tessera_add_layer_norm(at::Tensor* x, at::Tensor* y, at::Tensor* w, at::Tensor* b, double eps, at::Tensor** s,
                           at::Tensor** h, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        auto out = AddLayerNorm::apply(*x, *y, *w, *b, eps);
        *s = new at::Tensor(out[0]);
        *h = new at::Tensor(out[1]);
    });
}

// Compiles Tessera's CUDA kernels for sm_<major><minor> with NVRTC, which needs no GPU: `cubin_size` gets the
// size of the result and `nvrtc_version` NVRTC's version (major * 10 + minor).
int tessera_kernels_compile(int major, int minor, size_t* cubin_size, int* nvrtc_version, char* err, size_t err_len) {
    return guarded(err, err_len, [&] { *cubin_size = tessera_kernels_compile_check(major, minor, nvrtc_version); });
}

// CUDA memory through libtorch's device-generic accelerator API (`torch.accelerator.*`): no CUDA headers
// are needed, and the calls reach the CUDA caching allocator once libtorch's CUDA backend is loaded (see
// src/device.rs). Without a CUDA device they throw, and the message comes back.
static c10::DeviceType cuda_type() {
    auto t = at::accelerator::getAccelerator(true).value();
    TORCH_CHECK(t == c10::DeviceType::CUDA, "the accelerator is ", t, ", not CUDA");
    return t;
}

// Releases the CUDA caching allocator's unused blocks (`torch.cuda.empty_cache()`).
int tessera_cuda_empty_cache(char* err, size_t err_len) {
    return guarded(err, err_len, [] { at::getDeviceAllocator(cuda_type())->emptyCache(); });
}

// Peak bytes allocated on `device` since the last reset (`torch.cuda.max_memory_allocated`).
int tessera_cuda_peak_allocated(int device, int64_t* out, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        auto stats = at::getDeviceAllocator(cuda_type())->getDeviceStats(static_cast<c10::DeviceIndex>(device));
        *out = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
    });
}

int tessera_cuda_reset_peak(int device, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        at::getDeviceAllocator(cuda_type())->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    });
}

// The device's name (e.g. "NVIDIA H100 80GB HBM3", from the CUDA driver's `cuDeviceGetName`, looked up at
// run time so nothing links against the driver) and its total memory in bytes (from libtorch).
int tessera_cuda_device_info(int device, char* name, size_t name_len, int64_t* total_mem, char* err,
                             size_t err_len) {
    return guarded(err, err_len, [&] {
        auto info = at::getDeviceAllocator(cuda_type())->getMemoryInfo(static_cast<c10::DeviceIndex>(device));
        *total_mem = static_cast<int64_t>(info.second);
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
        TORCH_CHECK(lib != nullptr, "cannot load libcuda.so.1");
        using GetName = int (*)(char*, int, int);
        using Get = int (*)(int*, int);
        auto get = reinterpret_cast<Get>(dlsym(lib, "cuDeviceGet"));
        auto get_name = reinterpret_cast<GetName>(dlsym(lib, "cuDeviceGetName"));
        TORCH_CHECK(get != nullptr && get_name != nullptr, "libcuda.so.1 lacks cuDeviceGet/cuDeviceGetName");
        int dev = 0;
        TORCH_CHECK(get(&dev, device) == 0, "cuDeviceGet(", device, ") failed");
        TORCH_CHECK(get_name(name, static_cast<int>(name_len), dev) == 0, "cuDeviceGetName failed");
    });
}

// Starts libtorch's profiler (Kineto, as `torch.profiler.profile`) on this thread and the autograd threads it
// hands work to: CPU operators, and with `cuda` the GPU's kernels and copies through CUPTI.
int tessera_profile_start(int cuda, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        namespace prof = torch::profiler::impl;
        // Without CUDA, Kineto logs an error for the GPU it looks for and does not need; its own setting, when
        // given, wins.
        if (cuda == 0) setenv("KINETO_LOG_LEVEL", "5", /*overwrite=*/0);
        prof::ProfilerConfig config(prof::ProfilerState::KINETO);
        std::set<prof::ActivityType> activities{prof::ActivityType::CPU};
        if (cuda != 0) activities.insert(prof::ActivityType::CUDA);
        torch::autograd::profiler::prepareProfiler(config, activities);
        torch::autograd::profiler::enableProfiler(config, activities);
    });
}

// Stops the profiler: the Chrome trace (chrome://tracing, Perfetto) goes to `trace`, and to `summary` one line
// per event name, `name<TAB>calls<TAB>total nanoseconds`: the GPU's kernels and copies with `cuda` (they do not
// nest, so the times add up to the GPU's busy time; an error if there are none), else the CPU operators
// (nested ones counted in each).
int tessera_profile_stop(const char* trace, const char* summary, int cuda, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        auto result = torch::autograd::profiler::disableProfiler();
        TORCH_CHECK(result != nullptr, "the profiler was not running");
        std::map<std::string, std::pair<int64_t, uint64_t>> by_name;
        const auto annotation = static_cast<uint8_t>(libkineto::ActivityType::GPU_USER_ANNOTATION);
        for (const auto& e : result->events()) {
            // A GPU-side span of a `record_function` is not a kernel and overlaps the kernels it spans.
            if ((e.deviceType() == c10::DeviceType::CUDA) != (cuda != 0) || e.activityType() == annotation) continue;
            auto name = e.name();
            for (auto& c : name)
                if (c == '\t' || c == '\n' || c == '\r') c = ' ';
            auto& s = by_name[name];
            s.first += 1;
            s.second += e.durationNs();
        }
        TORCH_CHECK(cuda == 0 || !by_name.empty(),
                    "the profiler saw no GPU kernels: CUPTI (libcupti.so.13, beside libtorch) may be missing or "
                    "not permitted to profile (NVreg_RestrictProfilingToAdminUsers)");
        std::ofstream out(summary);
        TORCH_CHECK(out.good(), "cannot write ", summary);
        for (const auto& [name, s] : by_name) out << name << '\t' << s.first << '\t' << s.second << '\n';
        out.close();
        TORCH_CHECK(out.good(), "cannot write ", summary);
        result->save(trace);
    });
}
}
