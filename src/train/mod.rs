//! The trainer: `load; while step < steps { data; step; maybe log; maybe eval }`, for one rank of a gang of
//! any size (a single process is a gang of one with the [`Solo`] communicator).
//!
//! [`step::train_step`] is the compute; this module owns the loop around it: the data order, the
//! learning-rate schedule, reading results back, progress, metrics, evaluation, and the periodic check that
//! every rank's weights are still bit-identical. Rank 0 (the leader) writes the run directory.

pub mod checkpoint;
pub mod overlap;
pub mod report;
pub mod step;

use crate::actors::ckpt_writer::{Checkpointer, CkptEvent};
use crate::actors::spike_detector::SpikeHandle;
use crate::ckpt::store::CkptStore;
use crate::comm::{Communicator, Solo};
use crate::config::RunConfig;
use crate::data::{Batch, CacheOptions, DataState, Prefetcher, SampleSet, StepData, StepShape, TokenShards};
use crate::error::{Error, Result};
use crate::model::optim::ShardLayout;
use crate::model::{AdamW, Gpt};
use crate::spike::{Anomaly, DetectorState, StepStats, Verdict};
use checkpoint::CkptRecord;
use report::{EvalRecord, Reporter, SampleRecord, StepRecord};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use step::{OutOfMemory, StepOutcome};
use tch::Device;
use tch::{Kind, Tensor};

/// What a rank is doing, published by the training loop for heartbeats read on another thread.
#[derive(Debug, Default)]
pub struct Beat {
    /// Steps completed.
    pub step: AtomicU64,
    /// Collectives entered (the communicator stores it as each call starts).
    pub seq: Arc<AtomicU64>,
    /// A [`Phase`] as a number.
    pub phase: AtomicU8,
    /// Set on preemption: the next step tells every rank (it is agreed with the step's out-of-memory flags),
    /// and they checkpoint that step and stop.
    pub stop: AtomicBool,
}

/// Where in a step a rank is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Data = 1,
    /// Forward, backward, collectives (see the collective number) and the optimizer.
    Step = 2,
    Checkpoint = 3,
    Eval = 4,
    Done = 5,
}

impl Phase {
    pub fn name(code: u8) -> &'static str {
        ["starting", "data", "step", "checkpoint", "eval", "done"].get(code as usize).copied().unwrap_or("unknown")
    }
}

impl Beat {
    fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }
}

/// What the loop tells its caller as it goes (on the leader): every logged step, and every checkpoint
/// saved, committed, abandoned or skipped.
#[derive(Debug, Clone, Copy)]
pub enum LoopEvent<'a> {
    Step(&'a StepRecord),
    Checkpoint(&'a CkptRecord),
}

/// How the loop presents itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainOptions {
    /// No progress bar or log lines (metrics are still written).
    pub quiet: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The step the run has reached (`train.steps`, or where a preemption stopped it).
    pub steps: u64,
    pub first_loss: f64,
    pub final_loss: f64,
    pub final_eval_loss: Option<f64>,
    /// Times the loop read the steps' numbers back from the device (each a wait for it; see
    /// `train.read_every`).
    pub readings: u64,
}

/// A model, its optimizer and its data, ready to train.
pub struct Trainer {
    pub cfg: RunConfig,
    pub device: Device,
    pub model: Gpt,
    /// Optimizer state for this rank's shard of the parameters ([`ShardLayout`]).
    pub opt: AdamW,
    pub shard: ShardLayout,
    comm: Box<dyn Communicator>,
    /// How the gradient is cut for the all-reduce overlapped with backward (`train.bucket_mb`), if at all.
    buckets: Option<overlap::Buckets>,
    /// The step and checkpoint this trainer resumed from, if any.
    pub resumed_from: Option<(u64, String)>,
    /// Checkpoints passed over while resuming because they did not verify.
    pub skipped_checkpoints: Vec<(u64, String)>,
    /// Where checkpoints go.
    store: Arc<CkptStore>,
    /// This rank's checkpoint writer, started at the first checkpoint.
    ckpt: Option<Checkpointer>,
    /// Host copies of the state a checkpoint saves, reused from one checkpoint to the next.
    host: Vec<(String, Tensor)>,
    /// What this rank is doing, for heartbeats.
    beat: Arc<Beat>,
    /// The data stream's position and order (what a checkpoint stores).
    pub data: DataState,
    train: SampleSet,
    eval: SampleSet,
    /// The corpus's fingerprint ([`crate::data::shards::ShardIndex::digest`]), recorded in checkpoints.
    corpus: String,
    /// The leader's spike detector (when `spike.enabled`).
    spike: Option<SpikeHandle>,
    /// The detector's state from the checkpoint resumed from.
    detector_state: Option<DetectorState>,
    /// A lowered learning rate after repeated spikes: the multiplier, and the step it lasts until.
    lr_scale: Option<(f64, u64)>,
    /// Samples per forward/backward on this rank now: `cfg.micro_batch`, or with `micro_batch = "auto"` the
    /// rank's share of the batch (or the size a resumed checkpoint had come to), halved at every out of memory.
    micro_batch: u64,
}

