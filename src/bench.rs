//! `tessera bench`: the training step `train` and `launch` run, timed on synthetic tokens.
//!
//! One process, one device, a gang of one ([`Solo`]): the step is [`train_step`] itself (forward, backward,
//! gradient clipping, AdamW), so what is measured is what trains. Warm-up steps are excluded and the clock is
//! read only after the device has finished (`cuda::synchronize` before the first and after the last timed
//! step), so queued kernels cannot flatter the numbers.
//!
//! The [`Levers`] are the throughput techniques of issue 10, each switchable so that its gain is measured
//! rather than assumed; `--ladder` turns them on one at a time, largest predicted gain first, in one process
//! and on one model.
//!
//! The tokens are uniform random ids (the PyTorch baseline's choice): throughput does not depend on their
//! values, and a benchmark needs no corpus.

use crate::comm::Solo;
use crate::config::DeviceSpec;
use crate::data::Batch;
use crate::model::optim::ShardLayout;
use crate::model::{preset, preset_names, AdamW, AdamWConfig, Gpt, GptConfig};
use crate::train::step::{apply_alone, gradient_alone, train_step};
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What can go wrong before the benchmark runs (bad arguments, an unusable device or one too small for the
/// model: the user's to fix, exit code 2) or while it does (a failing step, out of memory included, or a file
/// that cannot be written: exit code 1). Nothing is retried.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("unknown model preset {0:?}; choose one of: {1}")]
    UnknownPreset(String, String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("the step failed: {0}")]
    Step(#[from] crate::train::step::StepError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}: {1}")]
    Io(std::path::PathBuf, std::io::Error),
    #[error("{0}")]
    Failed(String),
}

impl BenchError {
    /// The exit code `tessera bench` ends with (see the type's doc).
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::UnknownPreset(..) | BenchError::Invalid(_) | BenchError::Device(_) => 2,
            BenchError::Step(_) | BenchError::Torch(_) | BenchError::Io(..) | BenchError::Failed(_) => 1,
        }
    }
}

/// The throughput levers, each on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Levers {
    /// The shim's cross-entropy: fp32 loss, backward in the logits' dtype ([`Gpt::fused_cross_entropy`]).
    pub fused_cross_entropy: bool,
    /// libtorch's fused AdamW kernel over the flat buffer ([`AdamW::fused`]).
    pub fused_adamw: bool,
    /// Read the loss back every step (a host synchronisation per step, as a loop printing every step does).
    pub sync_every_step: bool,
    /// TF32 tensor cores for whatever matmuls remain in fp32.
    pub tf32: bool,
    /// Tessera's own cross-entropy kernels on bf16 CUDA logits ([`Gpt::ce_kernel`]); not yet part of
    /// [`Levers::ALL`], since no GPU has measured them.
    pub ce_kernel: bool,
    /// Residual adds fused into the LayerNorms after them, through Tessera's kernels on CUDA
    /// ([`Gpt::ln_kernel`]); like `ce_kernel`, not yet in [`Levers::ALL`].
    pub ln_kernel: bool,
    /// Tessera's own gradient-norm and AdamW kernels on CUDA ([`AdamW::kernel`]); like `ce_kernel`, not yet
    /// in [`Levers::ALL`].
    pub adamw_kernel: bool,
    /// bf16 copies of the matmul weights, written by the AdamW kernel, read by the matmuls instead of
    /// autocast's casts ([`Gpt::set_bf16_weights`]); CUDA only, and only a saving with `adamw_kernel`. Like
    /// `ce_kernel`, not yet in [`Levers::ALL`].
    pub bf16_weights: bool,
}

impl Levers {
    /// Everything on: what `train` and `launch` use.
    pub const ALL: Levers = Levers {
        fused_cross_entropy: true,
        fused_adamw: true,
        sync_every_step: false,
        tf32: true,
        ce_kernel: false,
        ln_kernel: false,
        adamw_kernel: false,
        bf16_weights: false,
    };

    /// Everything on, then Tessera's own kernels added: each alone, then all of them (`--kernels`): the A/B
    /// of the kernels in one process, on one model.
    pub fn kernels() -> Vec<(&'static str, Levers)> {
        let all = Levers::ALL;
        vec![
            ("", all),
            ("ce-kernel", Levers { ce_kernel: true, ..all }),
            ("ln-kernel", Levers { ln_kernel: true, ..all }),
            ("adamw-kernel", Levers { adamw_kernel: true, ..all }),
            ("adamw-kernel+bf16-weights", Levers { adamw_kernel: true, bf16_weights: true, ..all }),
            (
                "ce-kernel+ln-kernel+adamw-kernel+bf16-weights",
                Levers { ce_kernel: true, ln_kernel: true, adamw_kernel: true, bf16_weights: true, ..all },
            ),
        ]
    }

