//! Tessera trains GPT-style language models and keeps them training through failures.
//!
//! # Layout
//! - [`actors`]: the supervisor, gang, rank-process, node-agent, rank, checkpoint-writer,
//!   checkpoint-coordinator, spike-detector and metrics actors (ractor), one per file, with the supervision
//!   tree; restart and hang policies as pure functions.
//! - [`chaos`]: failpoints, armed from the environment, that fail a real process at a named stage; the
//!   chaos schedule and the `tessera chaos` harness that checks every recovery invariant.
//! - [`comm`]: the `Communicator` trait (collectives with deadlines and abort) and its transports.
//! - [`config`]: the run's TOML config: file form, `--set` overrides, validation, resolved form.
//! - [`ckpt`]: checkpoints: manifest (format, checksums), storage on disk or object stores and the two-phase
//!   commit on it, retention policy, verified load, `tessera ckpt`, Hugging Face export.
//! - [`launch`]: `tessera launch` and `tessera worker`: control protocol, rendezvous, worker start-up, the
//!   event log.
//! - [`model`]: the GPT (pure tensor code), presets and FLOP counts, flat parameters, AdamW, LR schedule.
//! - [`data`]: tokenizers, `data prepare` into checksummed token shards, the sample order, batches.
//! - [`plot`]: the run's picture (loss, faults, rollbacks, checkpoints) as an SVG file.
//! - [`spike`]: loss-spike detection (robust statistics, rank faults) and the rollback plan (pure
//!   functions), and `respond`, which carries a plan out on the checkpoint store.
//! - [`plan`]: `tessera plan`: Chinchilla token budgets, predicted loss, training FLOPs, time and cost.
//! - [`storage`]: blocking access to local directories and object stores (S3, GCS, Azure).
//! - [`run_lock`]: one `tessera train` or node 0's `tessera launch` at a time per run directory.
//! - [`train`]: the training step (pure compute) and the loop around it that every rank runs (one process
//!   is a gang of one): resumption, rollback, reading results back, evaluation, reports.
//! - [`device`]: picking CPU or CUDA; loading libtorch's CUDA backend at start-up when asked for; memory.
//! - [`doctor`]: `tessera doctor`: every device-specific code path checked against a reference.
//! - [`bench`]: `tessera bench`: the real training step on synthetic tokens, timed, with its levers.
//! - [`shim`]: safe wrappers over `csrc/shim.cpp` (the libtorch calls tch does not wrap) and
//!   `csrc/kernels.cpp` (Tessera's CUDA kernels, compiled with NVRTC at run time; the profiler).
//! - [`error`]: the crate-wide error type wrapping each module's typed errors.
//!
//! `src/main.rs` is the thin `tessera` CLI over these. `csrc/shim.cpp` holds the few libtorch calls tch
//! does not wrap (bf16 autocast, fused AdamW, a cross-entropy with a bf16 backward, activation
//! recomputation, CUDA memory statistics); `csrc/kernels.cpp` and `csrc/*.cu` Tessera's own kernels.

/// `eprintln!` as one write. The launcher and its rank processes share one stderr, and Rust's stderr is
/// unbuffered: `eprintln!` writes a line in pieces, and another process's line can land between them. One
/// `write` of a line under the pipe's atomic size (4 KiB) is never split.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

pub mod actors;
pub mod bench;

pub mod chaos;
pub mod ckpt;
pub mod comm;
pub mod config;
pub mod data;
pub mod device;
pub mod doctor;
pub mod error;
pub mod launch;
pub mod model;
pub mod plan;
pub mod plot;
pub mod run_lock;
pub mod shim;
pub mod spike;
pub mod storage;
pub mod train;

pub use error::{Error, Result};

/// Preemption: the first SIGTERM or SIGINT says `first` and calls `preempt` (which asks the run to checkpoint
/// and stop cleanly); a second one stops the process at once ([`exit_now`], exit code 130). Call it inside a
/// tokio runtime that outlives the run; it returns at once, and does nothing if the signals cannot be
/// watched.
pub fn on_preemption_signals(who: &'static str, first: &'static str, preempt: impl Fn() + Send + 'static) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return;
    };
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            if n == 0 {
                say!("{who}: preemption signal: {first} (again to stop now)");
                preempt();
            } else {
                say!("{who}: second signal: stopping now");
                exit_now(130);
            }
        }
    });
}

/// Ends the process at once with `code`, as a second interrupt asks: stdout and stderr flushed, then
/// `_exit`, without running exit handlers. `std::process::exit` would run libtorch's static destructors
/// while a training thread is still inside a libtorch call, which crashes (a segmentation fault instead of
/// the exit code). What is on disk stays consistent: checkpoints are committed by atomic renames.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process without touching any state of this one.
    unsafe { libc::_exit(code) }
}
