//! One optimizer step: forward and backward over this rank's micro-batches, gradient synchronisation,
//! clipping by the global norm, AdamW (sharded or not).
//!
//! No file or network I/O besides the collectives themselves, and no host synchronisation on CUDA beyond what
//! the communicator needs: the loss and gradient norm come back as 0-d tensors and the caller decides when to
//! read them.
//!
//! Synchronisation by ZeRO stage ([`ShardLayout::zero`]):
//! - 0: the flat gradient is all-reduced (averaged) once per step: in buckets during the last micro-batch's
//!   backward where the transport allows ([`super::overlap`]), else after accumulation; every rank applies the
//!   full update.
//! - 1: the same all-reduce, then each rank updates only its shard of the parameters with its shard of the
//!   optimizer state, and the updated shards are all-gathered.
//! - 2: the gradient is reduce-scattered instead, so each rank only ever holds its shard of the averaged
//!   gradient; then as in 1.
//!
//! Out of memory ([`try_step`]): a micro-batch whose forward or backward runs out of memory (libtorch's
//! error, or the panic of an op that does not return one, whose message says so: CUDA's "CUDA out of
//! memory" / "OutOfMemoryError", the CPU allocator's "can't allocate memory") ends this rank's accumulation
//! and zeroes its gradients. The rank still enters the step's first collective, the loss all-reduce, which
//! carries one out-of-memory flag per rank beside the loss (no extra collective), so every rank learns at the
//! same point whether any rank failed and, if so, returns [`StepOutcome::OutOfMemory`] with weights and
//! optimizer state untouched: the caller can retry the step with smaller micro-batches, and the gang cannot
//! deadlock with some ranks in the gradient all-reduce and others gone. Out of memory after that point (the
//! gradient collectives, the optimizer) is not caught: it fails the step like any other libtorch error.

use crate::comm::{CommError, Communicator, ReduceOp};
use crate::data::Batch;
use crate::model::optim::{GradPiece, ShardLayout};
use crate::model::{AdamW, Gpt};
use crate::train::overlap::{reduce_overlapped, Buckets, OverlapError, Reduced};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use tch::{Device, Kind, TchError, Tensor};

/// What a step produced, still on the device.
pub struct StepOutput {
    /// Mean loss over the global batch (all ranks' samples).
    pub loss: Tensor,
    /// Global gradient norm before clipping.
    pub grad_norm: Tensor,
    /// This rank's loss over its own micro-batches, and the norm of its own gradient before averaging: what
    /// tells a faulty rank apart from the gang (`crate::spike`).
    pub local_loss: Tensor,
    pub local_grad_norm: Tensor,
    /// Gradient buckets handed to the all-reduce while backward was still running (0 without the overlap).
    pub overlapped: usize,
    /// Some rank of the gang was asked to stop (preemption) before this step: every rank sees the same.
    pub stop: bool,
}

impl StepOutput {
    /// `[loss, grad_norm, local_loss, local_grad_norm]` as one fp64 tensor on the device (nothing read back).
    pub fn numbers(&self) -> Tensor {
        let all = [&self.loss, &self.grad_norm, &self.local_loss, &self.local_grad_norm];
        Tensor::stack(&all.map(|t| t.reshape([]).to_kind(Kind::Double)), 0)
    }
}

/// What one attempt at a step came to (see [`try_step`]).
pub enum StepOutcome {
    /// The step was taken: gradients synchronised, weights and optimizer state updated.
    Done(StepOutput),
    /// Some rank ran out of memory in forward/backward. Every rank of the gang returns this for the same
    /// attempt, and nothing changed: gradients are zeroed, weights and optimizer state are as before.
    /// Recoverable: retry the same samples in smaller micro-batches.
    OutOfMemory(OutOfMemory),
}

/// Which ranks ran out of memory in a step's forward/backward.
#[derive(Debug, Clone, PartialEq)]
pub struct OutOfMemory {
    /// The ranks that ran out of memory, ascending (never empty).
    pub ranks: Vec<usize>,
    /// This rank's libtorch message, if it was one of them.
    pub message: Option<String>,
}

