//! `tessera doctor`: is this machine ready to train? Each check runs the real code path on the chosen device
//! and compares it with a reference, so a broken driver, library or kernel shows up here, named, rather than
//! hours into a run.
//!
//! On CUDA: the device and its memory, bf16 autocast, the shim's cross-entropy and fused AdamW against their
//! fp32 references on the GPU, the allocator's statistics and cache release, and NCCL (a one-rank
//! communicator's all-reduce, checked element for element, with its bandwidth). On the CPU the same
//! numerical checks run, and NCCL is reported as not applicable.

use crate::bench::synthetic_batch;
use crate::comm::{nccl, Communicator, ReduceOp};
use crate::model::optim::GradPiece;
use crate::model::{AdamW, AdamWConfig};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// One check's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    /// `None`: not applicable on this device.
    pub ok: Option<bool>,
    pub detail: String,
}

/// Tessera's own kernels are optional (off unless asked for): without NVRTC their checks do not apply, rather
/// than fail. A kernel that runs and gives a wrong answer still fails.
fn optional_kernel(c: Check) -> Check {
    match c.ok {
        Some(false) if c.detail.contains(NVRTC_MISSING) => Check {
            ok: None,
            detail: "NVRTC is not installed; Tessera's own kernels are off unless asked for".into(),
            ..c
        },
        _ => c,
    }
}

/// What the shim says when it finds no NVRTC (csrc/kernels.cpp).
const NVRTC_MISSING: &str = "NVRTC (libnvrtc.so.13) was not found";