    /// The ladder: nothing, then each lever added in order of predicted gain.
    pub fn ladder() -> Vec<(&'static str, Levers)> {
        let none = Levers {
            fused_cross_entropy: false,
            fused_adamw: false,
            sync_every_step: true,
            tf32: false,
            ce_kernel: false,
            ln_kernel: false,
            adamw_kernel: false,
            bf16_weights: false,
        };
        let ce = Levers { fused_cross_entropy: true, ..none };
        let adam = Levers { fused_adamw: true, ..ce };
        let nosync = Levers { sync_every_step: false, ..adam };
        vec![
            ("plain", none),
            ("+fused-ce", ce),
            ("+fused-adamw", adam),
            ("+no-sync", nosync),
            ("+tf32", Levers { tf32: true, ..nosync }),
        ]
    }
}

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub preset: String,
    /// Sequences per step.
    pub batch: i64,
    /// Sequence length; default the preset's context.
    pub seq: Option<i64>,
    /// Attention heads; default the preset's (the PyTorch baseline's 760M has 16 where MosaicML's has 12).
    pub heads: Option<i64>,
    /// Timed steps, after `warmup` untimed ones.
    pub steps: u32,
    pub warmup: u32,
    pub device: DeviceSpec,
    /// Peak dense bf16 TFLOP/s for MFU; default from the GPU's name ([`crate::device::peak_bf16_tflops`]).
    pub peak_tflops: Option<f64>,
    /// libtorch's intra-op threads; by default as training's (`train.threads = 0`): one on the CPU, libtorch's
    /// default on CUDA hosts. [`BenchResult::device`] says how many ran on the CPU.
    pub threads: Option<u32>,
    pub seed: u64,
    /// Also time forward, backward and the optimizer apart ([`BenchResult::phases_ms`]).
    pub phases: bool,
    /// Recompute each block's activations in backward ([`Gpt::recompute`]).
    pub recompute: bool,
    /// Profile [`PROFILE_STEPS`] more steps with libtorch's profiler and write the traces and per-kernel
    /// summaries here ([`BenchResult::profile`]).
    pub profile: Option<std::path::PathBuf>,
}

/// Steps profiled per variant with `--profile` (after the timed ones, so the timing has no profiler in it).
pub const PROFILE_STEPS: u32 = 3;

/// One kernel's (on the CPU: one operator's) share of a profiled step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelTime {
    pub name: String,
    pub calls_per_step: f64,
    pub ms_per_step: f64,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub variant: String,
    pub preset: String,
    pub params: i64,
    pub batch: i64,
    pub seq: i64,
    pub device: String,
    pub levers: Levers,
    pub steps: u32,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub model_tflops: f64,
    /// Against `peak_tflops`; `None` when no peak is known (the CPU).
    pub mfu: Option<f64>,
    pub peak_tflops: Option<f64>,
    /// Peak bytes libtorch allocated during the timed steps (CUDA only).
    pub peak_mem_bytes: Option<u64>,
    /// Loss of the last timed step (a sanity check that the step trains).
    pub last_loss: f64,
    /// Mean milliseconds of forward, backward, the gradient norm and the optimizer update, from a second pass of steps with the
    /// device synchronised between phases (`--phases`): the same code as the step's, timed apart.
    pub phases_ms: Option<[f64; 4]>,
    /// With `--profile`: every kernel of the profiled steps (the GPU's kernels and copies on CUDA, the operators
    /// on the CPU), longest first, per step.
    pub profile: Option<Vec<KernelTime>>,
}