impl std::fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank(s) {:?} ran out of memory in forward/backward", self.ranks)?;
        match &self.message {
            Some(m) => write!(f, " ({})", m.lines().next().unwrap_or(m)),
            None => Ok(()),
        }
    }
}

/// Faults injected into a step by the chaos harness (`crate::chaos`); the default injects nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepFaults {
    /// Multiplies this rank's local gradient before it is averaged (a device producing bad numbers).
    pub grad_scale: Option<f64>,
    /// The last micro-batch's backward fails with an out-of-memory error (after the earlier ones have
    /// accumulated gradients), taking the same path as a real one.
    pub out_of_memory: bool,
}

/// The message of an injected out-of-memory error; [`is_out_of_memory`] recognises it as a real one.
pub const INJECTED_OUT_OF_MEMORY: &str = "CUDA out of memory (injected by a train.oom failpoint)";

/// Why a step failed. Both are recoverable by the supervisor (roll back and retry); neither inside the step.
/// (Out of memory in forward/backward is not an error of [`try_step`] but an outcome,
/// [`StepOutcome::OutOfMemory`], which the training loop may recover from by itself.)
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// Runs one optimizer step over `micro_batches` (gradient accumulation: the mean loss over their samples is
/// minimised), synchronised with the other ranks through `comm`.
///
/// # Errors
/// A libtorch error from the backward pass (out of memory included, as [`StepError::Torch`]) or a
/// collective's failure.
pub fn train_step(
    model: &mut Gpt,
    opt: &mut AdamW,
    shard: &ShardLayout,
    comm: &mut dyn Communicator,
    micro_batches: &[Batch],
    lr: f64,
    grad_clip: f64,
) -> Result<StepOutput, StepError> {
    train_step_with(model, opt, shard, comm, micro_batches, lr, grad_clip, StepFaults::default())
}

/// [`train_step`] with injected faults.
///
/// # Errors
/// As [`train_step`].
#[allow(clippy::too_many_arguments)]
pub fn train_step_with(
    model: &mut Gpt,
    opt: &mut AdamW,
    shard: &ShardLayout,
    comm: &mut dyn Communicator,
    micro_batches: &[Batch],
    lr: f64,
    grad_clip: f64,
    faults: StepFaults,
) -> Result<StepOutput, StepError> {
    match try_step(model, opt, shard, comm, micro_batches, lr, grad_clip, faults, None, false)? {
        StepOutcome::Done(out) => Ok(out),
        StepOutcome::OutOfMemory(oom) => Err(StepError::Torch(TchError::Torch(oom.to_string()))),
    }
}