fn check(name: &'static str, f: impl FnOnce() -> Result<String, String>) -> Check {
    match f() {
        Ok(detail) => Check { name, ok: Some(true), detail },
        Err(detail) => Check { name, ok: Some(false), detail },
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
}

/// Runs every check on `device`.
pub fn run(device: Device) -> Vec<Check> {
    let mut out = vec![];
    out.push(check("device", || match crate::device::describe(device) {
        Some((name, mem)) => Ok(format!("{name}, {:.1} GiB", mem as f64 / (1u64 << 30) as f64)),
        None if device == Device::Cpu => Ok(format!("cpu, {} libtorch threads", tch::get_num_threads())),
        None => Err(format!("{device:?}: libtorch cannot describe it")),
    }));
    if device.is_cuda() {
        out.push(check("bf16 autocast", || {
            let d = crate::device::cuda_autocast_dtype();
            if d != 15 {
                return Err(format!("CUDA autocast dtype is c10 type {d}, not BFloat16 (15)"));
            }
            // A region as the training step opens one: an fp32 matmul inside it must run in bf16.
            let a = Tensor::randn([64, 64], (Kind::Float, device));
            let (on, kind) =
                crate::shim::cuda_autocast(true, || (crate::shim::cuda_autocast_enabled(), a.matmul(&a).kind()));
            let (off, after) = (!crate::shim::cuda_autocast_enabled(), a.matmul(&a).kind());
            match (on && off, kind, after) {
                (true, Kind::BFloat16, Kind::Float) => {
                    Ok("an fp32 matmul runs in bfloat16 inside an autocast region, in fp32 after it".into())
                }
                _ => Err(format!("a matmul gave {kind:?} inside an autocast region and {after:?} after it")),
            }
        }));
    } else {
        out.push(Check { name: "bf16 autocast", ok: None, detail: "CUDA only; the CPU trains in fp32".into() });
    }
    out.push(check("cross-entropy", || cross_entropy(device, false)));
    if device.is_cuda() {
        out.push(optional_kernel(check("cross-entropy kernel", || cross_entropy(device, true))));
        out.push(optional_kernel(check("add+LayerNorm kernel", || add_layer_norm(device))));
        out.push(optional_kernel(check("AdamW kernel", || adamw_kernel(device))));
        out.push(optional_kernel(check("bf16 weight copies", || bf16_weights(device))));
    } else {
        out.push(kernel_build());
    }
    out.push(check("recomputation", || recompute(device)));
    out.push(check("fused AdamW", || fused_adamw(device)));
    if device.is_cuda() {
        out.push(check("memory statistics", || memory(device)));
        out.push(check("NCCL all-reduce", || nccl_all_reduce(device)));
    } else {
        out.push(Check { name: "memory statistics", ok: None, detail: "CUDA's caching allocator only".into() });
        out.push(Check { name: "NCCL all-reduce", ok: None, detail: "CPU ranks use the TCP ring".into() });
    }
    out
}

/// The shim's cross-entropy on this device, in the dtype training uses here (bf16 on CUDA), against the fp32
/// loss and gradient of the same values; `kernel`: through Tessera's NVRTC kernels ([`Gpt::ce_kernel`]).
///
/// [`Gpt::ce_kernel`]: crate::model::Gpt::ce_kernel
fn cross_entropy(device: Device, kernel: bool) -> Result<String, String> {
    let kind = if device.is_cuda() { Kind::BFloat16 } else { Kind::Float };
    let (n, v) = (512, 50_304);
    let logits = (Tensor::randn([n, v], (Kind::Float, device)) * 3.0).to_kind(kind).set_requires_grad(true);
    let targets = Tensor::randint(v, [n], (Kind::Int64, device));
    let loss = crate::shim::cross_entropy(&logits, &targets, kernel).map_err(|e| e.to_string())?;
    loss.backward();
    let exact = logits.detach().to_kind(Kind::Float).set_requires_grad(true);
    let reference = exact.cross_entropy_for_logits(&targets);
    reference.backward();
    let (l, r) = (loss.double_value(&[]), reference.double_value(&[]));
    let grad_err = max_abs(&logits.grad(), &exact.grad());
    let grad_scale = exact.grad().abs().max().double_value(&[]);
    // bf16 gradients carry 8 significant bits: allow 1/128 of the largest entry.
    let tol = if kind == Kind::BFloat16 { grad_scale / 128.0 } else { 1e-6 };
    if (l - r).abs() > 1e-4 * r.abs().max(1.0) || grad_err > tol {
        return Err(format!("loss {l:.6} vs {r:.6}, gradient off by {grad_err:.2e} (allowed {tol:.2e})"));
    }
    Ok(format!("{kind:?} logits {n}x{v}: loss {l:.6} = fp32 reference {r:.6}, gradient within {grad_err:.1e}"))
}

/// Tessera's fused residual add and LayerNorm (bf16 out) against libtorch's add, LayerNorm and cast, forward
/// and backward, on the GPU.
fn add_layer_norm(device: Device) -> Result<String, String> {
    let (n, c) = (1024, 2048);
    let opts = (Kind::Float, device);
    let x = (Tensor::randn([n, c], opts) * 2.0 + 5.0).set_requires_grad(true);
    let y = Tensor::randn([n, c], opts).to_kind(Kind::BFloat16).set_requires_grad(true);
    let w = (Tensor::randn([c], opts) * 0.1 + 1.0).set_requires_grad(true);
    let b = (Tensor::randn([c], opts) * 0.1).set_requires_grad(true);
    let (gs, gh) = (Tensor::randn([n, c], opts), Tensor::randn([n, c], opts));
    let (s, h) = crate::shim::add_layer_norm(&x, &y, &w, &b, 1e-5).map_err(|e| e.to_string())?;
    if h.kind() != Kind::BFloat16 || s.kind() != Kind::Float {
        return Err(format!("gave s {:?} and h {:?}, not Float and BFloat16", s.kind(), h.kind()));
    }
    ((&s * &gs).sum(Kind::Float) + (h.to_kind(Kind::Float) * &gh).sum(Kind::Float)).backward();
    let ours = [s.detach(), h.to_kind(Kind::Float), x.grad(), y.grad().to_kind(Kind::Float), w.grad(), b.grad()];
    let leaves = [&x, &y, &w, &b].map(|t| t.detach().copy().set_requires_grad(true));
    let [x2, y2, w2, b2] = &leaves;
    let s2 = x2 + y2;
    let h2 = s2.layer_norm([c], Some(w2), Some(b2), 1e-5, true).to_kind(Kind::BFloat16);
    ((&s2 * &gs).sum(Kind::Float) + (h2.to_kind(Kind::Float) * &gh).sum(Kind::Float)).backward();
    let theirs =
        [s2.detach(), h2.to_kind(Kind::Float), x2.grad(), y2.grad().to_kind(Kind::Float), w2.grad(), b2.grad()];
    let names = ["s", "h", "dx", "dy", "dw", "db"];
    let mut worst = 0.0f64;
    for ((name, a), r) in names.iter().zip(&ours).zip(&theirs) {
        let scale = r.abs().max().double_value(&[]).max(1.0);
        // bf16 values (h, dy) differ by a rounding where fp32 ones round a hair apart: 1/128 of the largest.
        let err = max_abs(a, r) / scale;
        if err > 1.0 / 128.0 {
            return Err(format!("{name} differs from libtorch's by {err:.2e} of its largest entry"));
        }
        worst = worst.max(err);
    }
    Ok(format!("{n}x{c}: s, h and the four gradients equal libtorch's within {worst:.1e} of their largest entries"))
}

/// Tessera's gradient-norm and AdamW kernels ([`AdamW::kernel`]) against libtorch's norm and fused AdamW,
/// three clipped updates from gradients in pieces: more pieces than one launch takes, pieces from 1 element to
/// several blocks, the weight-decay boundary inside one.
fn adamw_kernel(device: Device) -> Result<String, String> {
    let opts = (Kind::Float, device);
    let sizes: Vec<i64> = (0..70).map(|i| [1, 31, 768, 4097, 20_000][i % 5] + i as i64).chain([300_001]).collect();
    let offsets: Vec<i64> = sizes.iter().scan(0, |at, n| Some(std::mem::replace(at, *at + n))).collect();
    let numel: i64 = sizes.iter().sum();
    let decay_len = offsets[40] + 17;
    let p0 = Tensor::randn([numel], opts);
    let (pk, pf) = (p0.copy(), p0.copy());
    let mut ours = AdamW::new(AdamWConfig::default(), &pk);
    ours.kernel = true;
    let mut theirs = AdamW::new(AdamWConfig::default(), &pf);
    let mut worst_norm = 0.0f64;
    for k in 0..3 {
        let pieces: Vec<GradPiece> = offsets
            .iter()
            .zip(&sizes)
            .map(|(&offset, &n)| GradPiece { offset, grad: Tensor::randn([n], opts) })
            .collect();
        let before: Vec<Tensor> = pieces.iter().map(|p| p.grad.copy()).collect();
        // libtorch's fused update writes the clipped gradient back: it gets copies of its own.
        let copies: Vec<GradPiece> =
            pieces.iter().map(|p| GradPiece { offset: p.offset, grad: p.grad.copy() }).collect();
        let grads: Vec<&Tensor> = pieces.iter().map(|p| &p.grad).collect();
        let (nk, nf) = (
            ours.global_norm(&grads).map_err(|e| e.to_string())?,
            theirs.global_norm(&grads).map_err(|e| e.to_string())?,
        );
        let (a, b) = (nk.double_value(&[]), nf.double_value(&[]));
        worst_norm = worst_norm.max((a - b).abs() / b);
        if (a - b).abs() > 1e-5 * b {
            return Err(format!("gradient norm {a} vs libtorch's {b}"));
        }
        // Clipped (the norm is several hundred), so the clipping coefficient is exercised.
        let lr = 1e-2 * (k + 1) as f64;
        ours.update_pieces(&pk, &pieces, decay_len, lr, Some((&nf, 1.0)));
        theirs.update_pieces(&pf, &copies, decay_len, lr, Some((&nf, 1.0)));
        if !ours.kernel {
            return Err("the kernel failed and fell back to libtorch's update".into());
        }
        // libtorch's fused update writes the unscaled gradient back; ours must leave it alone.
        if let Some(i) = before.iter().zip(&pieces).position(|(b, p)| max_abs(b, &p.grad) > 0.0) {
            return Err(format!("the kernel changed gradient piece {i}"));
        }
    }
    let err = [(&pk, &pf), (&ours.exp_avg, &theirs.exp_avg), (&ours.exp_avg_sq, &theirs.exp_avg_sq)]
        .map(|(a, b)| max_abs(a, b) / b.abs().max().double_value(&[]).max(1e-30));
    if err.iter().any(|&e| e > 1e-6) {
        let [p, m, v] = err;
        return Err(format!(
            "parameters, first and second moments differ from libtorch's fused AdamW by {p:.2e}, {m:.2e}, {v:.2e} (relative)"
        ));
    }
    Ok(format!(
        "3 clipped updates of {numel} parameters in {} pieces equal libtorch's within {:.1e}; norm within {worst_norm:.1e}",
        sizes.len(),
        err.iter().fold(0.0f64, |a, &b| a.max(b))
    ))
}

/// Training steps with the matmul weights' bf16 copies ([`Gpt::set_bf16_weights`]) against the same steps with
/// autocast's casts: the same roundings, so the same losses and weights, bit for bit; and the copies the
/// AdamW kernel wrote are the new weights rounded. Twice: one micro-batch with the whole update on the rank
/// (the copies' bf16 gradients go to the kernel as they are), and two micro-batches with the update of a
/// ZeRO-1 shard (the copies' gradients added up in fp32, gathered into the flat gradient, and the copies made
/// again after the gather).
///
/// [`Gpt::set_bf16_weights`]: crate::model::Gpt::set_bf16_weights
fn bf16_weights(device: Device) -> Result<String, String> {
    let one = bf16_weights_against_casts(device, 1, 0, 1)?;
    let two = bf16_weights_against_casts(device, 2, 1, 1).map_err(|e| format!("2 micro-batches, ZeRO-1: {e}"))?;
    let ranks = bf16_weights_against_casts(device, 1, 0, 2).map_err(|e| format!("2 ranks: {e}"))?;
    Ok(format!(
        "3 steps of a 2-layer GPT, 1 micro-batch: {one}; 2 micro-batches, ZeRO-1: {two}; 2 ranks of the TCP ring on \
         this GPU, ZeRO-0: {ranks}"
    ))
}

/// [`bf16_weights`] with `micro` micro-batches of 2 sequences each and ZeRO stage `zero` on each of `world`
/// ranks (several: threads joined by the TCP ring, the tensors staged through the host, since NCCL refuses
/// two ranks on one GPU). Compares rank 0, after checking that every rank holds the same weights.
fn bf16_weights_against_casts(device: Device, micro: usize, zero: u8, world: usize) -> Result<String, String> {
    use crate::comm::{staged::HostStaged, tcp::TcpRing};
    use crate::data::Batch;
    use crate::model::Gpt;
    let config = small_gpt();
    // Each rank's micro-batches, the same for every run (a rank's thread takes its own).
    let batches_of = |rank: usize| -> Vec<Batch> {
        (0..micro).map(|k| synthetic_batch(&config, 2, device, (rank * micro + k) as u64)).collect()
    };
    /// What a rank ends with.
    struct Ran {
        losses: Vec<f64>,
        flat: Tensor,
        /// Whether the copies were stale after the last update (and were made again).
        made_again: bool,
        /// Whether the copies, once current, are the weights rounded.
        rounded: bool,
    }
    let steps = |rank: usize, mine: Vec<Batch>, comm: &mut dyn Communicator, copies: bool| {
        let mut model = Gpt::new(config, device, 3);
        model.set_bf16_weights(copies);
        let shard = crate::model::optim::ShardLayout::new(zero, rank, world, model.params.layout.numel);
        let mut opt = AdamW::new(AdamWConfig::default(), &Tensor::zeros([shard.len], (Kind::Float, device)));
        opt.kernel = true;
        let losses = three_steps(&mut model, &mut opt, &shard, comm, &mine)?;
        if !opt.kernel {
            return Err("the AdamW kernel failed and fell back to libtorch's update".into());
        }
        let made_again = model.params.refresh_shadow();
        let len = model.params.layout.decay_len;
        let rounded = model.params.flat.narrow(0, 0, len).to_kind(Kind::BFloat16);
        let rounded = model.params.shadow_flat().is_some_and(|c| c.equal(&rounded));
        Ok::<_, String>(Ran { losses, flat: model.params.flat.shallow_clone(), made_again, rounded })
    };
    let run = |copies: bool| -> Result<Ran, String> {
        if world == 1 {
            return steps(0, batches_of(0), &mut crate::comm::Solo::default(), copies);
        }
        let rings =
            TcpRing::on_loopback(world, b"doctor", std::time::Duration::from_secs(60)).map_err(|e| e.to_string())?;
        let mut ranks: Vec<Result<Ran, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(rank, ring)| {
                    let (steps, mine) = (&steps, batches_of(rank));
                    s.spawn(move || steps(rank, mine, &mut HostStaged::new(ring), copies))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into()))).collect()
        });
        let first = ranks.remove(0)?;
        for (r, other) in ranks.into_iter().enumerate() {
            if !other?.flat.equal(&first.flat) {
                return Err(format!("rank {} ended with other weights than rank 0", r + 1));
            }
        }
        Ok(first)
    };
    let (plain, plain2, with) = (run(false)?, run(false)?, run(true)?);
    // Without ZeRO the AdamW kernel wrote the copies with the last update; with it, the gather of the updated
    // shards left them stale, to be made again at the next forward.
    if with.made_again != (zero > 0) {
        let state = if with.made_again { "stale" } else { "current" };
        return Err(format!("the bf16 copies were {state} after the last update with ZeRO-{zero}"));
    }
    if !with.rounded {
        return Err("the bf16 copies are not the updated weights rounded".into());
    }
    let casts = "autocast's casts";
    agrees((&plain.losses, &plain.flat), (&plain2.losses, &plain2.flat), (&with.losses, &with.flat), casts)
}

