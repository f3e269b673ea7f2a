//! One optimizer step: forward and backward over this rank's micro-batches, gradient synchronisation,
//! clipping by the global norm, AdamW (sharded or not).
//!
//! No file or network I/O besides the collectives themselves, and no host synchronisation on CUDA beyond what
//! the communicator needs: the loss and gradient norm come back as 0-d tensors and the caller decides when to
//! read them.
//!
//! Synchronisation by ZeRO stage ([`ShardLayout::zero`]):
//! - 0: the flat gradient is all-reduced (averaged) once, after accumulation; every rank applies the full
//!   update.
//! - 1: the same all-reduce, then each rank updates only its shard of the parameters with its shard of the
//!   optimizer state, and the updated shards are all-gathered.
//! - 2: the gradient is reduce-scattered instead, so each rank only ever holds its shard of the averaged
//!   gradient; then as in 1.

use crate::comm::{CommError, Communicator, ReduceOp};
use crate::data::Batch;
use crate::model::optim::{clip_grad_norm, clip_to_norm, ShardLayout};
use crate::model::{AdamW, Gpt};
use tch::{Device, Kind, Tensor};

/// What a step produced, still on the device.
pub struct StepOutput {
    /// Mean loss over the global batch (all ranks' micro-batches).
    pub loss: Tensor,
    /// Global gradient norm before clipping.
    pub grad_norm: Tensor,
    /// This rank's loss over its own micro-batches, and the norm of its own gradient before averaging: what
    /// tells a faulty rank apart from the gang (`crate::spike`).
    pub local_loss: Tensor,
    pub local_grad_norm: Tensor,
}

/// Faults injected into a step by the chaos harness (`crate::chaos`); the default injects nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepFaults {
    /// Multiplies this rank's local gradient before it is averaged (a device producing bad numbers).
    pub grad_scale: Option<f64>,
}

/// Why a step failed. Both are recoverable by the supervisor (roll back and retry); neither inside the step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// Runs one optimizer step over `micro_batches` (gradient accumulation: the mean of their losses is
/// minimised), synchronised with the other ranks through `comm`.
///
/// # Errors
/// A libtorch error from the backward pass (for example out of memory) or a collective's failure.
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
    let device = model.params.flat.device();
    let autocast = matches!(device, Device::Cuda(_));
    model.params.zero_grad();
    let n = micro_batches.len() as f64;
    let mut total = Tensor::zeros([], (Kind::Float, device));
    for mb in micro_batches {
        let loss = tch::autocast(autocast, || model.loss(&mb.inputs, &mb.targets));
        (&loss / n).f_backward()?;
        total += loss.detach();
    }
    let local_loss = total / n;
    // A copy: the all-reduce works in place, and this rank's own loss must survive it.
    let mut loss = local_loss.copy().reshape([1]);
    comm.all_reduce(&mut loss, ReduceOp::Avg)?;

    let _guard = tch::no_grad_guard();
    let decay_len = model.params.layout.decay_len;
    let mut grad = model.params.flat_grad();
    if let Some(f) = faults.grad_scale {
        let _ = grad.g_mul_scalar_(f);
    }
    let local_grad_norm = grad.norm();
    if shard.zero == 0 {
        comm.all_reduce(&mut grad, ReduceOp::Avg)?;
        let grad_norm = clip_grad_norm(&grad, grad_clip);
        opt.update(&model.params.flat, &grad, decay_len, lr);
        return Ok(StepOutput { loss: loss.reshape([]), grad_norm, local_loss, local_grad_norm });
    }

    // ZeRO: work on the buffer padded to world · len.
    let pad = shard.padded() - shard.numel;
    let padded = |t: &Tensor| {
        if pad == 0 {
            t.shallow_clone()
        } else {
            Tensor::cat(&[t, &Tensor::zeros([pad], (t.kind(), t.device()))], 0)
        }
    };
    let grad_shard = if shard.zero == 1 {
        comm.all_reduce(&mut grad, ReduceOp::Avg)?;
        padded(&grad).narrow(0, shard.start(), shard.len).copy()
    } else {
        let mut out = Tensor::zeros([shard.len], (grad.kind(), grad.device()));
        comm.reduce_scatter(&padded(&grad), &mut out, ReduceOp::Avg)?;
        out
    };
    drop(grad);
    // The global norm from every rank's share of the squared norm.
    let mut sq = grad_shard.to_kind(Kind::Double).square().sum(Kind::Double).reshape([1]);
    comm.all_reduce(&mut sq, ReduceOp::Sum)?;
    let grad_norm = sq.sqrt().to_kind(Kind::Float).reshape([]);
    clip_to_norm(&grad_shard, &grad_norm, grad_clip);
    let params_shard = padded(&model.params.flat).narrow(0, shard.start(), shard.len).copy();
    opt.update(&params_shard, &grad_shard, shard.decay_len_in_shard(decay_len), lr);
    let mut gathered = Tensor::zeros([shard.padded()], (params_shard.kind(), params_shard.device()));
    comm.all_gather(&params_shard, &mut gathered)?;
    model.params.flat.shallow_clone().copy_(&gathered.narrow(0, 0, shard.numel));
    Ok(StepOutput { loss: loss.reshape([]), grad_norm, local_loss, local_grad_norm })
}

/// Mean loss over `batches` without gradients.
pub fn eval_loss(model: &Gpt, batches: &[Batch]) -> f64 {
    let _guard = tch::no_grad_guard();
    let autocast = matches!(model.params.flat.device(), Device::Cuda(_));
    let sum: f64 =
        batches.iter().map(|b| tch::autocast(autocast, || model.loss(&b.inputs, &b.targets)).double_value(&[])).sum();
    sum / batches.len().max(1) as f64
}