/// A step taken whose numbers are still on the device.
struct Unread {
    step: u64,
    epoch: u64,
    /// This rank's sample digest.
    digest: u64,
    /// [`step::StepOutput::numbers`].
    numbers: Tensor,
}

/// A step's numbers read back and gathered: every rank's, as every rank sees them.
struct Read {
    step: u64,
    epoch: u64,
    /// The step's global sample digest.
    digest: u64,
    loss: f64,
    grad_norm: f64,
    rank_loss: Vec<f64>,
    rank_grad_norm: Vec<f64>,
}

/// The micro-batch to retry a step with after every rank agreed it ran out of memory at `current`: half of
/// it with `micro_batch = "auto"` (rounded down; the last micro-batch of a rank's share may then be shorter),
/// `None` when there is nothing to retry: a fixed micro-batch (the recipe does not change silently) or 1.
pub fn next_micro_batch(current: u64, auto: bool) -> Option<u64> {
    (auto && current > 1).then_some(current / 2)
}

/// The error that ends a run when out of memory cannot be retried (see [`next_micro_batch`]).
fn out_of_memory_error(oom: &OutOfMemory, step: u64, micro_batch: u64, auto: bool) -> Error {
    let advice = if auto {
        format!(
            "micro_batch {micro_batch} is the smallest there is: shard the optimizer state and gradients \
             (train.zero = 2, over more ranks), or use a smaller model or a shorter model.seq_len"
        )
    } else {
        format!(
            "with train.micro_batch = {micro_batch} (fixed): set train.micro_batch = \"auto\" to halve it on out of \
             memory, or a smaller divisor of each rank's share of the batch"
        )
    };
    Error::Torch(tch::TchError::Torch(format!("{oom} at step {step}; {advice}")))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

impl Trainer {
    /// Opens the corpus, picks the device, and builds a freshly initialised model from `cfg.seed`.
    ///
    /// # Errors
    /// Data errors (missing or corrupt shards, corpus too small) and device errors.
    pub fn new(cfg: RunConfig) -> Result<Self> {
        Self::with_comm(cfg, Box::new(Solo::default()))
    }

    /// As [`Trainer::new`], as one rank of the gang `comm` connects. Every rank builds the same initial
    /// weights from the same seed, so no broadcast is needed (the first weight check verifies it).
    ///
    /// # Errors
    /// As [`Trainer::new`], and [`Error::Config`] if the batch does not divide over the ranks.
    pub fn with_comm(cfg: RunConfig, comm: Box<dyn Communicator>) -> Result<Self> {
        let world = comm.world() as u64;
        cfg.check_world(world)?;
        let micro_batch = cfg.micro_batch_for(world);
        let device = crate::device::resolve(cfg.device)?;
        // On the CPU, libtorch's multi-threaded kernels were measured to give results that differ between
        // processes in the last bits (a resumed run, or two replicas, drifting apart), so a CPU rank computes
        // on one intra-op thread unless `train.threads` asks for more; see `TrainSection::threads`.
        let threads = match (cfg.threads, device) {
            (0, Device::Cpu) => 1,
            (n, _) => n,
        };
        if threads > 0 {
            tch::set_num_threads(threads as i32);
        }
        let cache = CacheOptions { dir: cfg.cache_dir.clone(), max_bytes: cfg.cache_bytes };
        let shards = Arc::new(TokenShards::open_at(&cfg.data_path, &cfg.storage_options, &cache)?);
        let corpus = shards.index.digest();
        let (train, eval) = SampleSet::split(shards, cfg.model.seq_len, cfg.eval_fraction)?;
        let optimizer_shards = if cfg.zero > 0 { comm.world() as u64 } else { 1 };
        let resized = if crate::model::config::preset(&cfg.preset) == Some(cfg.model) { "" } else { "a resized " };
        let name = format!("{resized}{}", cfg.preset);
        crate::device::check_fits(&name, cfg.model.n_params() as u64, optimizer_shards, device)?;
        let mut model = Gpt::new(cfg.model, device, cfg.seed);
        model.recompute = cfg.recompute;
        let shard = ShardLayout::new(cfg.zero, comm.rank(), comm.world(), model.params.layout.numel);
        let mut opt = AdamW::new(cfg.adamw, &Tensor::zeros([shard.len], (Kind::Float, device)));
        if cfg.kernels {
            // Each applies on CUDA only.
            (model.ce_kernel, model.ln_kernel, opt.kernel) = (true, true, true);
            if device.is_cuda() {
                model.set_bf16_weights(true);
            }
        }
        let data = DataState::new(train.len, cfg.seed, cfg.block);
        let store = Arc::new(CkptStore::open(&cfg.checkpoint.dir, &cfg.checkpoint.storage_options)?);
        if comm.rank() == 0 {
            // Before any writer of this run exists: leftovers of interrupted saves go.
            for name in store.cleanup()? {
                crate::say!("tessera: removed {}, left by an interrupted checkpoint", store.describe(&name));
            }
        }
        let mut trainer = Trainer {
            cfg,
            device,
            model,
            opt,
            shard,
            comm,
            data,
            train,
            eval,
            corpus,
            resumed_from: None,
            skipped_checkpoints: vec![],
            store: store.clone(),
            ckpt: None,
            host: vec![],
            beat: Arc::new(Beat::default()),
            spike: None,
            detector_state: None,
            lr_scale: None,
            micro_batch,
            buckets: None,
        };
        if trainer.cfg.bucket_elems > 0 {
            trainer.buckets = Some(overlap::Buckets::new(&trainer.model.params.layout, trainer.cfg.bucket_elems));
        }
        trainer.skipped_checkpoints = trainer.resume(&store)?;
        if trainer.is_leader() && trainer.cfg.spike.enabled {
            let handle = SpikeHandle::start(trainer.cfg.spike.detector(), trainer.detector_state.take())
                .map_err(io_err(&trainer.cfg.run_dir))?;
            trainer.spike = Some(handle);
        }
        Ok(trainer)
    }

    /// Publishes this rank's progress to `beat` (shared with whoever sends heartbeats).
    pub fn set_beat(&mut self, beat: Arc<Beat>) {
        self.comm.watch(beat.seq.clone());
        self.beat = beat;
    }

    /// Records and shows what became of checkpoints.
    fn report_checkpoints(
        &self,
        report: &mut Reporter,
        events: &[CkptEvent],
        on_event: &mut dyn FnMut(LoopEvent),
    ) -> Result<()> {
        for (record, line) in events.iter().filter_map(CkptRecord::of_event) {
            report.event(&record).map_err(io_err(report.metrics_path()))?;
            if self.is_leader() {
                on_event(LoopEvent::Checkpoint(&record));
            }
            if self.is_leader() {
                report.println(&line);
            } else {
                crate::say!("{line}"); // a non-leader has no reporter; its own write failures still need saying
            }
        }
        Ok(())
    }

    /// How this rank's share of each step is cut.
    pub fn step_shape(&self) -> StepShape {
        StepShape {
            batch: self.cfg.batch_size,
            micro_batch: self.micro_batch,
            rank: self.comm.rank() as u64,
            world: self.comm.world() as u64,
        }
    }

    /// Samples per forward/backward on this rank now (with `micro_batch = "auto"`, what out of memory has
    /// left of the rank's share).
    pub fn micro_batch(&self) -> u64 {
        self.micro_batch
    }

    /// This rank's share of the global batch.
    fn rank_share(&self) -> u64 {
        self.cfg.batch_size / self.comm.world() as u64
    }

    /// Rank 0 writes the run directory and reports progress.
    pub fn is_leader(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Reads the numbers of the `unread` steps back from the device (one wait for it) and, with several
    /// ranks, gathers every rank's sample digests and local numbers in one collective. The digests sum
    /// (wrapping) to each step's global digest; the local numbers let the spike detector tell a faulty rank
    /// from the gang.
    fn read_back(&mut self, unread: &[Unread]) -> Result<Vec<Read>> {
        let numbers: Vec<f64> = if unread.is_empty() {
            vec![]
        } else {
            let all = Tensor::cat(&unread.iter().map(|u| u.numbers.shallow_clone()).collect::<Vec<_>>(), 0);
            Vec::<f64>::try_from(&all.to_device(tch::Device::Cpu)).expect("fp64 tensor")
        };
        let mut read: Vec<Read> = unread
            .iter()
            .zip(numbers.chunks(4))
            .map(|(u, n)| Read {
                step: u.step,
                epoch: u.epoch,
                digest: u.digest,
                loss: n[0],
                grad_norm: n[1],
                rank_loss: vec![n[2]],
                rank_grad_norm: vec![n[3]],
            })
            .collect();
        if self.comm.world() == 1 || read.is_empty() {
            return Ok(read);
        }
        const K: usize = 3;
        let mine: Vec<i64> = read
            .iter()
            .flat_map(|r| [r.digest as i64, r.rank_loss[0].to_bits() as i64, r.rank_grad_norm[0].to_bits() as i64])
            .collect();
        // On the communicator's device: NCCL only moves CUDA tensors.
        let t = Tensor::from_slice(&mine).to_device(self.device);
        let per_rank = K * read.len();
        let mut all = Tensor::zeros([(per_rank * self.comm.world()) as i64], (Kind::Int64, self.device));
        self.comm.all_gather(&t, &mut all).map_err(step::StepError::from)?;
        let parts: Vec<i64> = Vec::<i64>::try_from(&all.to_device(tch::Device::Cpu)).expect("int64 tensor");
        for (i, r) in read.iter_mut().enumerate() {
            let of_step = |rank: usize| &parts[rank * per_rank + i * K..rank * per_rank + (i + 1) * K];
            let ranks = (0..self.comm.world()).map(of_step);
            r.digest = ranks.clone().fold(0u64, |acc, p| acc.wrapping_add(p[0] as u64));
            r.rank_loss = ranks.clone().map(|p| f64::from_bits(p[1] as u64)).collect();
            r.rank_grad_norm = ranks.map(|p| f64::from_bits(p[2] as u64)).collect();
        }
        Ok(read)
    }

    /// The learning rate of 0-based step `step`: the schedule's, lowered after repeated spikes, and scaled
    /// when a chaos test injects a bad one.
    fn lr_at(&self, step: u64) -> f64 {
        let mut lr = self.cfg.schedule.lr_at(step);
        if let Some((scale, _)) = self.lr_scale.filter(|&(_, until)| step < until) {
            lr *= scale;
        }
        if crate::chaos::any_armed() {
            if let Some(f) = crate::chaos::factor(&format!("train.lr.step{step}")) {
                crate::say!("tessera: chaos: learning rate of step {step} multiplied by {f}");
                lr *= f;
            }
        }
        lr
    }

    /// Faults a chaos test injects at the start of step `step` on this rank: a kill, a hang or a stall
    /// (`train.step.rankR.stepS`), dropped connections (`train.break.…`), the launcher killed (rank 0).
    fn inject_at_step(&mut self, step: u64) -> Result<()> {
        let rank = self.comm.rank();
        crate::chaos::failpoint(&format!("train.step.rank{rank}.step{step}"))
            .map_err(|source| Error::Io { path: "failpoint".into(), source })?;
        if crate::chaos::fired(&format!("train.break.rank{rank}.step{step}")) {
            crate::say!("tessera: chaos: rank {rank} drops its connections at step {step}");
            self.comm.sever();
        }
        if self.is_leader() && crate::chaos::fired(&format!("train.kill_launcher.step{step}")) {
            crate::say!("tessera: chaos: killing the launcher at step {step}");
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(libc::getppid(), libc::SIGKILL) };
        }
        Ok(())
    }

    /// Faults a chaos test injects into step `step` on this rank.
    fn step_faults(&self, step: u64) -> step::StepFaults {
        if !crate::chaos::any_armed() {
            return step::StepFaults::default();
        }
        let rank = self.comm.rank();
        let grad_scale = crate::chaos::factor(&format!("train.grad.rank{rank}.step{step}"));
        if let Some(f) = grad_scale {
            crate::say!("tessera: chaos: rank {rank}'s gradient at step {step} multiplied by {f}");
        }
        let name = format!("train.oom.rank{rank}.step{step}");
        let out_of_memory = match crate::chaos::fire(&name) {
            Some(crate::chaos::Action::Error) => {
                crate::say!("tessera: chaos: rank {rank} runs out of memory at step {step}");
                true
            }
            Some(other) => {
                crate::say!("tessera: failpoint {name}: {other:?} is not `error`; ignored");
                false
            }
            None => false,
        };
        step::StepFaults { grad_scale, out_of_memory }
    }

    /// Writes the weights, by their Hugging Face GPT-2 names, to a safetensors file.
    ///
    /// # Errors
    /// [`Error::Torch`] if the file cannot be written.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        let named: Vec<(String, Tensor)> =
            self.model.params.named().map(|(n, t)| (n.to_string(), t.detach().to_device(tch::Device::Cpu))).collect();
        Tensor::write_safetensors(&named, path)?;
        Ok(())
    }

    /// Checks that every rank holds bit-identical weights, by comparing a checksum of the flat buffer.
    ///
    /// # Errors
    /// [`Error::Diverged`] naming the ranks that differ from rank 0; communicator errors.
    pub fn check_replicas(&mut self, step: u64) -> Result<()> {
        let flat = self.model.params.flat.to_device(tch::Device::Cpu).contiguous();
        let mut bytes = vec![0f32; flat.numel()];
        flat.copy_data(&mut bytes, flat.numel());
        // SAFETY: viewing an initialised f32 slice as bytes.
        let raw = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const u8, bytes.len() * 4) };
        let sum = xxhash_rust::xxh3::xxh3_64(raw) as i64;

        let mine = Tensor::from_slice(&[sum]).to_device(self.device);
        let mut all = Tensor::zeros([self.comm.world() as i64], (Kind::Int64, self.device));
        self.comm.all_gather(&mine, &mut all).map_err(step::StepError::from)?;
        let sums: Vec<i64> = Vec::<i64>::try_from(&all.to_device(tch::Device::Cpu)).expect("int64 tensor");
        let differ: Vec<usize> = (0..sums.len()).filter(|&r| sums[r] != sums[0]).collect();
        if !differ.is_empty() {
            return Err(Error::Diverged { step, ranks: differ });
        }
        Ok(())
    }

    /// The training samples (for accounting and tests).
    pub fn train_set(&self) -> &SampleSet {
        &self.train
    }

    /// The fixed evaluation batches: the first `eval_batches · micro_batch` held-out samples, in order (with
    /// `micro_batch = "auto"`, batches of a rank's share of the batch, whatever size training has come to).
    fn eval_batches(&self) -> Result<Vec<Batch>> {
        let configured = self.cfg.micro_batch_for(self.comm.world() as u64);
        let mb = configured.min(self.eval.len);
        let mut out = vec![];
        if mb == 0 {
            return Ok(out); // no held-out set (data.eval_fraction = 0): nothing to evaluate
        }
        for start in (0..self.cfg.eval_batches).map(|k| k * mb).take_while(|&s| s + mb <= self.eval.len) {
            out.push(self.eval.batch(&(start..start + mb).collect::<Vec<_>>(), self.device)?);
        }
        Ok(out)
    }

    /// Trains for the configured number of steps, writing the resolved config and metrics to the run
    /// directory.
    ///
    /// # Errors
    /// I/O errors on the run directory, and libtorch errors from a step.
    pub fn run(&mut self, opts: TrainOptions) -> Result<Summary> {
        self.run_with(opts, &mut |_| {})
    }

    /// [`Trainer::run`], calling `on_event` with every logged step and checkpoint event (on the leader).
    ///
    /// # Errors
    /// As [`Trainer::run`], plus communicator errors and [`Error::Diverged`].
    pub fn run_with(&mut self, opts: TrainOptions, on_event: &mut dyn FnMut(LoopEvent)) -> Result<Summary> {
        let dir = self.cfg.run_dir.clone();
        let leader = self.is_leader();
        if leader {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let resolved = dir.join("config.resolved.toml");
            let text = toml::to_string_pretty(&self.cfg).expect("resolved config serializes");
            std::fs::write(&resolved, text).map_err(io_err(&resolved))?;
        }
        let mut report = if leader {
            Reporter::new(&dir, self.cfg.steps, opts.quiet).map_err(io_err(&dir))?
        } else {
            Reporter::disabled()
        };
        self.announce(&mut report)?;
        self.check_replicas(0)?;

        let eval_batches = self.eval_batches()?;
        let first_step = self.data.position / self.cfg.batch_size;
        let mut prefetch = self.prefetcher(first_step);
        let c = self.cfg.model;
        let tokens_per_step = self.cfg.batch_size * c.seq_len as u64;
        let flops_per_token = c.flops_per_token(c.seq_len);
        let start = Instant::now();
        let cadence = Cadence::of(&self.cfg, self.resumed_from.is_some());
        let mut window = Window::new();
        let (mut first_loss, mut final_loss, mut final_eval) = (None, f64::NAN, None);
        let mut stopped_at = None;
        let (mut unread, mut readings): (Vec<Unread>, u64) = (vec![], 0);

        for step in first_step..self.cfg.steps {
            // Out of the last step's checkpoint or evaluation: the gang gives ranks busy with storage longer
            // before it counts them as hung, and this rank is not.
            self.beat.set(Phase::Step);
            if crate::chaos::any_armed() {
                self.inject_at_step(step)?;
            }
            self.beat.set(Phase::Data);
            let (mut data, waited) = prefetch.next_step()?;
            self.beat.set(Phase::Step);
            debug_assert_eq!(data.step, step);
            window.wait += waited;
            let lr = self.lr_at(step);
            let out = self.step_until_it_fits(step, lr, &mut data, &mut prefetch, &mut report, &mut window)?;
            window.steps += 1;
            let done = step + 1;
            if self.data.past_epoch(done * self.cfg.batch_size) {
                report.epoch_ended(&self.data).map_err(io_err(report.metrics_path()))?;
            }
            self.data.seek(done * self.cfg.batch_size);
            // The step's numbers stay on the device until the next reading: no host synchronisation per step.
            unread.push(Unread { step, epoch: data.epoch, digest: data.digest, numbers: out.numbers() });
            let stop = out.stop;
            let due = cadence.after(done, stop, unread.len() as u64);
            if due.read {
                let read = self.read_back(&unread)?;
                unread.clear();
                readings += 1;
                self.judge(&read, done, &mut report, on_event)?;
                if due.check {
                    self.check_replicas(done)?;
                }
                if due.log {
                    let now = read.last().expect("a reading holds this step");
                    let tokens_per_s = window.tokens_per_s(tokens_per_step);
                    let mfu = matches!(self.device, Device::Cuda(_))
                        .then(|| tokens_per_s * flops_per_token / (self.cfg.peak_tflops * 1e12));
                    first_loss.get_or_insert(now.loss);
                    final_loss = now.loss;
                    let record = StepRecord {
                        step: done,
                        loss: now.loss,
                        lr,
                        grad_norm: now.grad_norm,
                        tokens: done * tokens_per_step,
                        tokens_per_s,
                        mfu,
                        data_wait_ms: window.wait.as_secs_f64() * 1e3 / window.steps as f64,
                        micro_batch: self.micro_batch,
                        epoch: data.epoch,
                        samples_digest: format!("{:016x}", now.digest),
                        elapsed_s: start.elapsed().as_secs_f64(),
                    };
                    report.step(&record).map_err(io_err(report.metrics_path()))?;
                    if leader {
                        on_event(LoopEvent::Step(&record));
                    }
                    window = Window::new();
                }
            }
            if leader && !eval_batches.is_empty() && (due.eval || due.last) {
                self.beat.set(Phase::Eval);
                let eval_loss = step::eval_loss(&self.model, &eval_batches, self.micro_batch as i64)?;
                final_eval = Some(eval_loss);
                report.eval(&EvalRecord { step: done, eval_loss }).map_err(io_err(report.metrics_path()))?;
                window.start = Instant::now(); // evaluation time is not training throughput
            }
            // The checkpoint comes last, after this step's records are on file: a run killed after the commit
            // resumes at the next step with nothing of this one missing from its ledgers.
            let mut events = self.checkpoint_events();
            self.beat.step.store(done, Ordering::Relaxed);
            // Preemption (`stop`, seen by every rank at this same step) takes a checkpoint of exactly this step,
            // committed before the process exits.
            let preempt = stop && !due.last;
            // A store too slow for the cadence: rather than stall every rank behind the previous write, this
            // checkpoint is not taken (agreed by all ranks). A preemption's and the last step's always are.
            let (busy, waited) = if due.checkpoint && !preempt && !due.last {
                self.beat.set(Phase::Checkpoint);
                self.checkpoint_in_flight(&mut events)?
            } else {
                (false, Duration::ZERO)
            };
            if busy {
                window.start += waited; // reported as the stall, not as lost throughput
                let record = CkptRecord {
                    stall_ms: Some(waited.as_secs_f64() * 1e3),
                    detail: Some("the previous checkpoint was still being written".into()),
                    ..CkptRecord::new("busy", done)
                };
                report.event(&record).map_err(io_err(report.metrics_path()))?;
                if leader {
                    on_event(LoopEvent::Checkpoint(&record));
                    report.println(&format!(
                        "tessera: warning: no checkpoint after step {done}: the previous one is still being written \
                         (the store is slow or does not answer); training goes on"
                    ));
                }
            } else if preempt || due.checkpoint {
                self.beat.set(Phase::Checkpoint);
                report.flush().map_err(io_err(report.metrics_path()))?;
                let (stall, more) = self.checkpoint(done)?;
                let stall = stall + waited;
                events.extend(more);
                let record = CkptRecord {
                    stall_ms: Some(stall.as_secs_f64() * 1e3),
                    async_write: Some(self.cfg.checkpoint.async_write),
                    ..CkptRecord::new("saved", done)
                };
                report.event(&record).map_err(io_err(report.metrics_path()))?;
                if leader {
                    on_event(LoopEvent::Checkpoint(&record));
                }
                window.start += stall; // the stall is reported on its own, not as lost throughput
            }
            self.report_checkpoints(&mut report, &events, on_event)?;
            if preempt {
                report.println(&format!("tessera: stopping after step {done}, as asked (preemption)"));
                stopped_at = Some(done);
                break;
            }
        }
        self.beat.set(Phase::Checkpoint);
        let events = self.finish_checkpoints();
        self.report_checkpoints(&mut report, &events, on_event)?;
        report.finish();
        let steps = stopped_at.unwrap_or(self.cfg.steps);
        if leader && stopped_at.is_none() {
            self.save_weights(&dir.join("model.safetensors"))?;
            // The final order of the data, for checking what was consumed (`tessera chaos`).
            let path = dir.join("data_state.json");
            let text = serde_json::to_string(&self.data).expect("data state serializes");
            std::fs::write(&path, text).map_err(io_err(&path))?;
        }
        Ok(Summary {
            steps,
            first_loss: first_loss.unwrap_or(f64::NAN),
            final_loss,
            final_eval_loss: final_eval,
            readings,
        })
    }

    /// The run's opening lines (model, data and batch, optimizer state, where it resumed from) and the
    /// checkpoints passed over on the way.
    fn announce(&self, report: &mut Reporter) -> Result<()> {
        let c = self.cfg.model;
        report.println(&format!(
            "tessera: {} ({} layers, d_model {}, {} heads, context {}, vocab {}) = {:.2}M parameters on {:?}",
            self.cfg.preset,
            c.n_layer,
            c.d_model,
            c.n_head,
            c.seq_len,
            c.vocab_size,
            c.n_params() as f64 / 1e6,
            self.device
        ));
        report.println(&format!(
            "tessera: {} train / {} held-out samples; batch {} = {} rank(s) x {} x {} micro-batches{}; run dir {}",
            self.train.len,
            self.eval.len,
            self.cfg.batch_size,
            self.comm.world(),
            self.rank_share().div_ceil(self.micro_batch),
            self.micro_batch,
            if self.cfg.micro_batch_auto { " (micro_batch auto: halved on out of memory)" } else { "" },
            self.cfg.run_dir.display()
        ));
        if self.cfg.batch_size > self.train.len {
            report.println(&format!(
                "tessera: warning: a batch of {} samples is more than an epoch of this corpus ({} training samples): \
                 every step sees samples more than once; a larger corpus or a smaller train.batch_size fits better",
                self.cfg.batch_size, self.train.len
            ));
        }
        let state_bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let opt_bytes = state_bytes(&self.opt.exp_avg) + state_bytes(&self.opt.exp_avg_sq);
        let full_bytes = 2 * self.shard.numel as usize * 4;
        report.println(&format!(
            "tessera: ZeRO-{}: AdamW state on this rank {:.2} MB of {:.2} MB unsharded ({:.1}%)",
            self.shard.zero,
            opt_bytes as f64 / 1e6,
            full_bytes as f64 / 1e6,
            100.0 * opt_bytes as f64 / full_bytes as f64
        ));
        if let Some((step, location)) = &self.resumed_from {
            report.println(&format!("tessera: resumed from {location} at step {step}"));
        }
        for (step, reason) in &self.skipped_checkpoints {
            let record = CkptRecord { detail: Some(reason.clone()), ..CkptRecord::new("skipped", *step) };
            report.event(&record).map_err(io_err(report.metrics_path()))?;
        }
        Ok(())
    }

    /// This rank's data for steps `first..`, prepared ahead on another thread in the current step shape.
    fn prefetcher(&self, first: u64) -> Prefetcher {
        let (train, data) = (self.train.clone(), self.data.clone());
        Prefetcher::start(train, data, self.step_shape(), first, self.cfg.steps, self.cfg.prefetch)
    }

    /// Takes step `step` on `data`. Should every rank agree that one ran out of memory, the step is taken
    /// again with half the micro-batch (`micro_batch = "auto"`): the same samples, cut anew, so none is
    /// skipped or counted twice; `data` and `prefetch` are then the new cut's. A fixed micro-batch, or one
    /// of 1, ends the run with advice on what to change instead (`out_of_memory_error`).
    fn step_until_it_fits(
        &mut self,
        step: u64,
        lr: f64,
        data: &mut StepData,
        prefetch: &mut Prefetcher,
        report: &mut Reporter,
        window: &mut Window,
    ) -> Result<step::StepOutput> {
        loop {
            let batches: Vec<Batch> = data.micro.iter().map(|m| m.to_device(self.device)).collect();
            let faults = self.step_faults(step);
            let outcome = step::try_step(
                &mut self.model,
                &mut self.opt,
                &self.shard,
                self.comm.as_mut(),
                &batches,
                lr,
                self.cfg.grad_clip,
                faults,
                self.buckets.as_ref(),
                self.beat.stop.load(Ordering::Relaxed),
            )
            .map_err(Error::from)?;
            let oom = match outcome {
                StepOutcome::Done(out) => return Ok(out),
                StepOutcome::OutOfMemory(oom) => oom,
            };
            drop(batches);
            let from = self.micro_batch;
            self.micro_batch = next_micro_batch(from, self.cfg.micro_batch_auto)
                .ok_or_else(|| out_of_memory_error(&oom, step, from, self.cfg.micro_batch_auto))?;
            crate::device::empty_cache();
            report.println(&format!(
                "tessera: {oom} at step {step}: micro_batch {from} -> {}, retrying the step",
                self.micro_batch
            ));
            let event = serde_json::json!({"micro_batch": {
                "step": step, "from": from, "to": self.micro_batch, "ranks": &oom.ranks,
            }});
            report.event(&event).map_err(io_err(report.metrics_path()))?;
            // The same samples cut anew: the prefetcher starts over at this step with the new shape.
            *prefetch = self.prefetcher(step);
            let (again, waited) = prefetch.next_step()?;
            window.wait += waited;
            assert_eq!(again.digest, data.digest, "step {step} cut anew must hold the same samples");
            *data = again;
        }
    }

    /// Judges the steps just read, in order: the spike detector sees each one's numbers, and a step's samples
    /// go on record once it has passed. A spike or a faulty rank stops the run here, with the checkpoints in
    /// flight finished, as [`Error::Anomaly`], for the supervisor to roll the gang back; `done` is the last
    /// step completed, for the heartbeat.
    fn judge(
        &mut self,
        read: &[Read],
        done: u64,
        report: &mut Reporter,
        on_event: &mut dyn FnMut(LoopEvent),
    ) -> Result<()> {
        for r in read {
            if let Some(spike) = &self.spike {
                let stats = StepStats {
                    step: r.step,
                    loss: r.loss,
                    grad_norm: r.grad_norm,
                    rank_loss: r.rank_loss.clone(),
                    rank_grad_norm: r.rank_grad_norm.clone(),
                };
                let anomaly = match spike.observe(stats) {
                    Some(Verdict::Spike(s)) => Some(Anomaly::Spike(s)),
                    Some(Verdict::RankFault(fault)) => {
                        Some(Anomaly::RankFault { fault, host: String::new(), device: String::new() })
                    }
                    Some(_) => None,
                    None => {
                        crate::say!("tessera: warning: the spike detector is gone; training goes on without it");
                        self.spike = None;
                        None
                    }
                };
                if let Some(a) = anomaly {
                    // This rank has completed every step read, not only the one the anomaly is at.
                    self.beat.step.store(done, Ordering::Relaxed);
                    report.println(&format!("tessera: {a}; stopping for a rollback"));
                    report.event(&serde_json::json!({"spike": &a})).map_err(io_err(report.metrics_path()))?;
                    let events = self.finish_checkpoints();
                    self.report_checkpoints(report, &events, on_event)?;
                    report.finish();
                    return Err(Error::Anomaly(Box::new(a)));
                }
            }
            report
                .samples(&SampleRecord {
                    step: r.step,
                    epoch: r.epoch,
                    first: r.step * self.cfg.batch_size,
                    count: self.cfg.batch_size,
                    digest: format!("{:016x}", r.digest),
                })
                .map_err(io_err(report.metrics_path()))?;
        }
        Ok(())
    }
}