/// The model the training checks run: gpt-125m's widths with 2 layers.
fn small_gpt() -> crate::model::GptConfig {
    crate::model::GptConfig { n_layer: 2, ..crate::model::preset("gpt-125m").expect("a preset") }
}

/// Three training steps on `batches` (one step's micro-batches) at a fixed learning rate; their losses.
fn three_steps(
    model: &mut crate::model::Gpt,
    opt: &mut AdamW,
    shard: &crate::model::optim::ShardLayout,
    comm: &mut dyn Communicator,
    batches: &[crate::data::Batch],
) -> Result<Vec<f64>, String> {
    (0..3)
        .map(|_| {
            let out = crate::train::step::train_step(model, opt, shard, comm, batches, 1e-3, 1.0);
            Ok(out.map_err(|e| e.to_string())?.loss.double_value(&[]))
        })
        .collect()
}

/// Whether a variant's losses and weights (`ours`) are the reference's (`plain`, run twice: `again`): bit for
/// bit where the reference's two runs agree bit for bit (a deterministic GPU), else within 4 times their
/// spread (attention's backward adds in an order that varies from run to run). `what` names the reference.
fn agrees(
    plain: (&[f64], &Tensor),
    again: (&[f64], &Tensor),
    ours: (&[f64], &Tensor),
    what: &str,
) -> Result<String, String> {
    let spread = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f64, f64::max);
    if plain.0 == again.0 && plain.1.equal(again.1) {
        if plain.0 != ours.0 || !plain.1.equal(ours.1) {
            let d = max_abs(plain.1, ours.1);
            return Err(format!(
                "losses {:?} with {what}, {:?} here; weights differ by up to {d:.2e}, where two runs with {what} \
                 agree bit for bit",
                plain.0, ours.0
            ));
        }
        return Ok(format!("the same losses and weights, bit for bit, as with {what}"));
    }
    let (run_to_run, w_run_to_run) = (spread(plain.0, again.0), max_abs(plain.1, again.1));
    let (d, w_d) = (spread(plain.0, ours.0), max_abs(plain.1, ours.1));
    if d > 4.0 * run_to_run.max(1e-7) || w_d > 4.0 * w_run_to_run {
        return Err(format!(
            "{d:.2e} from {what} in loss and {w_d:.2e} in weights, where two runs with {what} differ by \
             {run_to_run:.2e} and {w_run_to_run:.2e}"
        ));
    }
    Ok(format!(
        "within the GPU's run-to-run spread of {what} (loss {d:.1e}, weights {w_d:.1e}; two runs with {what}: \
         {run_to_run:.1e}, {w_run_to_run:.1e})"
    ))
}