/// One attempt at a step: [`train_step_with`], except that out of memory in forward/backward on any rank
/// is the outcome [`StepOutcome::OutOfMemory`] on every rank (see the module doc). `micro_batches` may
/// differ in size (a shorter last one); each one's loss is weighted by its share of the samples.
///
/// # Errors
/// Any other libtorch error from forward/backward, out of memory after the ranks agreed (gradient
/// collectives, optimizer), or a collective's failure.
///
/// `stop`: this rank was asked to stop (preemption); the agreement point also tells every rank whether any
/// was ([`StepOutput::stop`]), with no collective of its own.
#[allow(clippy::too_many_arguments)]
pub fn try_step(
    model: &mut Gpt,
    opt: &mut AdamW,
    shard: &ShardLayout,
    comm: &mut dyn Communicator,
    micro_batches: &[Batch],
    lr: f64,
    grad_clip: f64,
    faults: StepFaults,
    overlap: Option<&Buckets>,
    stop: bool,
) -> Result<StepOutcome, StepError> {
    let device = model.params.flat.device();
    model.params.zero_grad();
    // The gradient all-reduce overlaps the last backward where it can (see `super::overlap`).
    let overlap = overlap.filter(|_| comm.world() > 1 && shard.zero < 2 && comm.overlaps_compute());
    // The matmuls read the weights' bf16 copies where the model keeps them and the step runs under autocast,
    // unless the overlap's hooks wait for the fp32 weights' gradients. With one micro-batch the copies' bf16
    // gradients go to the optimizer (or the gather) as they are; with several, each is added into the fp32
    // weight's gradient as it comes.
    let copies = model.use_bf16_weights(device.is_cuda() && overlap.is_none());
    let overlap = overlap.map(|buckets| Overlap { buckets, comm: &mut *comm, scale: faults.grad_scale });
    let accumulated = accumulate(model, micro_batches, faults.out_of_memory, overlap);
    // Evaluation and anything else after the step reads the fp32 weights, which are always current.
    model.use_bf16_weights(false);
    let (local_loss, oom, reduced) = accumulated?;

    // The agreement point: `[loss, oom flag of rank 0, ..., oom flag of rank W-1, stop flag]`, summed.
    let (rank, world) = (comm.rank(), comm.world());
    let flags = Tensor::zeros([world as i64 + 1], (Kind::Float, device));
    if oom.is_some() {
        let _ = flags.narrow(0, rank as i64, 1).fill_(1.0);
    }
    if stop {
        let _ = flags.narrow(0, world as i64, 1).fill_(1.0);
    }
    let mut head = Tensor::cat(&[local_loss.reshape([1]), flags], 0);
    comm.all_reduce(&mut head, ReduceOp::Sum)?;
    let (failed, stop): (Vec<usize>, bool) = if world == 1 {
        // Nothing to read back: a single rank already knows.
        (oom.iter().map(|_| 0).collect(), stop)
    } else {
        let f: Vec<f32> = Vec::<f32>::try_from(head.narrow(0, 1, world as i64 + 1).to_device(Device::Cpu))?;
        ((0..world).filter(|&r| f[r] > 0.5).collect(), f[world] > 0.5)
    };
    if !failed.is_empty() {
        model.params.zero_grad();
        return Ok(StepOutcome::OutOfMemory(OutOfMemory { ranks: failed, message: oom }));
    }
    let loss = head.narrow(0, 0, 1) / world as f64;

    let _guard = tch::no_grad_guard();
    let overlapped = reduced.as_ref().map_or(0, |r| r.ready_during_backward);
    let (grad_norm, local_grad_norm) = if shard.zero == 0 && world == 1 && reduced.is_none() {
        // (A one-rank all-reduce is not free either: NCCL's of a 125M model's gradient took 19 ms on an
        // H100, a third of the step.)
        let norm = update_alone(model, opt, lr, grad_clip, faults.grad_scale)?;
        (norm.shallow_clone(), norm)
    } else {
        let local = match reduced {
            // With the overlap, the gradient arrives averaged, with the local norm measured (and a fault
            // applied) on the way.
            Some(r) => Gradient { grad: r.grad, averaged: true, local_sq: Some(r.local_sq) },
            None => {
                let grad = model.params.flat_grad();
                if let Some(f) = faults.grad_scale {
                    let _ = grad.shallow_clone().g_mul_scalar_(f);
                }
                Gradient { grad, averaged: false, local_sq: None }
            }
        };
        if shard.zero == 0 {
            update_replicated(model, opt, comm, local, lr, grad_clip, copies)?
        } else {
            update_sharded(model, opt, shard, comm, local, lr, grad_clip)?
        }
    };
    Ok(StepOutcome::Done(StepOutput {
        loss: loss.reshape([]),
        grad_norm,
        local_loss,
        local_grad_norm,
        overlapped,
        stop,
    }))
}

/// This rank's flat gradient on its way to the update.
struct Gradient {
    grad: Tensor,
    /// Already averaged over the gang (by the overlapped reduction).
    averaged: bool,
    /// The squared norm of this rank's own gradient, when the overlap measured it before averaging.
    local_sq: Option<Tensor>,
}