/// How often things fall due, from the config.
#[derive(Debug, Clone, Copy)]
struct Cadence {
    steps: u64,
    log_every: u64,
    eval_every: u64,
    checkpoint_every: u64,
    /// Whether the last step is checkpointed too: in a run that checkpoints (`checkpoint_every`) or resumed
    /// from a checkpoint (a preemption's), so that the same command run again finds the run finished
    /// instead of training its last steps again, and a larger `train.steps` continues it.
    checkpoint_last: bool,
    check_every: u64,
    read_every: u64,
}

/// What falls due after a step: a pure function of the step, the config and the stop request the step
/// agreed on, so that every rank reads back, gathers and checks at the same steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Due {
    /// The run's last step.
    last: bool,
    /// A log line and a metrics record (also the first step, and the last).
    log: bool,
    /// An evaluation on the held-out batches (the last step evaluates too).
    eval: bool,
    /// A checkpoint.
    checkpoint: bool,
    /// The check that every rank's weights are bit-identical (also the last step).
    check: bool,
    /// Reading the waiting steps' numbers back from the device.
    read: bool,
}

impl Cadence {
    /// `resumed`: this run started from a checkpoint.
    fn of(cfg: &RunConfig, resumed: bool) -> Self {
        Cadence {
            steps: cfg.steps,
            log_every: cfg.log_every,
            eval_every: cfg.eval_every,
            checkpoint_every: cfg.checkpoint_every,
            checkpoint_last: cfg.checkpoint_every > 0 || resumed,
            check_every: cfg.check_every,
            read_every: cfg.read_every,
        }
    }