/// Training steps with activation recomputation ([`Gpt::recompute`]) against the same steps keeping the
/// activations: the same losses and weights (backward recomputes the blocks on autograd's device thread, in
/// the forward's autocast state).
///
/// [`Gpt::recompute`]: crate::model::Gpt::recompute
fn recompute(device: Device) -> Result<String, String> {
    // On the CPU a shorter context: the same code paths in a second instead of a minute.
    let config = if device.is_cuda() { small_gpt() } else { crate::model::GptConfig { seq_len: 128, ..small_gpt() } };
    let batch = [synthetic_batch(&config, 2, device, 0)];
    let run = |recompute: bool| -> Result<(Vec<f64>, Tensor), String> {
        let mut model = crate::model::Gpt::new(config, device, 3);
        model.recompute = recompute;
        let shard = crate::model::optim::ShardLayout::new(0, 0, 1, model.params.layout.numel);
        let mut opt = AdamW::new(AdamWConfig::default(), &model.params.flat);
        let losses = three_steps(&mut model, &mut opt, &shard, &mut crate::comm::Solo::default(), &batch)?;
        Ok((losses, model.params.flat.shallow_clone()))
    };
    let ((kept, w), (again, w2), (ours, w3)) = (run(false)?, run(false)?, run(true)?);
    let what = "the activations kept";
    agrees((&kept, &w), (&again, &w2), (&ours, &w3), what).map(|m| format!("3 steps of a 2-layer GPT: {m}"))
}