impl BenchResult {
    /// One line in the PyTorch baseline's `RESULT` format, so both can be read side by side.
    pub fn result_line(&self) -> String {
        let mfu = self.mfu.map_or("n/a".to_string(), |m| format!("{:.1}%", m * 100.0));
        let mem = self.peak_mem_bytes.map_or("n/a".to_string(), |b| format!("{:.1}", b as f64 / 1e9));
        let phases = self
            .phases_ms
            .map_or(String::new(), |[f, b, n, o]| format!(" fwd_ms={f:.1} bwd_ms={b:.1} norm_ms={n:.1} opt_ms={o:.1}"));
        format!(
            "RESULT impl=tessera{} size={} params={:.1}M batch={} seq={} step_ms={:.1} tok_per_s={:.0} \
             model_tflops={:.1} mfu={} peak_mem_gb={} loss={:.4}{} device={:?}",
            if self.variant.is_empty() { String::new() } else { format!("[{}]", self.variant) },
            self.preset,
            self.params as f64 / 1e6,
            self.batch,
            self.seq,
            self.step_ms,
            self.tokens_per_s,
            self.model_tflops,
            mfu,
            mem,
            self.last_loss,
            phases,
            self.device,
        )
    }
}

impl BenchResult {
    /// The `top` longest kernels of [`BenchResult::profile`], one `PROFILE` line each (the name last, as it
    /// may hold spaces), after a line with their number and, on CUDA, their total: the GPU's busy time per
    /// step (on the CPU operators nest, so their times do not add up).
    pub fn profile_lines(&self, top: usize) -> Vec<String> {
        let Some(kernels) = &self.profile else { return vec![] };
        let variant = if self.variant.is_empty() { String::new() } else { format!("[{}]", self.variant) };
        let total: f64 = kernels.iter().map(|k| k.ms_per_step).sum();
        let busy = if self.device == "cpu" { String::new() } else { format!(" total_ms_per_step={total:.2}") };
        let mut lines =
            vec![format!("PROFILE impl=tessera{variant} size={}{busy} kernels={}", self.preset, kernels.len())];
        lines.extend(kernels.iter().take(top).map(|k| {
            format!(
                "PROFILE impl=tessera{variant} size={} ms_per_step={:.3} share={:.1}% calls_per_step={} name={}",
                self.preset,
                k.ms_per_step,
                100.0 * k.ms_per_step / total.max(1e-12),
                k.calls_per_step,
                k.name
            )
        }));
        lines
    }
}

/// Most synthetic tokens a step (2^31: 16 GB of token ids on the host).
const MAX_TOKENS: i64 = 1 << 31;

/// The model shape a spec asks for.
///
/// # Errors
/// [`BenchError`] naming the bad argument.
pub fn model_config(spec: &BenchSpec) -> Result<GptConfig, BenchError> {
    let mut c = preset(&spec.preset)
        .ok_or_else(|| BenchError::UnknownPreset(spec.preset.clone(), preset_names().join(", ")))?;
    if let Some(t) = spec.seq {
        c.seq_len = t;
    }
    if let Some(h) = spec.heads {
        c.n_head = h;
    }
    c.validate().map_err(|e| BenchError::Invalid(format!("--seq/--heads give an unbuildable model: {e}")))?;
    if spec.batch < 1 || spec.batch as u64 > crate::config::MAX_BATCH {
        return Err(BenchError::Invalid(format!(
            "--batch {} must be from 1 to {}",
            spec.batch,
            crate::config::MAX_BATCH
        )));
    }
    let tokens = spec.batch * (c.seq_len + 1);
    if tokens > MAX_TOKENS {
        return Err(BenchError::Invalid(format!(
            "--batch {} x --seq {} is {tokens} tokens a step, more than tessera bench generates ({MAX_TOKENS})",
            spec.batch, c.seq_len
        )));
    }
    if spec.steps < 1 {
        return Err(BenchError::Invalid("--steps must be at least 1".into()));
    }
    Ok(c)
}

