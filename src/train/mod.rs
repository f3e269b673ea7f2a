//! The single-process trainer: `load; while step < steps { data; step; maybe log; maybe eval }`.
//!
//! [`step::train_step`] is the pure compute; this module owns the loop around it: the data order, the
//! learning-rate schedule, reading results back, progress, metrics and evaluation.

pub mod report;
pub mod step;

use crate::config::RunConfig;
use crate::data::{Batch, CacheOptions, DataState, Prefetcher, SampleSet, StepShape, TokenShards};
use crate::error::{Error, Result};
use crate::model::{AdamW, Gpt};
use report::{EvalRecord, Reporter, SampleRecord, StepRecord};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Device;

/// How the loop presents itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainOptions {
    /// No progress bar or log lines (metrics are still written).
    pub quiet: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub first_loss: f64,
    pub final_loss: f64,
    pub final_eval_loss: Option<f64>,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub wall: Duration,
}

/// A model, its optimizer and its data, ready to train.
pub struct Trainer {
    pub cfg: RunConfig,
    pub device: Device,
    pub model: Gpt,
    pub opt: AdamW,
    /// The data stream's position and order (what a checkpoint stores).
    pub data: DataState,
    train: SampleSet,
    eval: SampleSet,
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
        if cfg.threads > 0 {
            tch::set_num_threads(cfg.threads as i32);
        }
        let device = crate::device::resolve(cfg.device)?;
        let cache = CacheOptions { dir: cfg.cache_dir.clone(), max_bytes: cfg.cache_bytes };
        let shards = Arc::new(TokenShards::open_at(&cfg.data_path, &cfg.storage_options, &cache)?);
        let (train, eval) = SampleSet::split(shards, cfg.model.seq_len, cfg.eval_fraction)?;
        let model = Gpt::new(cfg.model, device, cfg.seed);
        let opt = AdamW::new(cfg.adamw, &model.params.flat);
        let data = DataState::new(train.len, cfg.seed, cfg.block);
        Ok(Trainer { cfg, device, model, opt, data, train, eval })
    }

    /// How this process's share of each step is cut (one process: the whole batch).
    pub fn step_shape(&self) -> StepShape {
        StepShape { batch: self.cfg.batch_size, micro_batch: self.cfg.micro_batch, rank: 0, world: 1 }
    }

    /// The training samples (for accounting and tests).
    pub fn train_set(&self) -> &SampleSet {
        &self.train
    }

    /// The fixed evaluation batches: the first `eval_batches · micro_batch` held-out samples, in order.
    fn eval_batches(&self) -> Result<Vec<Batch>> {
        let mb = self.cfg.micro_batch.min(self.eval.len);
        let mut out = vec![];
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
        let dir = self.cfg.run_dir.clone();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let resolved = dir.join("config.resolved.toml");
        let text = toml::to_string_pretty(&self.cfg).expect("resolved config serializes");
        std::fs::write(&resolved, text).map_err(io_err(&resolved))?;

        let mut report = Reporter::new(&dir, self.cfg.steps, opts.quiet).map_err(io_err(&dir))?;
        let c = &self.cfg.model;
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
            "tessera: {} train / {} held-out samples; batch {} = {} x {} micro-batches; run dir {}",
            self.train.len,
            self.eval.len,
            self.cfg.batch_size,
            self.cfg.accum_steps,
            self.cfg.micro_batch,
            dir.display()
        ));

        let eval_batches = self.eval_batches()?;
        let first_step = self.data.position / self.cfg.batch_size;
        let mut prefetch = Prefetcher::start(
            self.train.clone(),
            self.data.clone(),
            self.step_shape(),
            first_step,
            self.cfg.steps,
            self.cfg.prefetch,
        );
        let tokens_per_step = self.cfg.batch_size * c.seq_len as u64;
        let flops_per_token = c.flops_per_token(c.seq_len);
        let start = Instant::now();
        let (mut window_start, mut window_steps, mut window_wait) = (Instant::now(), 0u64, Duration::ZERO);
        let (mut first_loss, mut final_loss, mut final_eval) = (None, f64::NAN, None);

        for step in first_step..self.cfg.steps {
            let (data, waited) = prefetch.next()?;
            debug_assert_eq!(data.step, step);
            window_wait += waited;
            let batches: Vec<Batch> = data.micro.iter().map(|m| m.to_device(self.device)).collect();
            let lr = self.cfg.schedule.lr_at(step);
            let out = step::train_step(&mut self.model, &mut self.opt, &batches, lr, self.cfg.grad_clip)?;
            window_steps += 1;
            let done = step + 1;
            self.data.seek(done * self.cfg.batch_size);
            report
                .samples(&SampleRecord {
                    step,
                    epoch: data.epoch,
                    first: step * self.cfg.batch_size,
                    count: self.cfg.batch_size,
                    digest: format!("{:016x}", data.digest),
                })
                .map_err(io_err(report.metrics_path()))?;
            let last = done == self.cfg.steps;

            if done % self.cfg.log_every == 0 || last || step == 0 {
                let loss = out.loss.double_value(&[]); // synchronises with the device
                let grad_norm = out.grad_norm.double_value(&[]);
                let secs = window_start.elapsed().as_secs_f64();
                let tokens_per_s = (window_steps * tokens_per_step) as f64 / secs;
                let mfu = matches!(self.device, Device::Cuda(_))
                    .then(|| tokens_per_s * flops_per_token / (self.cfg.peak_tflops * 1e12));
                first_loss.get_or_insert(loss);
                final_loss = loss;
                report
                    .step(&StepRecord {
                        step: done,
                        loss,
                        lr,
                        grad_norm,
                        tokens: done * tokens_per_step,
                        tokens_per_s,
                        mfu,
                        data_wait_ms: window_wait.as_secs_f64() * 1e3 / window_steps as f64,
                        epoch: data.epoch,
                        samples_digest: format!("{:016x}", data.digest),
                        elapsed_s: start.elapsed().as_secs_f64(),
                    })
                    .map_err(io_err(report.metrics_path()))?;
                (window_start, window_steps, window_wait) = (Instant::now(), 0, Duration::ZERO);
            }
            let eval_now = self.cfg.eval_every > 0 && done % self.cfg.eval_every == 0;
            if !eval_batches.is_empty() && (eval_now || last) {
                let eval_loss = step::eval_loss(&self.model, &eval_batches);
                final_eval = Some(eval_loss);
                report.eval(&EvalRecord { step: done, eval_loss }).map_err(io_err(report.metrics_path()))?;
                window_start = Instant::now(); // evaluation time is not training throughput
            }
        }
        report.finish();
        let wall = start.elapsed();
        let tokens = self.cfg.steps * tokens_per_step;
        Ok(Summary {
            steps: self.cfg.steps,
            first_loss: first_loss.unwrap_or(f64::NAN),
            final_loss,
            final_eval_loss: final_eval,
            tokens,
            tokens_per_s: tokens as f64 / wall.as_secs_f64(),
            wall,
        })
    }
}