/// Off CUDA the kernels cannot run, but NVRTC can still compile them (for an H100): a broken NVRTC install
/// shows here rather than on the GPU. Not applicable where NVRTC is absent (a CPU-only libtorch).
fn kernel_build() -> Check {
    let name = "CUDA kernels";
    match crate::shim::compile_kernels((9, 0)) {
        Ok(b) => Check {
            name,
            ok: Some(true),
            detail: format!(
                "cross-entropy, add+LayerNorm and AdamW compile for sm_90 with NVRTC {}.{} ({} bytes); they run on CUDA only",
                b.nvrtc.0, b.nvrtc.1, b.cubin_bytes
            ),
        },
        Err(e) if e.to_string().contains(NVRTC_MISSING) => {
            Check { name, ok: None, detail: "NVRTC is not installed; the kernels run on CUDA only".into() }
        }
        Err(e) => Check { name, ok: Some(false), detail: e.to_string() },
    }
}

/// libtorch's fused AdamW against the reference update, three steps.
fn fused_adamw(device: Device) -> Result<String, String> {
    let p0 = Tensor::randn([1 << 20], (Kind::Float, device));
    let (pf, pr) = (p0.copy(), p0.copy());
    let mut fused = AdamW::new(AdamWConfig::default(), &pf);
    let mut reference = AdamW::new(AdamWConfig::default(), &pr);
    reference.fused = false;
    for k in 0..3 {
        let g = Tensor::randn([1 << 20], (Kind::Float, device));
        fused.update(&pf, &g, 600_000, 1e-3 * (k + 1) as f64);
        reference.update(&pr, &g, 600_000, 1e-3 * (k + 1) as f64);
    }
    if !fused.fused {
        return Err("the fused kernel failed and fell back to the reference update".into());
    }
    let err = max_abs(&pf, &pr);
    if err > 1e-6 {
        return Err(format!("parameters differ from the reference update by {err:.2e}"));
    }
    Ok(format!("3 updates of 2^20 parameters equal the reference within {err:.1e}"))
}