/// Runs the benchmark once per `(name, levers)` on one model (freshly initialised from `spec.seed`),
/// calling `on_result` after each.
///
/// # Errors
/// [`BenchError`]: a bad spec, an unusable device, or a failing step (for example out of memory).
pub fn run(
    spec: &BenchSpec,
    variants: &[(&str, Levers)],
    on_result: &mut dyn FnMut(&BenchResult),
) -> Result<Vec<BenchResult>, BenchError> {
    let config = model_config(spec)?;
    if let Some(dir) = &spec.profile {
        // Before any step: a bad directory is named at once, not after the benchmark has run.
        std::fs::create_dir_all(dir).map_err(|e| {
            BenchError::Invalid(format!("--profile {}: cannot make it a directory ({e})", dir.display()))
        })?;
    }
    let device = crate::device::resolve(spec.device)?;
    let (device_name, peak) = match (device, crate::device::describe(device)) {
        (_, Some((name, _))) => {
            let peak = spec.peak_tflops.or_else(|| crate::device::peak_bf16_tflops(&name));
            (name, peak)
        }
        (Device::Cuda(i), None) => (format!("cuda:{i}"), spec.peak_tflops),
        _ => ("cpu".to_string(), spec.peak_tflops),
    };
    // The step as training runs it: one intra-op thread on the CPU unless asked for more.
    match (spec.threads, device) {
        (Some(n), _) => tch::set_num_threads(n as i32),
        (None, Device::Cpu) => tch::set_num_threads(1),
        (None, _) => {}
    }
    let device_name = match (device, tch::get_num_threads()) {
        (Device::Cpu, 1) => format!("{device_name}, 1 thread"),
        (Device::Cpu, n) => format!("{device_name}, {n} threads"),
        _ => device_name,
    };
    crate::device::check_fits(&spec.preset, config.n_params() as u64, 1, device)?;
    let mut model = Gpt::new(config, device, spec.seed);
    model.recompute = spec.recompute;
    let mut opt = AdamW::new(AdamWConfig::default(), &model.params.flat);
    let shard = ShardLayout::new(0, 0, 1, model.params.layout.numel);
    let mut comm = Solo::default();
    let batch = synthetic_batch(&config, spec.batch, device, spec.seed);
    let micro = [batch];
    let tokens = (spec.batch * config.seq_len) as f64;
    let flops_per_token = config.flops_per_token(config.seq_len);
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };

    // Each variant's settings on the one model and optimizer.
    let apply = |model: &mut Gpt, opt: &mut AdamW, levers: Levers| -> Result<(), BenchError> {
        model.fused_cross_entropy = levers.fused_cross_entropy;
        model.ce_kernel = levers.ce_kernel;
        model.ln_kernel = levers.ln_kernel;
        opt.fused = levers.fused_adamw;
        opt.kernel = levers.adamw_kernel;
        model.set_bf16_weights(levers.bf16_weights);
        if matches!(device, Device::Cuda(_)) {
            crate::shim::set_tf32(levers.tf32)?;
        }
        Ok(())
    };
    let step = |model: &mut Gpt, opt: &mut AdamW, comm: &mut Solo, levers: Levers| -> Result<Tensor, BenchError> {
        let out = train_step(model, opt, &shard, comm, &micro, 3e-4, 1.0)?;
        if levers.sync_every_step {
            let _ = out.loss.double_value(&[]);
        }
        Ok(out.loss)
    };

    let mut results = vec![];
    for &(name, levers) in variants {
        apply(&mut model, &mut opt, levers)?;
        let mut last = None;
        for _ in 0..spec.warmup {
            last = Some(step(&mut model, &mut opt, &mut comm, levers)?);
        }
        sync();
        crate::device::reset_peak_memory(device);
        let start = Instant::now();
        for _ in 0..spec.steps {
            last = Some(step(&mut model, &mut opt, &mut comm, levers)?);
        }
        sync();
        let secs = start.elapsed().as_secs_f64() / spec.steps as f64;
        let peak_mem_bytes = crate::device::peak_memory(device);
        if levers.adamw_kernel && device.is_cuda() && !opt.kernel {
            // It fell back to libtorch's update (the warning above says why): this row would not measure it.
            return Err(BenchError::Failed(format!("variant {name:?}: Tessera's AdamW kernel failed")));
        }
        let phases_ms =
            if spec.phases { Some(time_phases(&mut model, &mut opt, &micro[0], spec.steps, sync)?) } else { None };
        let tokens_per_s = tokens / secs;
        let model_tflops = tokens_per_s * flops_per_token / 1e12;
        let result = BenchResult {
            variant: name.to_string(),
            preset: spec.preset.clone(),
            params: config.n_params(),
            batch: spec.batch,
            seq: config.seq_len,
            device: device_name.clone(),
            levers,
            steps: spec.steps,
            step_ms: secs * 1e3,
            tokens_per_s,
            model_tflops,
            mfu: peak.map(|p| model_tflops / p),
            peak_tflops: peak,
            peak_mem_bytes,
            last_loss: last.map_or(f64::NAN, |l| l.double_value(&[])),
            phases_ms,
            profile: None,
        };
        if spec.profile.is_none() {
            on_result(&result);
        }
        results.push(result);
    }
    // Profiled after every variant is timed: the profiler's GPU tracing (CUPTI) stays attached once started,
    // and is reported to slow what runs after it.
    if let Some(dir) = &spec.profile {
        for (&(name, levers), result) in variants.iter().zip(&mut results) {
            apply(&mut model, &mut opt, levers)?;
            let label = format!("{}-{}", spec.preset, if name.is_empty() { "all" } else { name });
            let mut one = || step(&mut model, &mut opt, &mut comm, levers).map(drop);
            result.profile = Some(profile_steps(dir, &label, device, &mut one, sync)?);
            on_result(result);
        }
    }
    Ok(results)
}

