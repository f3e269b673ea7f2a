//! Safe wrappers over `csrc/shim.cpp`: the libtorch calls tch 0.24 does not wrap.
//!
//! Every entry point catches C++ exceptions on its side and hands their message back, so a failure here is a
//! [`tch::TchError::Torch`] with libtorch's own words, exactly as tch's `f_` functions report (a CUDA
//! out-of-memory included). The CUDA calls go through libtorch's device-generic allocator API, so they work
//! once libtorch's CUDA backend is loaded ([`crate::device::resolve`]) and fail with a message otherwise.

use std::ffi::{c_char, c_int, CStr};
use std::sync::Arc;
use tch::{TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn tessera_cuda_autocast_enter(enabled: c_int) -> c_int;
    fn tessera_cuda_autocast_exit(prev: c_int) -> c_int;
    fn tessera_cuda_autocast_is_enabled() -> c_int;
    fn tessera_set_tf32(on: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn tessera_cuda_set_device(index: c_int, err: *mut c_char, err_len: usize) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn tessera_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        n: c_int,
        step: *mut C_tensor,
        grad_scale: *mut C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_global_norm(
        tensors: *const *mut C_tensor,
        n: c_int,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_clear_grad(param: *mut C_tensor, err: *mut c_char, err_len: usize) -> c_int;
    fn tessera_fold_grad(from: *mut C_tensor, into: *mut C_tensor, err: *mut c_char, err_len: usize) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn tessera_recompute(
        input: *mut C_tensor,
        f: BlockFn,
        block: *mut std::ffi::c_void,
        release: extern "C" fn(*mut std::ffi::c_void),
        autocast: c_int,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_set_grad_hook(
        param: *mut C_tensor,
        cb: extern "C" fn(*mut std::ffi::c_void, c_int),
        ctx: *mut std::ffi::c_void,
        index: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_clear_grad_hook(param: *mut C_tensor, err: *mut c_char, err_len: usize) -> c_int;
    fn tessera_cross_entropy(
        logits: *mut C_tensor,
        targets: *mut C_tensor,
        kernel: c_int,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn tessera_add_layer_norm(
        x: *mut C_tensor,
        y: *mut C_tensor,
        w: *mut C_tensor,
        b: *mut C_tensor,
        eps: f64,
        s: *mut *mut C_tensor,
        h: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_grad_norm_kernel(
        tensors: *const *mut C_tensor,
        n: c_int,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn tessera_adamw_kernel(
        params: *mut C_tensor,
        exp_avg: *mut C_tensor,
        exp_avg_sq: *mut C_tensor,
        grads: *const *mut C_tensor,
        offsets: *const i64,
        n: c_int,
        decay_len: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        step: i64,
        norm: *mut C_tensor,
        max_norm: f64,
        shadow: *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_kernels_compile(
        major: c_int,
        minor: c_int,
        cubin_size: *mut usize,
        nvrtc_version: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_profile_start(cuda: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn tessera_profile_stop(
        trace: *const c_char,
        summary: *const c_char,
        cuda: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_pin_memory(t: *mut C_tensor, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> c_int;
    fn tessera_cuda_empty_cache(err: *mut c_char, err_len: usize) -> c_int;
    fn tessera_cuda_peak_allocated(device: c_int, out: *mut i64, err: *mut c_char, err_len: usize) -> c_int;
    fn tessera_cuda_reset_peak(device: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn tessera_cuda_device_info(
        device: c_int,
        name: *mut c_char,
        name_len: usize,
        total_mem: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Calls a shim function with an error buffer, turning a non-zero return into libtorch's message.
fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), TchError> {
    // On the stack: several calls run every step (clearing gradients, the optimizer).
    let mut err = [0 as c_char; 1024];
    if f(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim always NUL-terminates within the buffer (and the buffer starts zeroed).
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(TchError::Torch(msg))
}

fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// Runs `f` with CUDA autocast `enabled` in bfloat16, as `torch.autocast("cuda", torch.bfloat16)` does:
/// nesting counted, the cast cache dropped when the outermost region ends, the thread's previous state (flag
/// and dtype, both per thread in libtorch) restored, also if `f` unwinds. On a host without CUDA it just runs
/// `f`.
///
/// tch's `autocast` does the same through libtorch's deprecated calls, which print a warning each time.
pub fn cuda_autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if !tch::Cuda::is_available() {
        return f();
    }
    struct Region(c_int);
    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: plain C call; restores the state `tessera_cuda_autocast_enter` returned.
            unsafe { tessera_cuda_autocast_exit(self.0) };
        }
    }
    // SAFETY: plain C call; exceptions are caught on the C++ side.
    let _region = Region(unsafe { tessera_cuda_autocast_enter(enabled as c_int) });
    f()
}

/// Whether CUDA autocast is on in this thread (inside a [`cuda_autocast`] region that enabled it).
pub fn cuda_autocast_enabled() -> bool {
    // SAFETY: plain C call.
    unsafe { tessera_cuda_autocast_is_enabled() == 1 }
}

/// `torch.set_float32_matmul_precision("high")` when `on` (TF32 tensor cores for fp32 matmuls), `"highest"`
/// otherwise. Process-global.
pub fn set_tf32(on: bool) -> Result<(), TchError> {
    // SAFETY: plain values and our error buffer.
    call(|e, n| unsafe { tessera_set_tf32(on as c_int, e, n) })
}

/// Makes CUDA device `index` current on this thread (`torch.cuda.set_device`): NCCL makes its communicator on
/// the current device, not on a tensor's.
///
/// # Errors
/// Without CUDA, or for a device that does not exist.
pub fn cuda_set_device(index: usize) -> Result<(), TchError> {
    // SAFETY: a plain value and our error buffer.
    call(|e, n| unsafe { tessera_cuda_set_device(index as c_int, e, n) })
}

/// Drops `param`'s gradient (`param.grad = None`).
pub fn clear_grad(param: &Tensor) -> Result<(), TchError> {
    // SAFETY: a live tensor for the duration of the call.
    call(|e, n| unsafe { tessera_clear_grad(ptr(param), e, n) })
}

/// Adds `from`'s gradient into `into`'s in `into`'s dtype (or gives `into` a converted copy where it had
/// none), then drops `from`'s; nothing happens if `from` has no gradient. For a bf16 weight copy's gradient
/// and its fp32 weight, between micro-batches.
///
/// # Errors
/// If the shapes differ.
pub fn fold_grad(from: &Tensor, into: &Tensor) -> Result<(), TchError> {
    // SAFETY: live tensors for the duration of the call.
    call(|e, n| unsafe { tessera_fold_grad(ptr(from), ptr(into), e, n) })
}

/// Makes autograd call `cb(ctx, index)` right after each backward pass has finished accumulating `param`'s
/// gradient (a post-accumulate-grad hook), until [`clear_grad_hook`].
///
/// # Safety
/// `ctx` must stay valid, and `cb` callable with it, for as long as the hook is set; `cb` must not unwind.
pub unsafe fn set_grad_hook(
    param: &Tensor,
    cb: extern "C" fn(*mut std::ffi::c_void, c_int),
    ctx: *mut std::ffi::c_void,
    index: usize,
) -> Result<(), TchError> {
    // SAFETY: a live tensor; the caller vouches for `cb` and `ctx`.
    call(|e, n| unsafe { tessera_set_grad_hook(ptr(param), cb, ctx, index as c_int, e, n) })
}

/// Removes the hook [`set_grad_hook`] set.
pub fn clear_grad_hook(param: &Tensor) -> Result<(), TchError> {
    // SAFETY: a live tensor.
    call(|e, n| unsafe { tessera_clear_grad_hook(ptr(param), e, n) })
}

/// The state of one fused AdamW update: tensors updated in place (all fp32, contiguous, one device).
pub struct AdamWTensors<'a> {
    pub params: &'a [Tensor],
    pub grads: &'a [Tensor],
    pub exp_avgs: &'a [Tensor],
    pub exp_avg_sqs: &'a [Tensor],
    /// 1-element fp32 tensor on the same device holding this update's step number (1 for the first).
    pub step: &'a Tensor,
    /// 1-element fp32 tensor on the same device that every gradient is divided by first (the inverse of a
    /// clipping coefficient), if any.
    pub grad_scale: Option<&'a Tensor>,
}

/// libtorch's fused AdamW kernel (`torch.optim.AdamW(fused=True)`) over parallel lists of tensors.
pub fn fused_adamw(
    t: AdamWTensors<'_>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    eps: f64,
) -> Result<(), TchError> {
    let n = t.params.len();
    assert!(
        t.grads.len() == n && t.exp_avgs.len() == n && t.exp_avg_sqs.len() == n,
        "fused_adamw: lists of different lengths"
    );
    let ptrs = |ts: &[Tensor]| ts.iter().map(ptr).collect::<Vec<_>>();
    let (p, g, m, v) = (ptrs(t.params), ptrs(t.grads), ptrs(t.exp_avgs), ptrs(t.exp_avg_sqs));
    // SAFETY: every pointer is a live tensor borrowed for the call; the lists have n entries.
    call(|e, len| unsafe {
        tessera_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n as c_int,
            ptr(t.step),
            t.grad_scale.map_or(std::ptr::null_mut(), ptr),
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
            e,
            len,
        )
    })
}

/// The 2-norm of `tensors` taken together (a 0-d tensor on their device, nothing read back), computed as
/// `torch.nn.utils.clip_grad_norm_` does: per-tensor norms in one multi-tensor kernel, then their norm.
pub fn global_norm<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<Tensor, TchError> {
    let ptrs: Vec<*mut C_tensor> = tensors.into_iter().map(ptr).collect();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensors borrowed for the call; on success the shim stores a new heap tensor in `out`.
    call(|e, n| unsafe { tessera_global_norm(ptrs.as_ptr(), ptrs.len() as c_int, &mut out, e, n) })?;
    // SAFETY: `out` is a tensor the shim allocated for us.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// [`global_norm`] through Tessera's own kernel (`csrc/adamw.cu`): each block's sum of squares, then their
/// sum in double in a fixed order. Contiguous fp32 or bf16 CUDA tensors only; an error elsewhere.
pub fn grad_norm_kernel<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<Tensor, TchError> {
    let ptrs: Vec<*mut C_tensor> = tensors.into_iter().map(ptr).collect();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensors borrowed for the call; on success the shim stores a new heap tensor in `out`.
    call(|e, n| unsafe { tessera_grad_norm_kernel(ptrs.as_ptr(), ptrs.len() as c_int, &mut out, e, n) })?;
    // SAFETY: `out` is a tensor the shim allocated for us.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// One AdamW update through Tessera's own kernel (`csrc/adamw.cu`): `params`, `exp_avg`, `exp_avg_sq` (flat,
/// fp32, contiguous, on one CUDA device) from gradient pieces (fp32 or bf16) that tile them in order,
/// `(offset, gradient)`. Elements before `decay_len` are weight-decayed; `step` counts from 1. With
/// `clip = Some((norm, max_norm))` and `max_norm > 0`, each gradient is divided by
/// `max((norm + 1e-6) / max_norm, 1)` as it is read (the norm stays on the device). The gradients are only
/// read. `shadow`: bf16 copies of the first parameters (1-D, contiguous), written with their new values.
pub struct AdamWKernel<'a> {
    pub params: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub pieces: &'a [(i64, &'a Tensor)],
    pub decay_len: i64,
    pub step: i64,
    pub clip: Option<(&'a Tensor, f64)>,
    pub shadow: Option<&'a Tensor>,
}

/// Runs the update [`AdamWKernel`] describes with these hyper-parameters.
pub fn adamw_kernel(
    k: AdamWKernel<'_>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    eps: f64,
) -> Result<(), TchError> {
    let grads: Vec<*mut C_tensor> = k.pieces.iter().map(|(_, g)| ptr(g)).collect();
    let offsets: Vec<i64> = k.pieces.iter().map(|(o, _)| *o).collect();
    let (norm, max_norm) = match k.clip {
        Some((norm, max_norm)) if max_norm > 0.0 => (ptr(norm), max_norm),
        _ => (std::ptr::null_mut(), 0.0),
    };
    // SAFETY: live tensors borrowed for the call; the two lists have `grads.len()` entries.
    call(|e, n| unsafe {
        tessera_adamw_kernel(
            ptr(k.params),
            ptr(k.exp_avg),
            ptr(k.exp_avg_sq),
            grads.as_ptr(),
            offsets.as_ptr(),
            grads.len() as c_int,
            k.decay_len,
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
            k.step,
            norm,
            max_norm,
            k.shadow.map_or(std::ptr::null_mut(), ptr),
            e,
            n,
        )
    })
}

/// Starts libtorch's profiler (Kineto, as `torch.profiler.profile`): CPU operators, and with `cuda` the GPU's
/// kernels and copies. Stop it with [`profile_stop`].
pub fn profile_start(cuda: bool) -> Result<(), TchError> {
    // SAFETY: a plain value and our error buffer.
    call(|e, n| unsafe { tessera_profile_start(cuda as c_int, e, n) })
}

/// Stops the profiler [`profile_start`] started: the Chrome trace goes to `trace`, and to `summary` one line per
/// event name, `name<TAB>calls<TAB>total nanoseconds`, of the GPU's kernels and copies with `cuda` (which do
/// not nest), else of the CPU operators (nested ones counted in each).
pub fn profile_stop(trace: &std::path::Path, summary: &std::path::Path, cuda: bool) -> Result<(), TchError> {
    let c = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| TchError::Torch(format!("{}: a path with a NUL byte", p.display())))
    };
    let (trace, summary) = (c(trace)?, c(summary)?);
    // SAFETY: NUL-terminated strings alive for the call, and our error buffer.
    call(|e, n| unsafe { tessera_profile_stop(trace.as_ptr(), summary.as_ptr(), cuda as c_int, e, n) })
}

type BlockFn = extern "C" fn(*mut std::ffi::c_void, *mut C_tensor, *mut *mut C_tensor, *mut c_char, usize) -> c_int;

/// `block.forward(x)` with activation recomputation (`torch.utils.checkpoint`): forward keeps only `x`, and
/// backward runs the block again, with autograd and the current autocast state, to backpropagate through it.
/// Memory for the block's activations is traded for a second forward. The graph holds a reference to `block`
/// until it is freed. With gradients off it simply runs the block.
pub fn recompute<B: Recomputable>(block: &Arc<B>, x: &Tensor) -> Result<Tensor, TchError> {
    extern "C" fn run<B: Recomputable>(
        ctx: *mut std::ffi::c_void,
        input: *mut C_tensor,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int {
        // SAFETY: `ctx` is the `Arc<B>` pointer this module handed over, alive until `release` runs;
        // `input` is a live tensor owned by the caller, which we clone (shallowly) rather than take.
        let (block, x) = unsafe { (&*(ctx as *const B), Tensor::clone_from_ptr(input)) };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block.forward(&x)));
        let message = match result {
            Ok(Ok(mut t)) => {
                // SAFETY: the shim takes the heap tensor over and frees it.
                unsafe { *out = t.as_mut_ptr() };
                std::mem::forget(t);
                return 0;
            }
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!(
                "panicked: {}",
                crate::train::step::panic_text(panic.as_ref()).unwrap_or_else(|| "(no message)".into())
            ),
        };
        let bytes = message.as_bytes();
        let n = bytes.len().min(err_len.saturating_sub(1));
        // SAFETY: `err` has room for `err_len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), err as *mut u8, n);
            *err.add(n) = 0;
        }
        1
    }
    extern "C" fn release<B: Recomputable>(ctx: *mut std::ffi::c_void) {
        // SAFETY: the pointer came from `Arc::into_raw` below, and the shim releases it exactly once.
        drop(unsafe { Arc::from_raw(ctx as *const B) });
    }
    let ctx = Arc::into_raw(Arc::clone(block)) as *mut std::ffi::c_void;
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let autocast = cuda_autocast_enabled() as c_int;
    // SAFETY: live tensor; `ctx` stays valid until the shim calls `release` (which it always does, once).
    call(|e, n| unsafe { tessera_recompute(ptr(x), run::<B>, ctx, release::<B>, autocast, &mut out, e, n) })?;
    // SAFETY: a tensor the shim allocated for us.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// A piece of the model whose forward can be recomputed in backward ([`recompute`]). On CUDA, backward (and
/// so the recomputation) runs on libtorch's device thread while the thread that called backward waits; the
/// piece's tensors are only read there.
pub trait Recomputable: Send + 'static {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError>;
}

/// Mean cross-entropy of `logits (N, V)` against `targets (N)` in fp32, with a backward pass that stays in
/// the logits' dtype (see `csrc/shim.cpp`).
///
/// `kernel`: where the logits are bf16 on CUDA, use Tessera's own kernels (`csrc/cross_entropy.cu`, compiled
/// with NVRTC on first use) instead of libtorch's ops; elsewhere the flag changes nothing.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, kernel: bool) -> Result<Tensor, TchError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensors; on success the shim stores a new heap tensor in `out`, which we then own.
    call(|e, n| unsafe { tessera_cross_entropy(ptr(logits), ptr(targets), kernel as c_int, &mut out, e, n) })?;
    // SAFETY: `out` is a tensor allocated by the shim for us (tch frees it on drop).
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `(x + y, LayerNorm(x + y))` with weight `w` and bias `b`, through Tessera's kernels
/// (`csrc/layer_norm.cu`): `x (..., C)` the fp32 residual stream and `y` a sublayer's bf16 output, on CUDA; the
/// sum comes back in fp32 and the normalised values in bf16, with gradients as autograd's add and cast give.
///
/// # Errors
/// Other dtypes or devices (the kernel's message names them), or libtorch's and the CUDA driver's errors.
pub fn add_layer_norm(x: &Tensor, y: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<(Tensor, Tensor), TchError> {
    let (mut s, mut h): (*mut C_tensor, *mut C_tensor) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: live tensors; on success the shim stores two new heap tensors, which we then own.
    call(|e, n| unsafe { tessera_add_layer_norm(ptr(x), ptr(y), ptr(w), ptr(b), eps, &mut s, &mut h, e, n) })?;
    // SAFETY: allocated by the shim for us.
    Ok(unsafe { (Tensor::from_ptr(s), Tensor::from_ptr(h)) })
}

/// What compiling Tessera's CUDA kernels gave ([`compile_kernels`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelBuild {
    pub cubin_bytes: usize,
    /// NVRTC's version, e.g. `(13, 0)`.
    pub nvrtc: (i32, i32),
}

/// Compiles Tessera's CUDA kernels for compute capability `sm` (e.g. `(9, 0)`, an H100) with NVRTC, as the
/// first use on that GPU does. NVRTC needs no GPU, so this runs anywhere PyPI's torch wheel (which ships
/// NVRTC) is installed.
///
/// # Errors
/// NVRTC not found, or the sources do not compile (the compiler's log is in the message).
pub fn compile_kernels(sm: (i32, i32)) -> Result<KernelBuild, TchError> {
    let (mut size, mut version) = (0usize, 0 as c_int);
    // SAFETY: plain values, out-pointers to locals, and our error buffer.
    call(|e, n| unsafe { tessera_kernels_compile(sm.0, sm.1, &mut size, &mut version, e, n) })?;
    Ok(KernelBuild { cubin_bytes: size, nvrtc: (version / 10, version % 10) })
}

/// A copy of `t` in pinned host memory (needs a CUDA host; fails with libtorch's message otherwise).
pub fn pin_memory(t: &Tensor) -> Result<Tensor, TchError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: a live tensor; on success the shim stores a new heap tensor in `out`, which we then own.
    call(|e, n| unsafe { tessera_pin_memory(ptr(t), &mut out, e, n) })?;
    // SAFETY: allocated by the shim for us.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Hands the CUDA caching allocator's unused blocks back to the driver (`torch.cuda.empty_cache()`).
pub fn cuda_empty_cache() -> Result<(), TchError> {
    // SAFETY: our error buffer only.
    call(|e, n| unsafe { tessera_cuda_empty_cache(e, n) })
}

/// Peak bytes allocated on CUDA device `index` since the last [`cuda_reset_peak`].
pub fn cuda_peak_allocated(index: usize) -> Result<u64, TchError> {
    let mut out = 0i64;
    // SAFETY: `out` outlives the call.
    call(|e, n| unsafe { tessera_cuda_peak_allocated(index as c_int, &mut out, e, n) })?;
    Ok(out.max(0) as u64)
}

pub fn cuda_reset_peak(index: usize) -> Result<(), TchError> {
    // SAFETY: our error buffer only.
    call(|e, n| unsafe { tessera_cuda_reset_peak(index as c_int, e, n) })
}

/// The name and memory (bytes) of CUDA device `index`.
pub fn cuda_device_info(index: usize) -> Result<(String, u64), TchError> {
    let mut name = vec![0 as c_char; 256];
    let mut mem = 0i64;
    // SAFETY: buffers outlive the call; the shim NUL-terminates `name`.
    call(|e, n| unsafe { tessera_cuda_device_info(index as c_int, name.as_mut_ptr(), name.len(), &mut mem, e, n) })?;
    // SAFETY: NUL-terminated by the shim (and zeroed before).
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
    Ok((name, mem.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn the_shims_cross_entropy_equals_libtorchs_in_value_and_gradient() {
        let _g = crate::model::params::RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(3);
        let logits = (Tensor::randn([37, 101], (Kind::Float, Device::Cpu)) * 4.0).set_requires_grad(true);
        let targets = Tensor::randint(101, [37], (Kind::Int64, Device::Cpu));
        let ours = cross_entropy(&logits, &targets, false).unwrap();
        ours.backward();
        let g_ours = logits.grad().copy();
        let _ = logits.grad().zero_();
        let reference = logits.cross_entropy_for_logits(&targets);
        reference.backward();
        let g_ref = logits.grad();
        assert!((ours.double_value(&[]) - reference.double_value(&[])).abs() < 1e-6);
        let max_diff = (&g_ours - &g_ref).abs().max().double_value(&[]);
        assert!(max_diff < 1e-7, "gradients differ by {max_diff}");
    }

    #[test]
    fn the_shims_cross_entropy_on_bf16_logits_computes_the_loss_in_fp32_and_returns_a_bf16_gradient() {
        let _g = crate::model::params::RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(4);
        let base = Tensor::randn([64, 300], (Kind::Float, Device::Cpu)) * 3.0;
        let targets = Tensor::randint(300, [64], (Kind::Int64, Device::Cpu));
        let logits = base.to_kind(Kind::BFloat16).set_requires_grad(true);
        let ours = cross_entropy(&logits, &targets, false).unwrap();
        assert_eq!(ours.kind(), Kind::Float);
        ours.backward();
        assert_eq!(logits.grad().kind(), Kind::BFloat16);
        // The reference: the same bf16 values, everything in fp32.
        let exact = logits.detach().to_kind(Kind::Float).set_requires_grad(true);
        let reference = exact.cross_entropy_for_logits(&targets);
        reference.backward();
        assert!((ours.double_value(&[]) - reference.double_value(&[])).abs() < 1e-6);
        // bf16 keeps 8 bits of mantissa: each gradient entry within ~2^-8 of its size (plus a tiny floor).
        let g = logits.grad().to_kind(Kind::Float);
        let err = (&g - exact.grad()).abs() - exact.grad().abs() * (1.0 / 128.0);
        assert!(err.max().double_value(&[]) < 1e-7, "bf16 gradient strays from the fp32 one");
    }

    #[test]
    fn tesseras_kernels_compile_with_nvrtc_for_an_a100_and_an_h100() {
        for sm in [(8, 0), (9, 0)] {
            let build = compile_kernels(sm).unwrap_or_else(|e| panic!("sm_{}{}: {e}", sm.0, sm.1));
            assert!(build.cubin_bytes > 1000, "{build:?}");
            assert_eq!(build.nvrtc.0, 13, "PyPI's torch 2.11 ships NVRTC 13: {build:?}");
        }
        let e = compile_kernels((1, 0)).unwrap_err().to_string();
        assert!(e.contains("NVRTC could not compile cross_entropy.cu for sm_10"), "{e}");
    }

    /// The kernels' own source (cross-entropy, add + LayerNorm, gradient norm and AdamW), run on the CPU with
    /// one thread per CUDA thread (`tests/kernels/emulate.cpp`), against a double-precision reference;
    /// misaligned 16-byte accesses trap (`-fsanitize=alignment`).
    #[test]
    fn tesseras_kernels_match_a_double_precision_reference_on_emulated_cuda_threads() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("emulate");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let built = std::process::Command::new(&cxx)
            .args(["-std=c++20", "-pthread", "-O1", "-Wno-unknown-pragmas"])
            .args(["-fsanitize=alignment", "-fno-sanitize-recover=alignment"])
            .arg("-I")
            .arg(root.join("csrc"))
            .arg(root.join("tests/kernels/emulate.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("{cxx}: {e}"));
        assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
        let ran = std::process::Command::new(&exe).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&ran.stdout), String::from_utf8_lossy(&ran.stderr));
        assert!(ran.status.success() && stdout.contains("every check passed"), "{stdout}{stderr}");
    }

    #[test]
    fn the_add_layer_norm_kernel_refuses_cpu_tensors_by_name() {
        let x = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
        let y = x.to_kind(Kind::BFloat16);
        let (w, b) = (Tensor::ones([8], (Kind::Float, Device::Cpu)), Tensor::zeros([8], (Kind::Float, Device::Cpu)));
        let e = add_layer_norm(&x, &y, &w, &b, 1e-5).unwrap_err().to_string();
        assert!(e.contains("the add + LayerNorm kernel takes a contiguous fp32 CUDA residual"), "{e}");
    }

    #[test]
    fn the_optimizer_kernels_refuse_cpu_tensors_by_name() {
        let opts = (Kind::Float, Device::Cpu);
        let (p, g) = (Tensor::zeros([8], opts), Tensor::ones([8], opts));
        let e = grad_norm_kernel([&g]).unwrap_err().to_string();
        assert!(e.contains("the gradient-norm kernel takes CUDA gradients"), "{e}");
        let (m, v) = (p.zeros_like(), p.zeros_like());
        let pieces = [(0, &g)];
        let k = AdamWKernel {
            params: &p,
            exp_avg: &m,
            exp_avg_sq: &v,
            pieces: &pieces,
            decay_len: 8,
            step: 1,
            clip: None,
            shadow: None,
        };
        let e = adamw_kernel(k, 1e-3, 0.9, 0.95, 0.1, 1e-8).unwrap_err().to_string();
        assert!(e.contains("the AdamW kernel updates a contiguous 1-D fp32 CUDA parameter range"), "{e}");
    }

    #[test]
    fn asking_for_the_cross_entropy_kernel_off_cuda_changes_nothing() {
        let _g = crate::model::params::RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(6);
        for kind in [Kind::Float, Kind::BFloat16] {
            let base = (Tensor::randn([16, 77], (Kind::Float, Device::Cpu)) * 3.0).to_kind(kind);
            let targets = Tensor::randint(77, [16], (Kind::Int64, Device::Cpu));
            let run = |kernel: bool| {
                let logits = base.copy().set_requires_grad(true);
                let loss = cross_entropy(&logits, &targets, kernel).unwrap();
                loss.backward();
                (loss.double_value(&[]), logits.grad())
            };
            let ((l0, g0), (l1, g1)) = (run(false), run(true));
            assert_eq!(l0.to_bits(), l1.to_bits(), "{kind:?}");
            assert!(g0.equal(&g1), "{kind:?}");
        }
    }

    #[test]
    fn fused_adamw_matches_the_reference_update() {
        let _g = crate::model::params::RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        let p0 = Tensor::randn([1000], opts);
        let g = Tensor::randn([1000], opts);
        let (p, m, v) = (p0.copy(), Tensor::zeros([1000], opts), Tensor::zeros([1000], opts));
        let step = Tensor::ones([1], opts);
        let t = AdamWTensors {
            params: &[p.shallow_clone()],
            grads: &[g.shallow_clone()],
            exp_avgs: &[m.shallow_clone()],
            exp_avg_sqs: &[v.shallow_clone()],
            step: &step,
            grad_scale: None,
        };
        fused_adamw(t, 1e-3, 0.9, 0.95, 0.1, 1e-8).unwrap();
        // First Adam step: m = 0.1 g, v = 0.05 g², m̂ = g, v̂ = g², so p = p0 (1 - lr·wd) - lr · g / (|g| + eps).
        let expected = &p0 * (1.0 - 1e-4) - (&g / (g.abs() + 1e-8)) * 1e-3;
        assert!((&p - expected).abs().max().double_value(&[]) < 1e-6);
        assert!((&m - &g * 0.1).abs().max().double_value(&[]) < 1e-7);
    }

    #[test]
    fn an_autocast_region_turns_cuda_autocast_on_in_bf16_and_restores_it_even_without_a_gpu() {
        // Autocast state (flag and dtype) is per-thread libtorch state, usable without a device. A thread of
        // our own starts with libtorch's defaults (autograd's worker threads inherit the caller's, but the
        // doctor's rank threads, for one, do not).
        std::thread::spawn(|| {
            let dtype = crate::device::cuda_autocast_dtype;
            // SAFETY: plain C calls.
            unsafe {
                assert_eq!((tessera_cuda_autocast_is_enabled(), dtype()), (0, 5), "off, float16");
                let outer = tessera_cuda_autocast_enter(1);
                assert_eq!((outer & 1, tessera_cuda_autocast_is_enabled(), dtype()), (0, 1, 15), "on, bfloat16");
                let inner = tessera_cuda_autocast_enter(0);
                assert_eq!((inner & 1, tessera_cuda_autocast_is_enabled()), (1, 0));
                assert_eq!(tessera_cuda_autocast_exit(inner), 0);
                assert_eq!((tessera_cuda_autocast_is_enabled(), dtype()), (1, 15));
                assert_eq!(tessera_cuda_autocast_exit(outer), 0);
                assert_eq!((tessera_cuda_autocast_is_enabled(), dtype()), (0, 5), "the thread's own state again");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn cuda_calls_fail_with_a_message_on_a_host_without_a_gpu() {
        if tch::Cuda::is_available() {
            return;
        }
        let err = cuda_peak_allocated(0).unwrap_err().to_string();
        assert!(!err.is_empty());
        let err = cuda_set_device(0).unwrap_err().to_string();
        assert!(err.to_ascii_lowercase().contains("cuda"), "{err}");
    }

    /// `y = tanh(x·w)`, counting its runs; fails on request.
    struct Toy {
        w: Tensor,
        runs: std::sync::atomic::AtomicUsize,
        fail: bool,
    }

    impl Recomputable for Toy {
        fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
            self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.fail {
                return Err(TchError::Torch("CUDA out of memory (a test's)".into()));
            }
            x.f_matmul(&self.w)?.f_tanh()
        }
    }

    fn toy(fail: bool) -> Arc<Toy> {
        let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).reshape([2, 2]).set_requires_grad(true);
        #[allow(clippy::arc_with_non_send_sync)]
        Arc::new(Toy { w, runs: 0.into(), fail })
    }

    #[test]
    fn folding_a_gradient_adds_it_in_the_receivers_dtype_and_empties_the_giver() {
        let into = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let from = Tensor::zeros([3], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
        fold_grad(&from, &into).unwrap();
        assert!(!into.grad().defined(), "no gradient, nothing folded");
        (from.to_kind(Kind::Float) * Tensor::from_slice(&[1.0f32, 2.0, 3.0])).sum(Kind::Float).backward();
        fold_grad(&from, &into).unwrap();
        assert!(!from.grad().defined());
        assert!(into.grad().equal(&Tensor::from_slice(&[1.0f32, 2.0, 3.0])));
        (from.to_kind(Kind::Float) * 0.5).sum(Kind::Float).backward();
        fold_grad(&from, &into).unwrap();
        assert!(into.grad().equal(&Tensor::from_slice(&[1.5f32, 2.5, 3.5])));
        let other = Tensor::zeros([2], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
        other.sum(Kind::Float).backward();
        let err = fold_grad(&other, &into).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn a_recomputed_block_gives_the_gradients_of_a_kept_one_runs_twice_and_is_released_with_the_graph() {
        use std::sync::atomic::Ordering::SeqCst;
        let x0 = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).reshape([2, 2]);
        let (kept, again) = (toy(false), toy(false));
        let (xa, xb) = (x0.copy().set_requires_grad(true), x0.copy().set_requires_grad(true));
        let ya = kept.forward(&xa).unwrap();
        let yb = recompute(&again, &xb).unwrap();
        assert!(ya.equal(&yb), "the same forward");
        assert_eq!(Arc::strong_count(&again), 2, "the graph holds the block");
        (&ya * 3.0).sum(tch::Kind::Float).backward();
        (&yb * 3.0).sum(tch::Kind::Float).backward();
        assert_eq!((kept.runs.load(SeqCst), again.runs.load(SeqCst)), (1, 2), "forward, then once more in backward");
        assert!(kept.w.grad().equal(&again.w.grad()), "the parameter's gradient");
        assert!(xa.grad().equal(&xb.grad()), "the input's gradient");
        drop(yb);
        assert_eq!(Arc::strong_count(&again), 1, "released with the graph");

        let once = toy(false);
        let y = tch::no_grad(|| recompute(&once, &x0)).unwrap();
        assert_eq!((once.runs.load(SeqCst), Arc::strong_count(&once), y.requires_grad()), (1, 1, false));
    }

    #[test]
    fn a_failing_block_is_an_error_with_its_message_and_is_released() {
        let bad = toy(true);
        let x = Tensor::ones([2, 2], (tch::Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let e = recompute(&bad, &x).unwrap_err().to_string();
        assert!(e.contains("the recomputed block failed") && e.contains("CUDA out of memory"), "{e}");
        assert_eq!(Arc::strong_count(&bad), 1);
    }
}