impl Gradient {
    /// The norm of this rank's own gradient (before averaging).
    fn local_norm(&self) -> Tensor {
        match &self.local_sq {
            Some(sq) => sq.sqrt().to_kind(Kind::Float),
            None => self.grad.norm(),
        }
    }

    /// Averages the gradient over the gang, unless the overlapped reduction already did.
    fn average(&mut self, comm: &mut dyn Communicator) -> Result<(), CommError> {
        if !self.averaged {
            comm.all_reduce(&mut self.grad, ReduceOp::Avg)?;
            self.averaged = true;
        }
        Ok(())
    }
}

/// Plain data parallelism (ZeRO 0): average the gradient (unless the overlap did), then the full update on
/// every rank, which also writes the weights' bf16 copies where the step read them (`copies`) and the
/// kernel runs. Returns the global and local gradient norms.
fn update_replicated(
    model: &mut Gpt,
    opt: &mut AdamW,
    comm: &mut dyn Communicator,
    mut g: Gradient,
    lr: f64,
    grad_clip: f64,
    copies: bool,
) -> Result<(Tensor, Tensor), StepError> {
    let local_grad_norm = g.local_norm();
    g.average(comm)?;
    let grad_norm = g.grad.norm();
    // Clipping happens inside the (fused) update: no pass of its own.
    let whole = [GradPiece { offset: 0, grad: g.grad.shallow_clone() }];
    update_with_copies(model, opt, &whole, (&grad_norm, grad_clip), lr, copies);
    Ok((grad_norm, local_grad_norm))
}

/// AdamW over all of `model`'s parameters from gradient `pieces`, clipped by `clip` (norm, max norm); with
/// `copies`, the weights' bf16 copies (if the model keeps them) are written with the update where the kernel
/// runs, and recorded as current.
fn update_with_copies(
    model: &mut Gpt,
    opt: &mut AdamW,
    pieces: &[GradPiece],
    clip: (&Tensor, f64),
    lr: f64,
    copies: bool,
) {
    let decay_len = model.params.layout.decay_len;
    let shadow = if copies { model.params.shadow_flat() } else { None };
    if opt.update_pieces_with_copies(&model.params.flat, pieces, decay_len, lr, Some(clip), shadow.as_ref()) {
        model.params.shadow_written();
    }
}

/// ZeRO 1 and 2: each rank updates its shard of the (padded) flat buffer with its shard of the averaged
/// gradient (all-reduced then cut for ZeRO 1, reduce-scattered for ZeRO 2), the global norm comes from every
/// rank's share of it, and the updated shards are all-gathered. Returns the global and local gradient norms.
fn update_sharded(
    model: &mut Gpt,
    opt: &mut AdamW,
    shard: &ShardLayout,
    comm: &mut dyn Communicator,
    mut g: Gradient,
    lr: f64,
    grad_clip: f64,
) -> Result<(Tensor, Tensor), StepError> {
    let local_grad_norm = g.local_norm();
    let pad = shard.padded() - shard.numel;
    let padded = |t: &Tensor| {
        if pad == 0 {
            t.shallow_clone()
        } else {
            Tensor::cat(&[t, &Tensor::zeros([pad], (t.kind(), t.device()))], 0)
        }
    };
    let grad_shard = if shard.zero == 1 {
        g.average(comm)?;
        padded(&g.grad).narrow(0, shard.start(), shard.len).copy()
    } else {
        let mut out = Tensor::zeros([shard.len], (g.grad.kind(), g.grad.device()));
        comm.reduce_scatter(&padded(&g.grad), &mut out, ReduceOp::Avg)?;
        out
    };
    drop(g);
    // The global norm from every rank's share of the squared norm.
    let mut sq = grad_shard.to_kind(Kind::Double).square().sum(Kind::Double).reshape([1]);
    comm.all_reduce(&mut sq, ReduceOp::Sum)?;
    let grad_norm = sq.sqrt().to_kind(Kind::Float).reshape([]);
    let params_shard = padded(&model.params.flat).narrow(0, shard.start(), shard.len).copy();
    let decay = shard.decay_len_in_shard(model.params.layout.decay_len);
    opt.update_clipped(&params_shard, &grad_shard, decay, lr, Some((&grad_norm, grad_clip)));
    let mut gathered = Tensor::zeros([shard.padded()], (params_shard.kind(), params_shard.device()));
    comm.all_gather(&params_shard, &mut gathered)?;
    model.params.flat.shallow_clone().copy_(&gathered.narrow(0, 0, shard.numel));
    Ok((grad_norm, local_grad_norm))
}