/// Runs [`PROFILE_STEPS`] steps under libtorch's profiler; the Chrome trace goes to `dir/trace-LABEL.json` and
/// the per-kernel totals to `dir/kernels-LABEL.tsv`, and come back per step, longest first.
fn profile_steps(
    dir: &std::path::Path,
    label: &str,
    device: Device,
    step: &mut dyn FnMut() -> Result<(), BenchError>,
    sync: impl Fn(),
) -> Result<Vec<KernelTime>, BenchError> {
    let (trace, summary) = (dir.join(format!("trace-{label}.json")), dir.join(format!("kernels-{label}.tsv")));
    let cuda = device.is_cuda();
    sync();
    crate::shim::profile_start(cuda)?;
    let ran = (0..PROFILE_STEPS).try_for_each(|_| step());
    sync();
    let stopped = crate::shim::profile_stop(&trace, &summary, cuda);
    ran?;
    stopped?;
    let text = std::fs::read_to_string(&summary).map_err(|e| BenchError::Io(summary.clone(), e))?;
    let steps = f64::from(PROFILE_STEPS);
    let mut kernels: Vec<KernelTime> = text
        .lines()
        .filter_map(|line| {
            let mut f = line.rsplitn(3, '\t');
            let (ns, calls, name) = (f.next()?.parse::<f64>().ok()?, f.next()?.parse::<f64>().ok()?, f.next()?);
            Some(KernelTime { name: name.to_string(), calls_per_step: calls / steps, ms_per_step: ns / 1e6 / steps })
        })
        .collect();
    kernels.sort_by(|a, b| b.ms_per_step.total_cmp(&a.ms_per_step).then_with(|| a.name.cmp(&b.name)));
    Ok(kernels)
}

/// Mean milliseconds of forward, backward, the gradient norm and the update over `steps` steps, synchronising `sync` between
/// them: the step's own pieces (the loss under autocast, backward, the two halves of
/// [`crate::train::step::update_alone`]) timed apart.
fn time_phases(
    model: &mut Gpt,
    opt: &mut AdamW,
    batch: &Batch,
    steps: u32,
    sync: impl Fn(),
) -> Result<[f64; 4], BenchError> {
    let autocast = matches!(model.params.flat.device(), Device::Cuda(_));
    let mut total = [0.0; 4];
    for _ in 0..steps {
        sync();
        let t0 = Instant::now();
        model.use_bf16_weights(autocast); // as the step does
        let loss = crate::shim::cuda_autocast(autocast, || model.f_loss(&batch.inputs, &batch.targets))?;
        sync();
        let t1 = Instant::now();
        let backward = loss.f_backward();
        model.use_bf16_weights(false);
        backward?;
        sync();
        let t2 = Instant::now();
        let (pieces, norm) = gradient_alone(model, opt, None)?;
        sync();
        let t3 = Instant::now();
        apply_alone(model, opt, pieces, &norm, 3e-4, 1.0);
        sync();
        let t4 = Instant::now();
        for (acc, (a, b)) in total.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)]) {
            *acc += (b - a).as_secs_f64() * 1e3 / steps as f64;
        }
    }
    Ok(total)
}

/// `batch` sequences of uniform random token ids, inputs and next-token targets, on `device`.
pub(crate) fn synthetic_batch(c: &GptConfig, batch: i64, device: Device, seed: u64) -> Batch {
    let _rng = crate::model::params::RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed as i64 ^ 0x5eed);
    let tokens = Tensor::randint(c.vocab_size, [batch, c.seq_len + 1], (Kind::Int64, Device::Cpu));
    Batch {
        inputs: tokens.narrow(1, 0, c.seq_len).contiguous().to_device(device),
        targets: tokens.narrow(1, 1, c.seq_len).contiguous().to_device(device),
        ids: (0..batch as u64).collect(),
    }
}
