//! `tessera`: the command-line launcher. Parses arguments, calls into the library, maps errors to exit
//! codes (2: bad input — config, data, device, arguments, a checkpoint that cannot serve the run; 3: the
//! supervisor gave up after too many restarts; 4: loss spikes kept coming back; 130: a second signal stopped
//! it at once; 1: any other failure while running).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tessera::ckpt::export::{ExportFormat, ExportOptions};
use tessera::data::{prepare::DEFAULT_SHARD_TOKENS, PrepareOptions, TokenizerKind};
use tessera::model::PRESETS;
use tessera::plan::{PlanArgs, RecipePair};
use tessera::train::{TrainOptions, Trainer};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Trains GPT-style language models and keeps them training through failures."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train in one process on the CPU or one CUDA device.
    Train(TrainArgs),
    /// Train with N rank processes (data parallel, optionally ZeRO-sharded).
    Launch(LaunchArgs),
    /// One rank of a launched gang (started by `tessera launch`).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Corpus tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// List the model presets with their shapes, parameter counts and FLOPs per token.
    Presets,
    /// Chinchilla planner: token budget, predicted loss, FLOPs, time and cost for a model or the presets.
    Plan(Box<PlanCmd>),
    /// Write a checkpoint as a model other tools load (a Hugging Face GPT-2 directory).
    Export(ExportArgs),
    /// Inspect checkpoints on disk or in an object store.
    #[command(subcommand)]
    Ckpt(CkptCommand),
    /// Run a launch under a fault schedule and check every recovery invariant.
    Chaos(ChaosArgs),
    /// Time the training step on synthetic tokens: step time, tokens/s, TFLOP/s, MFU, peak memory.
    Bench(BenchArgs),
    /// Check that this machine can train: device, kernels against references, memory statistics, NCCL.
    Doctor {
        /// `cuda`, `cuda:N`, `cpu` or `auto`.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Model preset (see `tessera presets`).
    #[arg(long)]
    model: String,
    /// Sequences per step (one micro-batch).
    #[arg(long)]
    batch: i64,
    /// Sequence length (default: the preset's context).
    #[arg(long)]
    seq: Option<i64>,
    /// Attention heads (default: the preset's).
    #[arg(long)]
    heads: Option<i64>,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// Untimed steps before them.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// `cuda`, `cuda:N`, `cpu` or `auto`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Peak dense bf16 TFLOP/s of the device for MFU (default: from the GPU's name).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// libtorch's intra-op CPU threads (default: as training's `train.threads = 0`, one on the CPU and
    /// libtorch's own default on CUDA hosts).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
    /// Measure each throughput lever: all off, then one more on at a time.
    #[arg(long)]
    ladder: bool,
    /// Recompute each block's activations in backward (`train.recompute`).
    #[arg(long)]
    recompute: bool,
    /// Compute the cross-entropy with Tessera's own CUDA kernels (compiled with NVRTC on first use) instead
    /// of libtorch's ops; bf16 on CUDA only, elsewhere it changes nothing.
    #[arg(long)]
    ce_kernel: bool,
    /// Fuse each residual add into the LayerNorm after it, through Tessera's own CUDA kernels (compiled with
    /// NVRTC on first use); bf16 on CUDA only, elsewhere the same ops run as without it.
    #[arg(long)]
    ln_kernel: bool,
    /// Compute the gradient norm and the AdamW update with Tessera's own CUDA kernels (compiled with NVRTC on
    /// first use) instead of libtorch's; CUDA only, elsewhere it changes nothing.
    #[arg(long)]
    adamw_kernel: bool,
    /// Keep bf16 copies of the matmul weights, written by the AdamW kernel, for the matmuls to read instead
    /// of casting the fp32 weights every step; CUDA only, elsewhere it changes nothing.
    #[arg(long)]
    bf16_weights: bool,
    /// Compare Tessera's own kernels in one process: everything on, then with the cross-entropy kernel, the
    /// add + LayerNorm kernel, the AdamW kernels, those with bf16 weight copies, and all of them.
    #[arg(long, conflicts_with_all = ["ladder", "ce_kernel", "ln_kernel", "adamw_kernel", "bf16_weights"])]
    kernels: bool,
    /// Profile 3 more steps of each variant with libtorch's profiler (Kineto): a Chrome trace and a per-kernel
    /// table go to DIR, and the 30 longest kernels are printed as `PROFILE` lines.
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
    /// Also time forward, backward and the optimizer apart (a second pass of `--steps` steps, with the
    /// device synchronised between phases).
    #[arg(long)]
    phases: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct ChaosArgs {
    /// The run's TOML config (its run_dir must not hold a run yet).
    #[arg(long)]
    config: PathBuf,
    /// A fault schedule (TOML, `[[fault]]` tables).
    #[arg(long, conflicts_with = "random")]
    schedule: Option<PathBuf>,
    /// Draw this many faults at random instead (every kind once from 11 on).
    #[arg(long, requires = "seed")]
    random: Option<usize>,
    /// Seed of the random schedule.
    #[arg(long)]
    seed: Option<u64>,
    /// Rank processes per node (default: `launch.nproc`; at least 2 in all).
    #[arg(long)]
    nproc: Option<usize>,
    /// Simulate this many nodes on this machine: one launcher each (node 0 supervising, the others its node
    /// agents), meeting on loopback. The reference runs on one node with every rank.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// Skip the fault-free reference run (no bit-exactness or goodput check).
    #[arg(long)]
    no_reference: bool,
    /// Serve Prometheus metrics at HOST:PORT/metrics, as for `launch`.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Override a config key. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Subcommand)]
enum CkptCommand {
    /// List checkpoints and leftovers of interrupted saves, oldest first.
    List {
        /// A run directory, its `checkpoints` directory, or a URL such as s3://bucket/run/checkpoints.
        location: String,
    },
    /// Check a checkpoint's manifest and every file's size and checksum (or every checkpoint under a run).
    Verify {
        /// A checkpoint (`…/step-000001000`, local or URL), or a run or checkpoints directory for all of them.
        target: String,
    },
}

#[derive(Args)]
struct ExportArgs {
    /// A checkpoint directory (holding manifest.json), a run's `checkpoints` directory, or a run directory;
    /// the last two export the newest committed checkpoint that verifies.
    #[arg(long, value_name = "PATH")]
    ckpt: PathBuf,
    /// What to write (only `hf` for now).
    #[arg(long, value_enum, default_value_t = ExportFormat::Hf)]
    format: ExportFormat,
    /// Output directory; created if missing, and must be empty unless --force.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Write into a non-empty --out, replacing its config.json and model.safetensors.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct PlanCmd {
    /// A model preset, e.g. gpt-30b (`tessera presets` lists them): its exact parameter count and shape.
    #[arg(long)]
    model: Option<String>,
    /// Parameter count instead of a preset, e.g. 30e9 or 30B (suffixes K, M, B, T).
    #[arg(long, value_parser = tessera::plan::parse_quantity, allow_negative_numbers = true)]
    params: Option<f64>,
    /// Training tokens, e.g. 610e9 or 1.4T. Default: 20 per parameter.
    #[arg(long, value_parser = tessera::plan::parse_quantity, allow_negative_numbers = true)]
    tokens: Option<f64>,
    /// Number of GPUs; sets the wall time (the cost does not depend on it).
    #[arg(long, default_value_t = tessera::plan::DEFAULT_GPUS, allow_negative_numbers = true)]
    gpus: u64,
    /// GPU type: a100-40gb, a100-80gb, h100 (SXM), h200, h100-pcie, b200, l40s or l4.
    #[arg(long, default_value = tessera::plan::DEFAULT_GPU)]
    gpu: String,
    /// Model FLOPs utilisation as a fraction in (0, 1]. Default: 0.4.
    #[arg(long, allow_negative_numbers = true)]
    mfu: Option<f64>,
    /// USD per GPU-hour.
    #[arg(long, default_value_t = tessera::plan::DEFAULT_PRICE_PER_GPU_HOUR, allow_negative_numbers = true)]
    price_per_gpu_hour: f64,
    /// Compare two recipes, BASELINE,CANDIDATE, each PARAMS:TOKENS (PARAMS may be a preset),
    /// e.g. 175e9:300e9,30e9:610e9.
    #[arg(long, value_name = "BASE,CANDIDATE", value_parser = tessera::plan::parse_comparison)]
    compare: Option<RecipePair>,
    /// Use the median MFU measured in this run directory's metrics.jsonl instead of --mfu.
    #[arg(long, value_name = "DIR")]
    from_run: Option<PathBuf>,
}

impl From<PlanCmd> for PlanArgs {
    fn from(a: PlanCmd) -> Self {
        PlanArgs {
            model: a.model,
            params: a.params,
            tokens: a.tokens,
            gpus: a.gpus,
            gpu: a.gpu,
            mfu: a.mfu,
            price_per_gpu_hour: a.price_per_gpu_hour,
            compare: a.compare,
            from_run: a.from_run,
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    /// The run's TOML config (see README, "Configuration").
    #[arg(long)]
    config: PathBuf,
    /// Override a config key, e.g. `--set train.lr=3e-4 --set model.preset=tiny`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// No progress bar or log lines; metrics are still written to the run directory.
    #[arg(long)]
    quiet: bool,
    /// `auto` (the newest committed checkpoint in `checkpoint.dir` that verifies, if any), `never`, or a
    /// checkpoint (a path or URL) or a run directory. Same as `--set resume=...`.
    #[arg(long)]
    resume: Option<String>,
    /// Serve Prometheus metrics at HOST:PORT (`GET /metrics`), as `tessera launch` does. Default: none.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
}

#[derive(Args)]
struct LaunchArgs {
    /// The run's TOML config.
    #[arg(long)]
    config: PathBuf,
    /// Rank processes on this node (default: `launch.nproc` in the config, else 1).
    #[arg(long)]
    nproc: Option<usize>,
    /// Nodes in the run: run the same command on each, with its own --node-rank and the same
    /// TESSERA_RUN_SECRET in the environment.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index, 0-based. Node 0 hosts the rendezvous and supervises the whole run; the other
    /// nodes' launchers start, watch and replace their own ranks on its word.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Rendezvous address HOST:PORT (node 0 listens, the others connect). Default: loopback, single node.
    #[arg(long)]
    rdzv: Option<String>,
    /// Serve Prometheus metrics at HOST:PORT/metrics. Default 127.0.0.1:9464 (or any free loopback port if
    /// that one is taken; the address is printed). With several nodes, node 0 serves the whole run's.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Override a config key (as for `train`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// `auto`, `never`, or a checkpoint (a path or URL) or a run directory, as for `train`.
    #[arg(long)]
    resume: Option<String>,
}

#[derive(Args)]
struct WorkerArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize text files, directories (recursively) and JSON Lines into token shards.
    Prepare(PrepareArgs),
}

#[derive(Args)]
struct PrepareArgs {
    /// Text files, directories, or `.jsonl` files (one `{"text": ...}` object per line). Repeatable.
    #[arg(long = "input", required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    /// Output directory for `index.json` and `shard-NNNNN.bin`.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = TokenizerKind::Gpt2)]
    tokenizer: TokenizerKind,
    /// Tokens per shard file.
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS, value_parser = clap::value_parser!(u64).range(1..))]
    shard_tokens: u64,
    /// Skip (and count in the index) files and lines that are not valid input, instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Only take files with these extensions from directories, e.g. `--ext py,txt`.
    #[arg(long, value_delimiter = ',')]
    ext: Option<Vec<String>>,
    /// Replace a corpus already prepared in `--out`.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Presets | Command::Plan(_) | Command::Ckpt(_) | Command::Bench(_) | Command::Doctor { .. }
    ) {
        // Commands that only print: a reader that goes away (`| head`) ends them quietly, as any Unix tool,
        // instead of a panic on the next print. (Rust ignores SIGPIPE; the training commands keep it that way,
        // since they write to pipes and sockets whose peers may die and must see an error, not a signal.)
        // SAFETY: restoring a signal's default disposition, before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Train(a) => train(a),
        Command::Launch(a) => launch(a),
        Command::Worker(a) => tessera::launch::worker::run(&a.config, &a.overrides),
        Command::Data(DataCommand::Prepare(a)) => prepare(a),
        Command::Presets => {
            presets();
            Ok(())
        }
        Command::Plan(a) => tessera::plan::run(&(*a).into()).map(|text| print!("{text}")).map_err(Into::into),
        Command::Export(a) => export(a),
        Command::Ckpt(c) => return ckpt(c),
        Command::Chaos(a) => return chaos(a),
        Command::Bench(a) => return bench(a),
        Command::Doctor { device } => return doctor(&device),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tessera::say!("error: {e}");
            if let Some(hint) = e.hint() {
                tessera::say!("hint: {hint}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Serves Prometheus metrics at `addr` for `tessera train`, from a one-thread runtime kept beside the metrics.
fn serve_metrics(addr: &str) -> tessera::Result<(tokio::runtime::Runtime, tessera::actors::metrics_exporter::Metrics)> {
    let io = |e: std::io::Error| {
        tessera::Error::Config(tessera::config::ConfigError::Arg {
            flag: format!("--metrics-addr {addr}"),
            reason: format!("cannot listen there ({e}); give a free HOST:PORT of this machine, or leave it out"),
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|source| tessera::Error::Io { path: "the metrics endpoint's runtime".into(), source })?;
    let metrics = tessera::actors::metrics_exporter::Metrics::default();
    let bound = rt.block_on(tessera::actors::metrics_exporter::serve(metrics.clone(), addr, false)).map_err(io)?;
    tessera::say!("tessera train: Prometheus metrics at http://{bound}/metrics");
    Ok((rt, metrics))
}

/// `--resume X` is `--set resume="X"`, applied last.
fn with_resume(mut overrides: Vec<String>, resume: Option<String>) -> Vec<String> {
    overrides.extend(resume.map(|r| format!("resume={r:?}")));
    overrides
}

fn train(a: TrainArgs) -> tessera::Result<()> {
    let overrides = with_resume(a.overrides, a.resume);
    let mut cfg = tessera::config::load_resolved(&a.config, &overrides)?;
    // This run's directory is this process's until it ends (a second run on it is refused).
    let _lock = tessera::run_lock::RunLock::acquire(&cfg.run_dir)?;
    let vocab = cfg.model.vocab_size;
    let events = tessera::launch::events::EventLog::new(&cfg.run_dir);
    let mut ledger = events.spike_ledger();
    // A loss spike stops the loop; it is rolled back in this process (a fresh trainer from the clean
    // checkpoint, with a new data order for the rest of the epoch) until the run ends or rollbacks stop
    // helping.
    // SIGTERM or SIGINT: checkpoint the next step and stop (a second one stops at once).
    let beat = std::sync::Arc::new(tessera::train::Beat::default());
    watch_preemption(beat.clone());
    // The endpoint lives on a small runtime of its own for the whole run; the loop updates the metrics.
    let metrics = match &a.metrics_addr {
        Some(addr) => Some(serve_metrics(addr)?),
        None => None,
    };
    // This session's start, for its summary: a loss spike's rollback goes back within it.
    let (session, mut from_step) = (std::time::Instant::now(), None);
    let (trainer, s) = loop {
        let mut trainer = Trainer::new(cfg.clone())?;
        from_step.get_or_insert(trainer.resumed_from.as_ref().map_or(0, |(step, _)| *step));
        trainer.set_beat(beat.clone());
        let mut on_event = |event: tessera::train::LoopEvent<'_>| {
            if let Some((_, m)) = &metrics {
                m.record(&tessera::launch::protocol::WorkerMsg::from(event));
            }
        };
        match trainer.run_with(TrainOptions { quiet: a.quiet }, &mut on_event) {
            Ok(s) => break (trainer, s),
            Err(tessera::Error::Anomaly(anomaly)) => {
                drop(trainer);
                cfg.rollback = Some(roll_back(&cfg, &events, &mut ledger, &anomaly)?);
            }
            Err(e) => return Err(e),
        }
    };
    let from_step = from_step.unwrap_or(0);
    if s.steps <= from_step {
        println!(
            "nothing to train: the run in {} is already at step {} of {} (train.steps); raise train.steps to train \
             further, or give another run_dir to start afresh",
            cfg.run_dir.display(),
            s.steps,
            cfg.steps
        );
        return Ok(());
    }
    // Steps and time of this session only: a resumed run's earlier steps ran in another process.
    let (steps, wall) = (s.steps - from_step, session.elapsed().as_secs_f64());
    let tokens = steps * cfg.batch_size * cfg.model.seq_len as u64;
    let resumed =
        if from_step > 0 { format!(" (steps {}-{}, resumed)", from_step + 1, s.steps) } else { String::new() };
    let eval = s.final_eval_loss.map(|l| format!(", held-out loss {l:.4}")).unwrap_or_default();
    println!(
        "trained {steps} steps{resumed} ({tokens} tokens) in {wall:.1}s at {:.0} tokens/s: loss {:.4} -> {:.4}{eval} \
         (ln vocab = {:.4})",
        tokens as f64 / wall,
        s.first_loss,
        s.final_loss,
        (vocab as f64).ln()
    );
    println!("metrics: {}", trainer.cfg.run_dir.join("metrics.jsonl").display());
    if s.steps < cfg.steps {
        preempted_at(&cfg, s.steps, "train")?;
    } else {
        warn_if_last_checkpoint_lost(&cfg, s.steps, "train");
    }
    if let Ok(path) = tessera::plot::write_loss_svg(&trainer.cfg.run_dir) {
        println!("loss curve: {}", path.display());
    }
    Ok(())
}

/// Preemption for `tessera train`: the first SIGTERM or SIGINT asks the loop to checkpoint the next step and
/// stop; a second one exits at once (130).
fn watch_preemption(beat: std::sync::Arc<tessera::train::Beat>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            tessera::on_preemption_signals("tessera", "checkpointing the next step and stopping", move || {
                beat.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            std::future::pending::<()>().await
        });
    });
}

/// Plans and carries out the response to a spike in `tessera train`, recording it in the event log and the
/// spike ledger; the directive is for the next trainer.
fn roll_back(
    cfg: &tessera::config::RunConfig,
    events: &tessera::launch::events::EventLog,
    ledger: &mut Vec<tessera::spike::rollback::Entry>,
    anomaly: &tessera::spike::Anomaly,
) -> tessera::Result<tessera::spike::Directive> {
    let store = tessera::ckpt::store::CkptStore::open(&cfg.checkpoint.dir, &cfg.checkpoint.storage_options)?;
    events.log("detected", serde_json::json!({"reason": anomaly.to_string(), "anomaly": anomaly}));
    let response = tessera::spike::respond(&store, cfg, ledger, anomaly)?;
    match response.plan {
        tessera::spike::Plan::GiveUp { reason } => {
            events.log("gave_up", serde_json::json!({"reason": reason}));
            Err(tessera::Error::SpikeGaveUp(reason))
        }
        tessera::spike::Plan::Rollback { directive, entry } => {
            events.log("spike", serde_json::json!({"ledger": &entry, "removed_checkpoints": response.removed}));
            tessera::say!("tessera: {}", tessera::spike::rollback::describe(&entry));
            ledger.push(entry);
            Ok(directive)
        }
    }
}

/// Says where a preempted run stopped, once the store confirms that step's checkpoint committed.
///
/// # Errors
/// [`tessera::Error::PreemptedUncommitted`] when it did not (the store failed), naming the newest that did.
fn preempted_at(cfg: &tessera::config::RunConfig, step: u64, who: &str) -> tessera::Result<()> {
    let newest = newest_committed(cfg).ok().flatten();
    if newest != Some(step) {
        return Err(tessera::Error::PreemptedUncommitted { step, newest });
    }
    println!(
        "{who}: preempted: stopped after step {step} with its checkpoint committed; run the same command to resume"
    );
    Ok(())
}

fn launch(a: LaunchArgs) -> tessera::Result<()> {
    let opts = tessera::launch::launcher::LaunchOptions {
        config: a.config,
        overrides: with_resume(a.overrides, a.resume),
        nproc: a.nproc,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        rdzv: a.rdzv,
        metrics_addr: a.metrics_addr,
    };
    let (report, cfg) = tessera::launch::launcher::launch(&opts)?;
    if report.preempted {
        preempted_at(&cfg, report.steps, "launch")?;
    } else {
        println!("launch: all ranks finished {} steps; final loss {:.4}", report.steps, report.final_loss);
        warn_if_last_checkpoint_lost(&cfg, report.steps, "launch");
    }
    Ok(())
}

/// The run's newest committed checkpoint, as its store says now.
fn newest_committed(cfg: &tessera::config::RunConfig) -> Result<Option<u64>, tessera::ckpt::store::CkptError> {
    tessera::ckpt::store::CkptStore::open(&cfg.checkpoint.dir, &cfg.checkpoint.storage_options)
        .and_then(|s| s.newest_committed_step())
}

/// A run that checkpoints ends with its last step committed, so that the same command run again finds it
/// finished. Where that checkpoint was abandoned (the store failed; each failure was warned about as it
/// happened), says so in the summary: the final weights are in `model.safetensors`, but a rerun would train
/// again from the newest committed checkpoint.
fn warn_if_last_checkpoint_lost(cfg: &tessera::config::RunConfig, step: u64, who: &str) {
    if cfg.checkpoint_every == 0 {
        return;
    }
    let newest = match newest_committed(cfg) {
        Ok(Some(n)) if n == step => return,
        Ok(Some(n)) => format!("the newest committed checkpoint is step {n}"),
        Ok(None) => "no checkpoint of this run committed".into(),
        Err(e) => format!("the checkpoint store cannot be listed ({e})"),
    };
    tessera::say!(
        "{who}: warning: the checkpoint of the last step ({step}) did not commit (see the warnings above) and \
         {newest}: the final weights are in {}, but the same command run again would train from there",
        cfg.run_dir.join("model.safetensors").display()
    );
}

fn chaos(a: ChaosArgs) -> ExitCode {
    let opts = tessera::chaos::harness::ChaosOptions {
        config: a.config,
        overrides: a.overrides,
        nproc: a.nproc,
        nnodes: a.nnodes,
        schedule: a.schedule,
        random: a.random.map(|k| (k, a.seed.unwrap_or(0))),
        reference: !a.no_reference,
        metrics_addr: a.metrics_addr,
    };
    match tessera::chaos::harness::run(&opts) {
        Ok(report) => {
            print!("{}", tessera::chaos::harness::render(&report));
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            tessera::say!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn prepare(a: PrepareArgs) -> tessera::Result<()> {
    let opts = PrepareOptions {
        inputs: a.inputs,
        out: a.out,
        tokenizer: a.tokenizer,
        shard_tokens: a.shard_tokens,
        skip_bad: a.skip_bad,
        extensions: a.ext,
        force: a.force,
        progress: true,
    };
    let index = tessera::data::prepare(&opts)?;
    println!(
        "prepared {} documents, {} tokens ({}) in {} shard(s) at {}",
        index.documents,
        index.total_tokens,
        index.tokenizer.name(),
        index.shards.len(),
        opts.out.display()
    );
    if !index.skipped.is_empty() {
        println!("skipped {} bad input(s), listed in {}:", index.skipped.len(), opts.out.join("index.json").display());
        for s in index.skipped.iter().take(5) {
            println!("  {}", s.reason);
        }
    }
    Ok(())
}

fn ckpt(c: CkptCommand) -> ExitCode {
    use tessera::ckpt::inspect;
    let result = match c {
        CkptCommand::List { location } => inspect::list(&location),
        CkptCommand::Verify { target } => inspect::verify(&target, |line| tessera::say!("{line}")),
    };
    match result {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            tessera::say!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn export(a: ExportArgs) -> tessera::Result<()> {
    let opts = ExportOptions { ckpt: a.ckpt, format: a.format, out: a.out, force: a.force };
    let e = tessera::ckpt::export::export(&opts)?;
    for reason in &e.skipped {
        tessera::say!("tessera: skipped a checkpoint that does not verify: {reason}");
    }
    let c = e.model;
    println!(
        "exported step {} of {} ({} layers, d_model {}, {} heads, context {}, vocab {}: {} parameters) to {}",
        e.step,
        e.checkpoint.display(),
        c.n_layer,
        c.d_model,
        c.n_head,
        c.seq_len,
        c.vocab_size,
        e.n_params,
        opts.out.display()
    );
    match e.eot_token {
        Some(id) => println!("end-of-text id {id} written as bos_token_id and eos_token_id"),
        None => println!(
            "the run's tokenizer is unknown (no matching config.resolved.toml): bos_token_id and eos_token_id are null"
        ),
    }
    Ok(())
}

fn presets() {
    println!(
        "{:<10} {:>7} {:>6} {:>7} {:>7} {:>7} {:>15} {:>16}  note",
        "preset", "layers", "heads", "d_model", "context", "vocab", "parameters", "FLOPs/token"
    );
    for p in PRESETS {
        let c = p.config;
        println!(
            "{:<10} {:>7} {:>6} {:>7} {:>7} {:>7} {:>15} {:>16.4e}  {}",
            p.name,
            c.n_layer,
            c.n_head,
            c.d_model,
            c.seq_len,
            c.vocab_size,
            c.n_params(),
            c.flops_per_token(c.seq_len),
            p.note
        );
    }
}

fn bench(a: BenchArgs) -> ExitCode {
    use tessera::bench::{BenchSpec, Levers};
    let Some(device) = tessera::config::DeviceSpec::parse(&a.device) else {
        tessera::say!("error: --device {:?} is not one of cpu, cuda, cuda:N, auto", a.device);
        return ExitCode::from(2);
    };
    let spec = BenchSpec {
        preset: a.model,
        batch: a.batch,
        seq: a.seq,
        heads: a.heads,
        steps: a.steps,
        warmup: a.warmup,
        device,
        peak_tflops: a.peak_tflops,
        threads: a.threads,
        seed: 0,
        phases: a.phases,
        recompute: a.recompute,
        profile: a.profile,
    };
    let mut variants: Vec<(String, Levers)> = match (a.ladder, a.kernels) {
        (true, _) => Levers::ladder().into_iter().map(|(name, l)| (name.to_string(), l)).collect(),
        (_, true) => Levers::kernels().into_iter().map(|(name, l)| (name.to_string(), l)).collect(),
        _ => vec![(String::new(), Levers::ALL)],
    };
    let added = [
        (a.ce_kernel, "ce-kernel"),
        (a.ln_kernel, "ln-kernel"),
        (a.adamw_kernel, "adamw-kernel"),
        (a.bf16_weights, "bf16-weights"),
    ];
    let added: Vec<&str> = added.into_iter().filter_map(|(on, f)| on.then_some(f)).collect();
    for (name, levers) in &mut variants {
        levers.ce_kernel |= a.ce_kernel;
        levers.ln_kernel |= a.ln_kernel;
        levers.adamw_kernel |= a.adamw_kernel;
        levers.bf16_weights |= a.bf16_weights;
        for flag in &added {
            *name = if name.is_empty() { flag.to_string() } else { format!("{name}+{flag}") };
        }
    }
    let variants: Vec<(&str, Levers)> = variants.iter().map(|(name, l)| (name.as_str(), *l)).collect();
    let printed = &mut |r: &tessera::bench::BenchResult| {
        println!("{}", r.result_line());
        for line in r.profile_lines(30) {
            println!("{line}");
        }
    };
    match tessera::bench::run(&spec, &variants, printed) {
        Ok(results) => {
            if let Some(path) = a.json {
                let text = serde_json::to_string_pretty(&results).expect("results serialize");
                if let Err(e) = std::fs::write(&path, text) {
                    tessera::say!("error: {}: {e}", path.display());
                    return ExitCode::from(1);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tessera::say!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn doctor(device: &str) -> ExitCode {
    let Some(spec) = tessera::config::DeviceSpec::parse(device) else {
        tessera::say!("error: --device {device:?} is not one of cpu, cuda, cuda:N, auto");
        return ExitCode::from(2);
    };
    let device = match tessera::device::resolve(spec) {
        Ok(d) => d,
        Err(e) => {
            tessera::say!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let checks = tessera::doctor::run(device);
    for c in &checks {
        let mark = match c.ok {
            Some(true) => "ok  ",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        println!("{mark} {:<20} {}", c.name, c.detail);
    }
    if checks.iter().any(|c| c.ok == Some(false)) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