fn memory(device: Device) -> Result<String, String> {
    crate::device::reset_peak_memory(device);
    let before = crate::device::peak_memory(device).ok_or("no allocator statistics")?;
    let big = Tensor::zeros([1 << 28], (Kind::Float, device)); // 1 GiB
    let peak = crate::device::peak_memory(device).ok_or("no allocator statistics")?;
    drop(big);
    crate::device::empty_cache();
    if peak < before + (1 << 30) {
        return Err(format!("peak allocated {peak} B after a 1 GiB allocation (was {before} B)"));
    }
    Ok(format!("a 1 GiB tensor raised the peak to {:.2} GiB; cache released", peak as f64 / (1u64 << 30) as f64))
}

/// A one-rank NCCL communicator: all-reduce (sum) of 256 MiB must leave every element as it was, and an
/// average likewise; the bandwidth is the copy rate NCCL reaches on this GPU.
fn nccl_all_reduce(device: Device) -> Result<String, String> {
    if !nccl::available() {
        return Err("libnccl.so cannot be loaded: put a libnccl.so symlink to the nvidia-nccl-cu13 wheel's \
                    libnccl.so.2 on LD_LIBRARY_PATH"
            .into());
    }
    let id = nccl::unique_id().map_err(|e| e.to_string())?;
    let mut comm = nccl::NcclComm::init(0, 1, &id, device, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let n = 64 << 20; // 64 Mi floats = 256 MiB
    let x = Tensor::randn([n], (Kind::Float, device));
    let mut y = x.copy();
    comm.all_reduce(&mut y, ReduceOp::Sum).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        comm.all_reduce(&mut y, ReduceOp::Avg).map_err(|e| e.to_string())?;
    }
    let secs = start.elapsed().as_secs_f64() / reps as f64;
    let err = max_abs(&x, &y);
    if err != 0.0 {
        return Err(format!("after all-reduce the tensor differs from its input by {err:e}"));
    }
    Ok(format!(
        "1 rank, 256 MiB fp32: exact after 11 all-reduces (sum, avg), {:.2} ms each ({:.0} GB/s algorithm bandwidth)",
        secs * 1e3,
        (n * 4) as f64 / secs / 1e9
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_check_without_nvrtc_does_not_apply_but_a_wrong_kernel_still_fails() {
        let failed = |detail: &str| Check { name: "k", ok: Some(false), detail: detail.into() };
        let missing = optional_kernel(failed(&format!("{NVRTC_MISSING} (tried a, b)")));
        assert_eq!(missing.ok, None, "{}", missing.detail);
        assert!(missing.detail.contains("NVRTC is not installed"));
        assert_eq!(optional_kernel(failed("loss 1.0 vs 2.0")).ok, Some(false));
        let fine = Check { name: "k", ok: Some(true), detail: "fine".into() };
        assert_eq!(optional_kernel(fine).ok, Some(true));
    }
}
