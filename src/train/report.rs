//! What a run shows and records: the progress bar (or plain log lines when stderr is not a terminal) and the
//! JSON-lines metrics file in the run directory.

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One metrics line for a training step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Optimizer steps completed.
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Over the steps since the previous record.
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation against the configured peak; CUDA only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Mean time per step spent waiting for data since the previous record.
    pub data_wait_ms: f64,
    /// Samples per forward/backward on each rank in this step (changes only with `micro_batch = "auto"`).
    pub micro_batch: u64,
    /// Epoch of this step's first sample.
    pub epoch: u64,
    /// Order-independent digest of this step's sample ids (`data::stream::digest`), for exactly-once
    /// accounting.
    pub samples_digest: String,
    pub elapsed_s: f64,
}

/// One metrics line for an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord {
    pub step: u64,
    pub eval_loss: f64,
}

/// Appends `record` as one JSON line to `path` and syncs it to disk: for the run directory's small ledgers
/// (`epochs.jsonl`, `skipped.jsonl`), written rarely and needed after a crash.
///
/// # Errors
/// I/O errors opening, writing or syncing the file.
pub(crate) fn append_synced<T: Serialize + ?Sized>(path: &Path, record: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(&line)?;
    f.sync_data()
}

/// Progress and metrics for one run.
pub struct Reporter {
    bar: ProgressBar,
    /// Plain lines instead of a bar when stderr is not a terminal (CI logs, `nohup`).
    plain: bool,
    quiet: bool,
    /// `None` on ranks other than the leader, which record nothing.
    metrics: Option<BufWriter<File>>,
    path: PathBuf,
    /// `samples.jsonl`: one [`SampleRecord`] per step, flushed with the metrics.
    samples: Option<BufWriter<File>>,
}

/// Which samples a step consumed, compactly: recomputable from the data state, so a checker can prove
/// exactly-once consumption (see `data::stream::digest`).
#[derive(Debug, Clone, Serialize)]
pub struct SampleRecord {
    /// The optimizer step (0-based) that consumed the samples.
    pub step: u64,
    pub epoch: u64,
    /// Global positions `[first, first + count)` of the stream.
    pub first: u64,
    pub count: u64,
    /// Order-independent digest of the sample ids, as 16 hex digits.
    pub digest: String,
}

impl Reporter {
    /// Opens `metrics.jsonl` in `run_dir` for appending and sets up the display for `steps` steps.
    ///
    /// # Errors
    /// I/O errors opening the metrics file.
    pub fn new(run_dir: &Path, steps: u64, quiet: bool) -> std::io::Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(steps) };
        bar.set_style(
            ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} | ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        let plain = bar.is_hidden() && !quiet;
        let samples = std::fs::OpenOptions::new().create(true).append(true).open(run_dir.join("samples.jsonl"))?;
        Ok(Reporter {
            bar,
            plain,
            quiet,
            metrics: Some(BufWriter::new(file)),
            path,
            samples: Some(BufWriter::new(samples)),
        })
    }

    /// A reporter that shows and records nothing (ranks other than the leader).
    pub fn disabled() -> Self {
        Reporter {
            bar: ProgressBar::hidden(),
            plain: false,
            quiet: true,
            metrics: None,
            path: PathBuf::new(),
            samples: None,
        }
    }

    /// Records the samples a step consumed (buffered; flushed with the next metrics line).
    ///
    /// # Errors
    /// I/O errors writing `samples.jsonl`.
    pub fn samples(&mut self, r: &SampleRecord) -> std::io::Result<()> {
        let Some(w) = self.samples.as_mut() else { return Ok(()) };
        serde_json::to_writer(&mut *w, r)?;
        w.write_all(b"\n")
    }

    fn write_line<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        let (Some(m), Some(s)) = (self.metrics.as_mut(), self.samples.as_mut()) else { return Ok(()) };
        serde_json::to_writer(&mut *m, record)?;
        m.write_all(b"\n")?;
        s.flush()?;
        m.flush()
    }

    /// Records a step and updates the display.
    ///
    /// # Errors
    /// I/O errors writing the metrics file.
    pub fn step(&mut self, r: &StepRecord) -> std::io::Result<()> {
        self.write_line(r)?;
        let mut msg = format!("loss {:.4} | {} tok/s", r.loss, human(r.tokens_per_s));
        if let Some(mfu) = r.mfu {
            msg.push_str(&format!(" | MFU {:.1}%", mfu * 100.0));
        }
        self.bar.set_position(r.step);
        self.bar.set_message(msg.clone());
        if self.plain {
            // A closed stderr (a pipe whose reader left) must not stop training.
            let _ = writeln!(
                std::io::stderr(),
                "step {:>6} | {msg} | lr {:.2e} | grad norm {:.3}",
                r.step,
                r.lr,
                r.grad_norm
            );
        }
        Ok(())
    }

    /// Records any other event (checkpoints, rollbacks) as one metrics line.
    ///
    /// # Errors
    /// I/O errors writing the metrics file.
    pub fn event<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        self.write_line(record)
    }

    /// Records the data state an epoch ended with (its rollback layers included) in `epochs.jsonl`, written
    /// through at once: the state drops an epoch's layers when the next one begins, and this ledger keeps
    /// what is needed to recompute, and so check, every earlier epoch's order. A rolled-back run may end an
    /// epoch again; the last record of an epoch is the one that holds. Nothing on ranks other than the leader.
    ///
    /// # Errors
    /// I/O errors writing `epochs.jsonl`.
    pub fn epoch_ended(&mut self, state: &crate::data::DataState) -> std::io::Result<()> {
        if self.metrics.is_none() {
            return Ok(());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        append_synced(&dir.join("epochs.jsonl"), state)
    }

    /// Records an evaluation.
    ///
    /// # Errors
    /// I/O errors writing the metrics file.
    pub fn eval(&mut self, r: &EvalRecord) -> std::io::Result<()> {
        self.write_line(r)?;
        self.println(&format!("step {:>6} | eval loss {:.4}", r.step, r.eval_loss));
        Ok(())
    }

    /// Prints a line above the bar (or plainly).
    pub fn println(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.plain {
            let _ = writeln!(std::io::stderr(), "{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Flushes both ledgers to the kernel, so that everything up to a checkpoint is on record before the
    /// checkpoint commits.
    ///
    /// # Errors
    /// I/O errors writing either file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.samples.as_mut() {
            s.flush()?;
        }
        if let Some(m) = self.metrics.as_mut() {
            m.flush()?;
        }
        Ok(())
    }

    pub fn finish(&mut self) {
        if let Some(s) = self.samples.as_mut() {
            let _ = s.flush();
        }
        self.bar.finish_and_clear();
    }

    pub fn metrics_path(&self) -> &Path {
        &self.path
    }
}

/// 12345.6 -> "12.3k".
fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}
