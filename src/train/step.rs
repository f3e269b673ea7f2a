//! One optimizer step: forward and backward over the micro-batches, gradient clipping, AdamW.
//!
//! Pure compute: no I/O, no host synchronisation. The loss and gradient norm come back as 0-d tensors and
//! the caller decides when to read them (reading forces the device to catch up).

use crate::data::Batch;
use crate::model::{optim::clip_grad_norm, AdamW, Gpt};
use tch::{Device, Kind, Tensor};

/// What a step produced, still on the device.
pub struct StepOutput {
    /// Mean loss over the step's micro-batches.
    pub loss: Tensor,
    /// Global gradient norm before clipping.
    pub grad_norm: Tensor,
}

/// Runs one optimizer step over `micro_batches` (gradient accumulation): the mean of their losses is
/// minimised, so the update is the same as one batch of all their samples.
///
/// # Errors
/// A libtorch error from the backward pass (for example out of memory).
pub fn train_step(
    model: &mut Gpt,
    opt: &mut AdamW,
    micro_batches: &[Batch],
    lr: f64,
    grad_clip: f64,
) -> Result<StepOutput, tch::TchError> {
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
    let grad = model.params.flat_grad();
    let grad_norm = clip_grad_norm(&grad, grad_clip);
    let decay_len = model.params.layout.decay_len;
    opt.update(&model.params.flat, &grad, decay_len, lr);
    Ok(StepOutput { loss: total / n, grad_norm })
}

/// Mean loss over `batches` without gradients.
pub fn eval_loss(model: &Gpt, batches: &[Batch]) -> f64 {
    let _guard = tch::no_grad_guard();
    let autocast = matches!(model.params.flat.device(), Device::Cuda(_));
    let sum: f64 =
        batches.iter().map(|b| tch::autocast(autocast, || model.loss(&b.inputs, &b.targets)).double_value(&[])).sum();
    sum / batches.len().max(1) as f64
}