/// The update of a rank alone (one rank, nothing sharded), from the gradients backward left: nothing is
/// averaged, so the optimizer reads autograd's per-tensor gradients where they are, with no gather into a
/// flat buffer (a pass of the parameters' size: about 3.5 ms a step at 1.3B on an H100). Returns the
/// global gradient norm; the gradients are dropped. `grad_scale` multiplies the gradient first (an
/// injected fault).
///
/// # Errors
/// libtorch's.
pub fn update_alone(
    model: &mut Gpt,
    opt: &mut AdamW,
    lr: f64,
    grad_clip: f64,
    grad_scale: Option<f64>,
) -> Result<Tensor, StepError> {
    let (pieces, grad_norm) = gradient_alone(model, opt, grad_scale)?;
    apply_alone(model, opt, pieces, &grad_norm, lr, grad_clip);
    Ok(grad_norm)
}

/// [`update_alone`]'s first half: the gradient pieces (scaled by `grad_scale`, if any) and their global
/// norm, as the optimizer computes it ([`AdamW::global_norm`]).
///
/// # Errors
/// libtorch's.
pub fn gradient_alone(
    model: &Gpt,
    opt: &mut AdamW,
    grad_scale: Option<f64>,
) -> Result<(Vec<GradPiece>, Tensor), StepError> {
    let _guard = tch::no_grad_guard();
    let mut pieces = model.params.grad_pieces();
    if let Some(f) = grad_scale {
        for p in &mut pieces {
            // In fp32, as the fault scales every other gradient (a bf16 copy's would round).
            p.grad = p.grad.to_kind(Kind::Float);
            let _ = p.grad.g_mul_scalar_(f);
        }
    }
    let grad_norm = opt.global_norm(&pieces.iter().map(|p| &p.grad).collect::<Vec<_>>())?;
    Ok((pieces, grad_norm))
}

/// [`update_alone`]'s second half: AdamW over the pieces, clipped to `grad_clip` by `grad_norm`; then the
/// gradients are dropped.
pub fn apply_alone(
    model: &mut Gpt,
    opt: &mut AdamW,
    pieces: Vec<GradPiece>,
    grad_norm: &Tensor,
    lr: f64,
    grad_clip: f64,
) {
    let _guard = tch::no_grad_guard();
    update_with_copies(model, opt, &pieces, (grad_norm, grad_clip), lr, true);
    drop(pieces);
    model.params.zero_grad();
}

/// Mean loss over `batches` without gradients, each batch evaluated in pieces of at most `max_rows` rows (the
/// micro-batch training runs at, which is known to fit in memory) and weighted by its rows.
///
/// # Errors
/// libtorch's, for example out of memory.
pub fn eval_loss(model: &Gpt, batches: &[Batch], max_rows: i64) -> Result<f64, tch::TchError> {
    let _guard = tch::no_grad_guard();
    let autocast = matches!(model.params.flat.device(), Device::Cuda(_));
    let (mut sum, mut batch_means) = (0.0, 0usize);
    for b in batches {
        let rows = b.inputs.size()[0];
        let (mut total, mut at) = (0.0, 0);
        while at < rows {
            let n = max_rows.max(1).min(rows - at);
            let (x, y) = (b.inputs.narrow(0, at, n), b.targets.narrow(0, at, n));
            total += crate::shim::cuda_autocast(autocast, || model.f_loss(&x, &y))?.double_value(&[]) * n as f64;
            at += n;
        }
        sum += total / rows.max(1) as f64;
        batch_means += 1;
    }
    Ok(sum / batch_means.max(1) as f64)
}