    /// What falls due once `done` steps (1-based) are complete, with `unread` steps' numbers (this one's
    /// included) still on the device. The numbers are read for anything that shows or depends on them (a
    /// checkpoint is written only after every step before it was judged), at a stop request (a preemption is
    /// acted on at once), and at the latest once `read_every` steps are waiting.
    fn after(&self, done: u64, stop: bool, unread: u64) -> Due {
        let every = |n: u64| n > 0 && done % n == 0;
        let last = done == self.steps;
        let mut due = Due {
            last,
            log: last || done == 1 || every(self.log_every),
            eval: every(self.eval_every),
            checkpoint: every(self.checkpoint_every) || (last && self.checkpoint_last),
            check: last || every(self.check_every),
            read: false,
        };
        due.read = due.log || due.eval || due.checkpoint || due.check || stop || unread >= self.read_every;
        due
    }
}

/// The steps and time since throughput was last logged.
struct Window {
    start: Instant,
    steps: u64,
    /// Time spent waiting for data.
    wait: Duration,
}

impl Window {
    fn new() -> Self {
        Window { start: Instant::now(), steps: 0, wait: Duration::ZERO }
    }

    fn tokens_per_s(&self, tokens_per_step: u64) -> f64 {
        (self.steps * tokens_per_step) as f64 / self.start.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cadence(steps: u64, log_every: u64, eval_every: u64, checkpoint_every: u64, check_every: u64) -> Cadence {
        Cadence {
            steps,
            log_every,
            eval_every,
            checkpoint_every,
            checkpoint_last: checkpoint_every > 0,
            check_every,
            read_every: 4,
        }
    }

    #[test]
    fn the_first_and_last_steps_log_and_the_last_also_checks_and_reads() {
        let c = cadence(20, 7, 0, 0, 0);
        assert_eq!(c.after(1, false, 1), Due { log: true, read: true, ..Due::default() });
        assert_eq!(c.after(2, false, 1), Due::default());
        assert_eq!(c.after(14, false, 1), Due { log: true, read: true, ..Due::default() });
        assert_eq!(c.after(20, false, 1), Due { last: true, log: true, check: true, read: true, ..Due::default() });
    }

    #[test]
    fn a_reading_falls_on_every_step_something_is_due_at_a_stop_and_every_read_every_steps() {
        let c = cadence(100, 10, 15, 12, 9);
        let mut unread = 0;
        let mut readings = 0;
        for done in 1..=100 {
            unread += 1;
            let stop = done == 31;
            let due = c.after(done, stop, unread);
            let needed = done == 1 || done == 100 || [10, 15, 12, 9].iter().any(|n| done % n == 0) || stop;
            assert!(!needed || due.read, "step {done}: {due:?} must read");
            assert!(due.read || unread < 4, "step {done}: {unread} steps unread");
            assert_eq!(due.eval, done % 15 == 0, "step {done}");
            assert_eq!(due.checkpoint, done % 12 == 0 || done == 100, "step {done}: and the last");
            if due.read {
                (unread, readings) = (0, readings + 1);
            }
        }
        assert!(readings < 60, "{readings} readings in 100 steps: not every step");
    }

    #[test]
    fn the_last_step_is_checkpointed_in_a_run_that_checkpoints_or_resumed_from_a_checkpoint() {
        assert!(cadence(20, 0, 0, 7, 0).after(20, false, 1).checkpoint, "checkpoint_every 7");
        assert!(!cadence(20, 0, 0, 0, 0).after(20, false, 1).checkpoint, "checkpoint_every 0: none");
        let resumed = Cadence { checkpoint_last: true, ..cadence(20, 0, 0, 0, 0) };
        assert!(resumed.after(20, false, 1).checkpoint, "resumed from a preemption's checkpoint");
        assert!(!resumed.after(19, false, 1).checkpoint);
    }

    #[test]
    fn an_interval_of_zero_means_never() {
        let c = cadence(10, 0, 0, 0, 0);
        for done in 2..10 {
            assert_eq!(c.after(done, false, 1), Due::default(), "step {done}");
        }
    }
}