/// The overlapped gradient reduction's part in [`accumulate`].
struct Overlap<'a> {
    buckets: &'a Buckets,
    comm: &'a mut dyn Communicator,
    /// An injected fault's factor on the local gradient, applied as it is copied for reduction.
    scale: Option<f64>,
}

/// Forward and backward over `micro_batches`, accumulating gradients; returns this rank's mean loss over its
/// samples. At the first out-of-memory error it stops, zeroes the gradients and returns the error's message
/// beside a zero loss. With `inject_oom`, the last micro-batch's backward fails that way.
///
/// With `overlap`, the last micro-batch's backward runs with the gradient all-reduce overlapped, which also
/// runs (on whatever this rank has) when an earlier micro-batch failed, so every rank issues the same
/// collectives; the averaged gradient comes back as [`Reduced`].
fn accumulate(
    model: &mut Gpt,
    micro_batches: &[Batch],
    inject_oom: bool,
    mut overlap: Option<Overlap<'_>>,
) -> Result<(Tensor, Option<String>, Option<Reduced>), StepError> {
    let device = model.params.flat.device();
    let autocast = matches!(device, Device::Cuda(_));
    let rows: Vec<i64> = micro_batches.iter().map(|b| b.inputs.size()[0]).collect();
    let all_rows: i64 = rows.iter().sum();
    // Equal micro-batches (the usual case) take the plain mean, computed as it always was so that runs stay
    // bit-for-bit reproducible; a shorter last one weighs each loss by its share of the samples.
    let uniform = rows.windows(2).all(|w| w[0] == w[1]);
    let several = micro_batches.len() > 1;
    let n = micro_batches.len() as f64;
    let weigh = |loss: &Tensor, rows: i64| if uniform { loss / n } else { loss * (rows as f64 / all_rows as f64) };
    let mut total = Tensor::zeros([], (Kind::Float, device));
    let (mut oom, mut reduced) = (None, None);
    for (k, (mb, &r)) in micro_batches.iter().zip(&rows).enumerate() {
        let last = k + 1 == micro_batches.len();
        let inject = inject_oom && last;
        let run = |model: &Gpt| {
            let loss = forward_backward(model, mb, autocast, inject, |l| weigh(l, r))?;
            if several {
                // The bf16 weight copies' gradients add up in fp32, as autocast's casts' would. (The last one
                // too: kept in bf16 it would be added to the others in a new fp32 tensor, beside both.)
                model.params.fold_copy_grads()?;
            }
            Ok::<_, TchError>(loss)
        };
        let result = match if last { overlap.take() } else { None } {
            Some(ov) => {
                let (result, r) = reduce_overlapped(&model.params, ov.buckets, ov.comm, ov.scale, || run(model))
                    .map_err(overlap_error)?;
                reduced = Some(r);
                result
            }
            None => run(model),
        };
        match result {
            Ok(loss) if uniform => total += loss,
            Ok(loss) => total += weigh(&loss, r),
            Err(e) if is_out_of_memory(&e.to_string()) => {
                oom = Some(e.to_string());
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(ov) = overlap.take() {
        // An earlier micro-batch failed: the reduction still runs, so the gang's collectives stay aligned.
        let ((), r) = reduce_overlapped(&model.params, ov.buckets, ov.comm, ov.scale, || ()).map_err(overlap_error)?;
        reduced = Some(r);
    }
    if reduced.is_some() || oom.is_some() {
        // After the overlap the flat gradient holds everything, and the per-tensor gradients would only take
        // memory; after out of memory they are partial.
        model.params.zero_grad();
    }
    if oom.is_some() {
        return Ok((Tensor::zeros([], (Kind::Float, device)), oom, reduced));
    }
    Ok((if uniform { total / n } else { total }, None, reduced))
}

fn overlap_error(e: OverlapError) -> StepError {
    match e {
        OverlapError::Comm(c) => StepError::Comm(c),
        OverlapError::Torch(t) => StepError::Torch(t),
    }
}

/// One micro-batch's forward and backward (of its loss as `weigh` scales it); returns the unscaled loss,
/// detached.
fn forward_backward(
    model: &Gpt,
    mb: &Batch,
    autocast: bool,
    inject_oom: bool,
    weigh: impl Fn(&Tensor) -> Tensor,
) -> Result<Tensor, TchError> {
    let loss = crate::shim::cuda_autocast(autocast, || catch_out_of_memory(|| model.f_loss(&mb.inputs, &mb.targets)))??;
    if inject_oom {
        return Err(TchError::Torch(INJECTED_OUT_OF_MEMORY.into()));
    }
    weigh(&loss).f_backward()?;
    Ok(loss.detach())
}

/// Whether a libtorch message reports an allocation failure: CUDA's caching allocator ("CUDA out of memory",
/// `torch.OutOfMemoryError`), the CPU's ("DefaultCPUAllocator: can't allocate memory" / "not enough
/// memory"), or cuBLAS and cuDNN failing to allocate their workspace or handle with the card full
/// (`CUBLAS_STATUS_ALLOC_FAILED`, `CUDNN_STATUS_ALLOC_FAILED`, and `CUBLAS_STATUS_NOT_INITIALIZED` from
/// `cublasCreate`: a handle is made per thread, so autograd's device thread makes its own at the first
/// backward, when the activations already fill the card).
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["out of memory", "outofmemoryerror", "can't allocate memory", "cannot allocate memory", "not enough memory"]
        .iter()
        .chain(&["cublas_status_alloc_failed", "cudnn_status_alloc_failed"])
        .any(|p| m.contains(p))
        || (m.contains("cublas_status_not_initialized") && m.contains("cublascreate"))
}

thread_local! {
    /// Set while [`catch_out_of_memory`] runs: the panic hook stays quiet about out of memory then.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic about out of memory into an error: `tch`'s tensor ops without the `f_` prefix
/// panic on a libtorch error instead of returning it, and one left anywhere in the forward pass must not
/// turn a recoverable out of memory into a crash. Any other panic goes on unwinding, as before.
fn catch_out_of_memory<T>(f: impl FnOnce() -> T) -> Result<T, TchError> {
    quiet_out_of_memory_panics();
    CATCHING.with(|c| c.set(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(false));
    result.or_else(|payload| match panic_text(payload.as_ref()) {
        Some(text) if is_out_of_memory(&text) => Err(TchError::Torch(text)),
        _ => std::panic::resume_unwind(payload),
    })
}

pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
}

/// Installs (once per process) a panic hook that passes over out-of-memory panics that
/// [`catch_out_of_memory`] is about to catch, so a recovered out of memory does not print a panic report;
/// every other panic goes to the previous hook.
fn quiet_out_of_memory_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let caught = CATCHING.with(Cell::get) && panic_text(info.payload()).is_some_and(|t| is_out_of_memory(&t));
            if !caught {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_about_an_allocation_becomes_an_out_of_memory_error_and_other_panics_unwind_as_before() {
        // 2^47 bytes: more than any host has, and than a 47-bit address space holds, whatever the overcommit
        // policy. `Tensor::empty` panics (no `f_`), as the model's forward does.
        let r = catch_out_of_memory(|| Tensor::empty([1i64 << 45], (Kind::Float, Device::Cpu)));
        let e = r.expect_err("the allocation cannot succeed");
        assert!(is_out_of_memory(&e.to_string()), "{e}");
        let other = std::panic::catch_unwind(|| catch_out_of_memory(|| panic!("shape mismatch")));
        assert!(other.is_err(), "a panic that is not out of memory goes on unwinding");
        assert!(!CATCHING.with(Cell::get), "the panic hook is quiet only while catching");
    }
}
