//! `tessera chaos`: runs a launch under a fault schedule and checks that Tessera recovered as it claims.
//!
//! 1. A fault-free reference run of the same config (`run_dir/reference`), timed.
//! 2. The run under faults: `tessera launch` with the schedule's step faults armed as once-only failpoints
//!    and its timed faults sent as signals by this process; a launcher killed by a fault is started again
//!    with the same command, as an operator (or a scheduler) would.
//! 3. The invariants, as a table on stdout and JSON in `run_dir/chaos-report.json`, with the loss curve in
//!    `run_dir/loss.svg`:
//!    - the run reached its final step;
//!    - every fault was detected as what it was (with the latency from the moment it fired) and recovered
//!      from (the time from it firing to the first step completed after recovery); faults meant to be
//!      tolerated (a straggler, a failed checkpoint write) caused no restart, and no fault went unexplained;
//!    - every committed checkpoint verifies;
//!    - the committed history consumed the samples of each epoch at most once, exactly in the order the final
//!      data state describes, never a skipped one;
//!    - without faults that reshuffle (spikes, NaN), the final weights are bit-identical to the reference's;
//!    - goodput: the reference's wall time over the faulted run's.
//!
//! With `--nnodes M` the run under faults is M launchers on loopback (node 0 and its node agents), and the
//! reference one launcher with every rank.
//!
//! For a run to absorb many faults the harness raises `launch.max_restarts` to fit the schedule, sets a hang
//! timeout of 10 s when none is configured, and for random schedules counts every spike as a new place
//! (`spike.same_place_steps = 0`: injected spikes are independent events). It prints what it changed.

use super::schedule::{failpoints, next_checkpoint, Kind, RunShape, Schedule};
use crate::config::RunConfig;
use crate::data::stream::digest;
use crate::data::DataState;
use crate::error::{Error, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What `tessera chaos` was asked.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub config: PathBuf,
    pub overrides: Vec<String>,
    pub nproc: Option<usize>,
    /// Nodes to simulate on this machine (one launcher each, `nproc` ranks each, meeting on loopback); 1: a
    /// single launcher.
    pub nnodes: usize,
    /// A schedule file, or `(faults, seed)` for a random one.
    pub schedule: Option<PathBuf>,
    pub random: Option<(usize, u64)>,
    /// Run the fault-free reference first (bit-exactness and goodput need it).
    pub reference: bool,
    pub metrics_addr: Option<String>,
}

/// One fault's fate.
#[derive(Debug, Clone, Serialize)]
pub struct FaultResult {
    pub kind: &'static str,
    pub step: Option<u64>,
    pub at_s: Option<f64>,
    pub rank: Option<usize>,
    /// Seconds from the launch's start to the fault firing (`None`: it never fired).
    pub fired_s: Option<f64>,
    /// What the launcher saw, and how long after the fault fired.
    pub detected_as: Option<String>,
    pub detect_s: Option<f64>,
    /// Seconds from the fault firing to the first step completed after recovery.
    pub recover_s: Option<f64>,
    pub ok: bool,
    pub detail: String,
    /// How many of the launcher's fault events this fault accounts for.
    #[serde(skip)]
    events: usize,
}

/// One invariant's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub invariant: &'static str,
    /// `None`: not applicable to this schedule.
    pub pass: Option<bool>,
    pub detail: String,
}

/// The harness's report.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub run_dir: PathBuf,
    pub faults: Vec<FaultResult>,
    pub checks: Vec<Check>,
    pub reference_s: Option<f64>,
    pub chaos_s: f64,
    pub goodput: Option<f64>,
    pub launches: usize,
    pub passed: bool,
    pub picture: Option<PathBuf>,
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn setup(msg: String) -> Error {
    Error::Launch(crate::launch::LaunchError::Setup(msg))
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Runs the chaos test and returns its report (also written to `run_dir/chaos-report.json`).
///
/// # Errors
/// Config or schedule errors before anything runs; a reference run that fails; I/O errors on the run
/// directory. A faulted run that fails is not an error: it is reported, and the invariants fail.
pub fn run(opts: &ChaosOptions) -> Result<ChaosReport> {
    let cfg = crate::config::load_resolved(&opts.config, &opts.overrides)?;
    let nproc = opts.nproc.unwrap_or(cfg.launch.nproc);
    let arg = |flag: &str, reason: String| Error::Config(crate::config::ConfigError::Arg { flag: flag.into(), reason });
    if opts.nnodes == 0 || opts.nnodes > 64 {
        return Err(arg("--nnodes", format!("{} must be between 1 and 64 simulated nodes", opts.nnodes)));
    }
    let world = nproc.saturating_mul(opts.nnodes);
    if world < 2 {
        return Err(arg(
            "--nproc",
            format!(
                "chaos needs at least 2 ranks (--nproc {nproc} × --nnodes {}): most faults hit one rank of a gang",
                opts.nnodes
            ),
        ));
    }
    let shape = RunShape {
        steps: cfg.steps,
        world,
        checkpoint_every: cfg.checkpoint_every,
        armed_from: cfg.spike.warmup_steps.max(crate::spike::detector::MIN_WINDOW as u64),
    };
    if cfg.checkpoint_every == 0 {
        return Err(Error::Config(crate::config::ConfigError::Invalid {
            key: "train.checkpoint_every".into(),
            reason: "is 0, and chaos needs checkpoints to recover from: set it (the demo uses 20)".into(),
        }));
    }
    // A schedule the run cannot carry out is the user's to fix, like a config error (exit code 2).
    let flag = match (&opts.schedule, opts.random) {
        (Some(path), _) => format!("--schedule {}", path.display()),
        (None, Some((k, seed))) => format!("--random {k} --seed {seed}"),
        _ => "--schedule".into(),
    };
    let random_hint = if opts.random.is_some() {
        format!(
            " (random faults fall after the spike detector's warm-up, step {}: raise train.steps or lower \
             spike.warmup_steps)",
            shape.armed_from
        )
    } else {
        String::new()
    };
    let bad_schedule = |reason: String| arg(&flag, reason);
    let schedule = match (&opts.schedule, opts.random) {
        (Some(path), None) => Schedule::load(path).map_err(|e| bad_schedule(e.to_string()))?,
        (None, Some((k, seed))) => Schedule::random(k, seed, &shape),
        _ => return Err(bad_schedule("give --schedule FILE or --random K --seed S".into())),
    };
    let schedule = schedule.resolve(&shape).map_err(|e| bad_schedule(format!("{e}{random_hint}")))?;
    if schedule.needs_steps(&shape) > cfg.steps {
        return Err(bad_schedule(format!(
            "the schedule's last fault needs the run to go to step {} (train.steps is {}): after its step the run \
             must pass two more checkpoints (2 × train.checkpoint_every = {}) and 4 steps for the recovery to be \
             checked; raise train.steps",
            schedule.needs_steps(&shape),
            cfg.steps,
            2 * cfg.checkpoint_every
        )));
    }
    let run_dir = cfg.run_dir.clone();
    if run_dir.join("events.jsonl").exists() || run_dir.join("metrics.jsonl").exists() {
        return Err(Error::Config(crate::config::ConfigError::Invalid {
            key: "run_dir".into(),
            reason: format!(
                "{} already holds a run; a chaos test starts from scratch: remove it or --set run_dir=…",
                run_dir.display()
            ),
        }));
    }
    std::fs::create_dir_all(&run_dir).map_err(|source| Error::Io { path: run_dir.clone(), source })?;

    // What the harness changes so the run can absorb the schedule.
    let mut overrides = opts.overrides.clone();
    let mut changed = vec![];
    let restarts = 2 * schedule.faults.len() + 3;
    if cfg.launch.max_restarts < restarts {
        overrides.push(format!("launch.max_restarts={restarts}"));
        changed.push(format!("launch.max_restarts={restarts}"));
    }
    if cfg.launch.hang_timeout_s == 0.0 {
        overrides.push("launch.hang_timeout_s=10".into());
        changed.push("launch.hang_timeout_s=10".into());
    }
    if opts.random.is_some() {
        overrides.push("spike.same_place_steps=0".into());
        changed.push("spike.same_place_steps=0".into());
    }
    if !changed.is_empty() {
        crate::say!("tessera chaos: for this schedule: {}", changed.join(", "));
    }
    std::fs::write(run_dir.join("chaos-schedule.toml"), toml::to_string_pretty(&schedule).unwrap_or_default())
        .map_err(|source| Error::Io { path: run_dir.clone(), source })?;

    // 1. The reference.
    let reference_dir = run_dir.join("reference");
    let reference_s = if opts.reference {
        crate::say!("tessera chaos: reference run (no faults) in {}", reference_dir.display());
        let mut o = overrides.clone();
        o.push(format!("run_dir={:?}", reference_dir.display().to_string()));
        o.push(format!("checkpoint.dir={:?}", reference_dir.join("checkpoints").display().to_string()));
        // Its progress every 10% of the run, so the wait is visibly going somewhere (no numerical effect).
        o.push(format!("train.log_every={}", (cfg.steps / 10).max(1)));
        let t0 = Instant::now();
        // One node with every rank: with several simulated nodes, the faulted run must also match it.
        let status = launcher_command(opts, world, &o)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| setup(format!("cannot run the reference: {e}")))?;
        if !status.success() {
            return Err(setup(format!("the fault-free reference run failed ({status}); see its output above")));
        }
        let secs = t0.elapsed().as_secs_f64();
        crate::say!("tessera chaos: reference: {} steps in {secs:.1} s", cfg.steps);
        Some(secs)
    } else {
        None
    };

    // 2. The run under faults.
    let state = run_dir.join("chaos-state");
    let (spec, markers) = failpoints(&schedule, cfg.checkpoint_every);
    crate::say!("tessera chaos: {} fault(s): {}", schedule.faults.len(), describe(&schedule));
    let launchers = Arc::new(Mutex::new(vec![]));
    let started = now_unix();
    let timed_fired = Arc::new(Mutex::new(BTreeMap::new()));
    let timer = spawn_timed_faults(&schedule, launchers.clone(), timed_fired.clone());
    let t0 = Instant::now();
    let mut launches = 0;
    let mut launcher_exits: Vec<f64> = vec![];
    let relaunches_allowed = schedule.faults.iter().filter(|f| f.kind == Kind::KillLauncher).count();
    let status = loop {
        launches += 1;
        let mut nodes = start_nodes(opts, nproc, &overrides, &spec, &state)?;
        if let Ok(mut l) = launchers.lock() {
            *l = nodes.iter().map(|c| c.id()).collect();
        }
        let status = nodes[0].wait().map_err(|e| setup(format!("waiting for the launcher: {e}")))?;
        // The other nodes' launchers end with node 0's outcome, or by losing it.
        for node in &mut nodes[1..] {
            let _ = node.wait();
        }
        if let Ok(mut l) = launchers.lock() {
            l.clear();
        }
        use std::os::unix::process::ExitStatusExt;
        if status.signal() == Some(libc::SIGKILL) && launcher_exits.len() < relaunches_allowed {
            launcher_exits.push(now_unix());
            crate::say!(
                "tessera chaos: the launcher was killed; waiting for its workers to exit, then running it again"
            );
            wait_for_orphans(&state, Duration::from_secs(30));
            continue;
        }
        break status;
    };
    let chaos_s = t0.elapsed().as_secs_f64();
    drop(timer);
    let timed = timed_fired.lock().map(|m| m.clone()).unwrap_or_default();

    // 3. Invariants.
    let events = jsonl(&run_dir.join("events.jsonl"));
    let metrics = jsonl(&run_dir.join("metrics.jsonl"));
    let fired_at: Vec<Option<f64>> = markers
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Some(name) => super::first_fired(&state, name),
            None => timed.get(&i).copied(),
        })
        .collect();
    let faults = match_faults(&schedule, &fired_at, &events, &metrics, &launcher_exits, started, cfg.checkpoint_every);
    let mut checks = vec![];
    let finished = events.iter().rev().find(|e| e["event"] == "finished").and_then(|e| e["steps"].as_u64());
    checks.push(Check {
        invariant: "the run reached its final step",
        pass: Some(status.success() && finished == Some(cfg.steps)),
        detail: format!("{}/{} steps, launcher {status}, {launches} launch(es)", finished.unwrap_or(0), cfg.steps),
    });
    let bad: Vec<&FaultResult> = faults.iter().filter(|f| !f.ok).collect();
    let unexplained = unexplained_faults(&faults, &events);
    checks.push(Check {
        invariant: "every fault detected and recovered from",
        pass: Some(bad.is_empty() && unexplained.is_empty()),
        detail: if bad.is_empty() && unexplained.is_empty() {
            format!("{} of {}", faults.len(), faults.len())
        } else {
            let mut d: Vec<String> = bad.iter().map(|f| format!("{} at {:?}: {}", f.kind, f.step, f.detail)).collect();
            d.extend(unexplained.iter().map(|u| format!("unexplained: {u}")));
            d.join("; ")
        },
    });
    checks.push(checkpoints_verify(&cfg));
    checks.push(samples_once(cfg.batch_size, cfg.steps, &run_dir));
    let reshuffled: Vec<&str> = schedule.faults.iter().filter(|f| f.kind.reshuffles()).map(|f| f.kind.name()).collect();
    checks.push(if !opts.reference {
        Check {
            invariant: "final weights bit-identical to the reference",
            pass: None,
            detail: "no reference run".into(),
        }
    } else if !reshuffled.is_empty() {
        Check {
            invariant: "final weights bit-identical to the reference",
            pass: None,
            detail: format!("n/a: {} reshuffle the data by design", reshuffled.join(", ")),
        }
    } else {
        same_weights(&reference_dir, &run_dir)
    });
    let goodput = reference_s.map(|r| r / chaos_s);
    checks.push(Check {
        invariant: "goodput (reference time / faulted time)",
        pass: goodput.map(|g| g > 0.0),
        detail: goodput.map_or("no reference run".into(), |g| {
            format!("{g:.2} ({:.1} s vs {chaos_s:.1} s)", reference_s.unwrap_or(0.0))
        }),
    });
    let picture = crate::plot::write_loss_svg(&run_dir).ok();
    let passed = checks.iter().all(|c| c.pass != Some(false));
    let report = ChaosReport {
        run_dir: run_dir.clone(),
        faults,
        checks,
        reference_s,
        chaos_s,
        goodput,
        launches,
        passed,
        picture,
    };
    let path = run_dir.join("chaos-report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("report serializes"))
        .map_err(|source| Error::Io { path: path.clone(), source })?;
    Ok(report)
}

fn describe(s: &Schedule) -> String {
    s.faults
        .iter()
        .map(|f| {
            let when = f.step.map_or_else(|| format!("{:.1}s", f.at_s.unwrap_or(0.0)), |s| format!("step {s}"));
            let on = if f.kind == Kind::KillLauncher || f.kind.reshuffles() {
                String::new()
            } else {
                format!(" rank {}", f.rank.unwrap_or(0))
            };
            format!("{} @ {when}{on}", f.kind.name())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The launchers of one attempt of the faulted run, node 0's first: one, or one per simulated node, meeting
/// at a fresh loopback port with a fresh run secret.
fn start_nodes(
    opts: &ChaosOptions,
    nproc: usize,
    overrides: &[String],
    failpoints: &str,
    state: &Path,
) -> Result<Vec<std::process::Child>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| setup(format!("cannot find a free loopback port for the rendezvous: {e}")))?
        .port();
    let secret = crate::comm::auth::new_secret();
    (0..opts.nnodes)
        .map(|node| {
            let mut c = launcher_command(opts, nproc, overrides);
            if opts.nnodes > 1 {
                c.args(["--nnodes", &opts.nnodes.to_string(), "--node-rank", &node.to_string()])
                    .args(["--rdzv", &format!("127.0.0.1:{port}")])
                    .env(crate::launch::launcher::RUN_SECRET_ENV, &secret);
            }
            c.env("TESSERA_FAILPOINTS", failpoints)
                .env("TESSERA_CHAOS_STATE", state)
                .spawn()
                .map_err(|e| setup(format!("cannot start the launcher of node {node}: {e}")))
        })
        .collect()
}

/// `tessera launch` with `nproc` ranks, metrics where asked (node 0 serves them; other nodes ignore it).
fn launcher_command(opts: &ChaosOptions, nproc: usize, overrides: &[String]) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("tessera"));
    let mut c = Command::new(exe);
    c.arg("launch").arg("--config").arg(&opts.config).args(["--nproc", &nproc.to_string()]);
    if let Some(a) = &opts.metrics_addr {
        c.args(["--metrics-addr", a]);
    }
    for o in overrides {
        c.args(["--set", o]);
    }
    c.env_remove("TESSERA_FAILPOINTS").env_remove("TESSERA_CHAOS_STATE");
    c
}

/// Child process ids of `pid`, ascending (Linux).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A process's environment, NUL-separated entries joined by newlines (Linux).
pub fn environ(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default()).replace('\0', "\n")
}

/// The process of rank `rank`, under whichever of `launchers` started it.
fn rank_pid(launchers: &[u32], rank: usize) -> Option<u32> {
    let want = format!("\nTESSERA_RANK={rank}\n");
    launchers.iter().flat_map(|&l| children(l)).find(|&p| format!("\n{}\n", environ(p)).contains(&want))
}

/// Waits until no worker of this chaos run (its processes carry `TESSERA_CHAOS_STATE`) is left.
fn wait_for_orphans(state: &Path, limit: Duration) {
    let tag = format!("TESSERA_CHAOS_STATE={}", state.display());
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let alive = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .filter(|&p| p != std::process::id())
            .any(|p| {
                let env = environ(p);
                env.lines().any(|l| l == tag) && env.contains("TESSERA_RANK=")
            });
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A thread that fires the timed faults by signals; it stops when dropped.
struct Timer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Fires the timed faults; `launchers` holds the running launchers' pids, node 0's first (empty between
/// launches).
fn spawn_timed_faults(s: &Schedule, launchers: Arc<Mutex<Vec<u32>>>, fired: Arc<Mutex<BTreeMap<usize, f64>>>) -> Timer {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut timed: Vec<(usize, f64, Kind, usize)> =
        s.faults.iter().enumerate().filter_map(|(i, f)| Some((i, f.at_s?, f.kind, f.rank.unwrap_or(0)))).collect();
    timed.sort_by(|a, b| a.1.total_cmp(&b.1));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let t0 = Instant::now();
        for (i, at, kind, rank) in timed {
            while t0.elapsed().as_secs_f64() < at {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let l = launchers.lock().map(|l| l.clone()).unwrap_or_default();
            let target = match kind {
                Kind::KillLauncher => l.first().copied(),
                _ => rank_pid(&l, rank),
            };
            let Some(pid) = target.filter(|&p| p != 0) else { continue };
            let pid = pid as i32;
            // SAFETY: sending signals has no memory-safety preconditions.
            unsafe {
                match kind {
                    Kind::HangRank => libc::kill(pid, libc::SIGSTOP),
                    Kind::SlowRank => {
                        libc::kill(pid, libc::SIGSTOP);
                        std::thread::sleep(Duration::from_secs(1));
                        libc::kill(pid, libc::SIGCONT)
                    }
                    _ => libc::kill(pid, libc::SIGKILL),
                };
            }
            if let Ok(mut m) = fired.lock() {
                m.insert(i, now_unix());
            }
        }
    });
    Timer { stop, handle: Some(handle) }
}

/// The launcher's fault events: (index in `events`, kind, time detected, time of the fault line).
fn fault_events(events: &[Value]) -> Vec<(usize, String, f64, f64)> {
    let mut out = vec![];
    let mut detected = None;
    for (i, e) in events.iter().enumerate() {
        match e["event"].as_str() {
            Some("detected") => detected = e["unix_s"].as_f64(),
            Some("fault") => {
                let at = e["unix_s"].as_f64().unwrap_or(0.0);
                out.push((i, e["kind"].as_str().unwrap_or("?").to_string(), detected.take().unwrap_or(at), at));
            }
            _ => {}
        }
    }
    out
}

/// What the launcher should report for each kind: the fault kinds it may show, and how many.
fn expected(kind: Kind) -> (&'static [&'static str], usize) {
    match kind {
        Kind::KillRank | Kind::CorruptCheckpoint | Kind::StorageOutage => (&["rank_failed"], 1),
        Kind::BreakConnection => (&["rank_failed", "hung"], 1),
        Kind::CrashAtStart => (&["rank_failed"], 2),
        Kind::HangRank => (&["hung"], 1),
        Kind::LossSpike | Kind::Nan => (&["spike"], 1),
        Kind::CorruptGradients => (&["rank_fault"], 1),
        Kind::SlowRank | Kind::FailCheckpointWrite | Kind::KillLauncher => (&[], 0),
    }
}

#[allow(clippy::too_many_arguments)]
fn match_faults(
    s: &Schedule,
    fired_at: &[Option<f64>],
    events: &[Value],
    metrics: &[Value],
    launcher_exits: &[f64],
    started: f64,
    every: u64,
) -> Vec<FaultResult> {
    let faults = fault_events(events);
    let mut used = vec![false; faults.len()];
    let mut order: Vec<usize> = (0..s.faults.len()).collect();
    order.sort_by(|&a, &b| fired_at[a].unwrap_or(f64::MAX).total_cmp(&fired_at[b].unwrap_or(f64::MAX)));
    let mut results: Vec<Option<FaultResult>> = vec![None; s.faults.len()];
    let mut exits = launcher_exits.iter();
    // A fault's events come after it fires and before the next one does (the next cannot fire while the gang
    // is down), so one fault's missing event never shifts the blame onto the next one's.
    let fired_order: Vec<f64> = order.iter().map(|&i| fired_at[i].unwrap_or(f64::MAX)).collect();
    for (pos, &i) in order.iter().enumerate() {
        let f = &s.faults[i];
        let until = fired_order.get(pos + 1).copied().unwrap_or(f64::MAX);
        let mut r = FaultResult {
            kind: f.kind.name(),
            step: f.step,
            at_s: f.at_s,
            rank: f.rank,
            fired_s: fired_at[i].map(|t| t - started),
            detected_as: None,
            detect_s: None,
            recover_s: None,
            ok: false,
            detail: String::new(),
            events: 0,
        };
        let Some(t) = fired_at[i] else {
            r.detail = "never fired".into();
            results[i] = Some(r);
            continue;
        };
        let (kinds, count) = expected(f.kind);
        let mut matched = vec![];
        for (k, (_, kind, _, at)) in faults.iter().enumerate() {
            if matched.len() < count && !used[k] && *at >= t - 0.05 && *at < until && kinds.contains(&kind.as_str()) {
                matched.push(k);
            }
        }
        for &k in &matched {
            used[k] = true;
        }
        // When recovery was complete: the first step completed after the (last) matched fault's restart.
        let after = |from: usize| {
            events[from..]
                .iter()
                .find(|e| e["event"] == "recovered" || e["event"] == "first_step")
                .and_then(|e| e["unix_s"].as_f64())
        };
        match f.kind {
            Kind::SlowRank => {
                r.ok = true;
                r.detail = "tolerated: no restart".into();
            }
            Kind::FailCheckpointWrite => {
                let k = f.step.map(|s| next_checkpoint(s, every));
                let lost = metrics.iter().any(|m| {
                    m["step"].as_u64() == k && matches!(m["checkpoint"].as_str(), Some("write_failed" | "abandoned"))
                });
                r.ok = lost;
                r.detected_as = lost.then(|| "checkpoint abandoned".into());
                r.detail = if lost {
                    format!("the checkpoint after step {} was abandoned; training went on", k.unwrap_or(0))
                } else {
                    "no abandoned checkpoint recorded".into()
                };
            }
            Kind::KillLauncher => match exits.next() {
                Some(&exit) => {
                    r.detected_as = Some("launcher exit".into());
                    r.detect_s = Some((exit - t).max(0.0));
                    let first = events
                        .iter()
                        .filter(|e| e["event"] == "first_step")
                        .filter_map(|e| e["unix_s"].as_f64())
                        .find(|&u| u > exit);
                    r.recover_s = first.map(|u| u - t);
                    r.ok = first.is_some();
                    r.detail = if r.ok {
                        "relaunched; resumed from the newest checkpoint".into()
                    } else {
                        "no step after the relaunch".into()
                    };
                }
                None => r.detail = "the launcher did not die".into(),
            },
            _ if matched.len() == count => {
                let (first, last) = (&faults[matched[0]], &faults[*matched.last().expect("count > 0")]);
                r.detected_as = Some(matched.iter().map(|&k| faults[k].1.clone()).collect::<Vec<_>>().join("+"));
                r.events = matched.len();
                r.detect_s = Some((first.2 - t).max(0.0));
                r.recover_s = after(last.0).map(|u| u - t);
                r.ok = r.recover_s.is_some();
                r.detail = if r.ok { "recovered".into() } else { "no step completed after recovery".into() };
                if f.kind == Kind::StorageOutage {
                    // The restart waited for the store: a wait began after the fault, and it ended.
                    let at = |name: &str| {
                        events
                            .iter()
                            .filter(|e| e["event"] == name)
                            .filter_map(|e| e["unix_s"].as_f64())
                            .find(|&u| u >= t - 0.05 && u < until)
                    };
                    let (wait, back) = (at("storage_wait"), at("storage_back"));
                    r.ok &= wait.is_some() && back.is_some();
                    r.detail = match (wait, back) {
                        (Some(w), Some(b)) => format!("recovered; the restart waited {:.1} s for the store", b - w),
                        (None, _) => "no wait for the store was recorded".into(),
                        (Some(_), None) => "the store never came back".into(),
                    };
                }
                if f.kind == Kind::CorruptCheckpoint {
                    let skipped = metrics.iter().any(|m| m["checkpoint"] == "skipped");
                    r.ok &= skipped;
                    r.detail = if skipped {
                        "the corrupt checkpoint was skipped on resume".into()
                    } else {
                        "the corrupt checkpoint was not seen on resume".into()
                    };
                }
            }
            _ => r.detail = format!("expected {count} {} fault(s), found {}", kinds.join("/"), matched.len()),
        }
        results[i] = Some(r);
    }
    results.into_iter().map(|r| r.expect("every fault has a result")).collect()
}

/// Fault events that no scheduled fault explains.
fn unexplained_faults(results: &[FaultResult], events: &[Value]) -> Vec<String> {
    let expected: usize = results.iter().map(|r| r.events).sum();
    let all = fault_events(events);
    if all.len() <= expected {
        return vec![];
    }
    vec![format!(
        "{} fault event(s) for {expected} expected: {:?}",
        all.len(),
        all.iter().map(|f| &f.1).collect::<Vec<_>>()
    )]
}

fn checkpoints_verify(cfg: &RunConfig) -> Check {
    let invariant = "every committed checkpoint verifies";
    let store = match crate::ckpt::store::CkptStore::open(&cfg.checkpoint.dir, &cfg.checkpoint.storage_options) {
        Ok(s) => s,
        Err(e) => return Check { invariant, pass: Some(false), detail: e.to_string() },
    };
    let listed = match store.list() {
        Ok(l) => l,
        Err(e) => return Check { invariant, pass: Some(false), detail: e.to_string() },
    };
    let mut bad = vec![];
    let mut n = 0;
    for c in listed.iter().filter(|c| c.committed) {
        n += 1;
        if let Err(e) = store.load(&c.name) {
            bad.push(e.to_string());
        }
    }
    Check {
        invariant,
        pass: Some(bad.is_empty() && n > 0),
        detail: if bad.is_empty() { format!("{n} verified") } else { bad.join("; ") },
    }
}

/// Checks the sample ledger against the data order: every step's recorded digest against the samples its
/// positions map to, by the state of the epoch they fall in (the final state for the last epoch, the last
/// `epochs.jsonl` record of each earlier one); within each epoch no sample trained twice and no skipped one
/// trained; and each epoch the run finished is all its samples, trained or skipped.
fn samples_once(batch_size: u64, steps: u64, run_dir: &Path) -> Check {
    let invariant = "each epoch's samples used exactly once (or skipped)";
    let state: Option<DataState> =
        std::fs::read_to_string(run_dir.join("data_state.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let Some(state) = state else {
        return Check { invariant, pass: Some(false), detail: "no final data state (the run did not finish)".into() };
    };
    // One state per epoch: the last record of each ended epoch, then the final one.
    let mut states: BTreeMap<u64, DataState> = BTreeMap::new();
    for v in jsonl(&run_dir.join("epochs.jsonl")) {
        if let Ok(s) = serde_json::from_value::<DataState>(v) {
            states.insert(s.epoch, s);
        }
    }
    states.insert(state.epoch, state);
    let state_at = |g: u64| states.values().find(|s| g >= s.epoch_start && g < s.epoch_start + s.epoch_len());
    let mut last: BTreeMap<u64, String> = BTreeMap::new();
    for v in jsonl(&run_dir.join("samples.jsonl")) {
        if let (Some(step), Some(d)) = (v["step"].as_u64(), v["digest"].as_str()) {
            last.insert(step, d.to_string());
        }
    }
    let b = batch_size;
    let mut trained: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut mismatched = vec![];
    let mut unchecked = 0;
    for step in 0..steps {
        let Some(recorded) = last.get(&step) else {
            mismatched.push(format!("step {step} has no ledger line"));
            continue;
        };
        let Some(located) = (step * b..(step + 1) * b)
            .map(|g| state_at(g).map(|s| (s.epoch, s.locate(g).sample)))
            .collect::<Option<Vec<(u64, u64)>>>()
        else {
            unchecked += 1; // an epoch with no recorded state (a run from before the epoch ledger)
            continue;
        };
        if *recorded != format!("{:016x}", digest(located.iter().map(|&(_, id)| id))) {
            mismatched.push(format!("step {step}"));
        }
        for (epoch, id) in located {
            trained.entry(epoch).or_default().push(id);
        }
    }
    let (mut repeated, mut skipped_trained, mut skipped_total, mut incomplete) = (0, 0, 0, vec![]);
    for (epoch, ids) in &mut trained {
        let n_trained = ids.len();
        ids.sort_unstable();
        ids.dedup();
        repeated += n_trained - ids.len();
        let s = &states[epoch];
        let skipped = s.skipped();
        skipped_total += skipped.len();
        skipped_trained += skipped.iter().filter(|id| ids.binary_search(id).is_ok()).count();
        let ended = s.epoch_start + s.epoch_len() <= steps * b;
        if ended && ids.len() + skipped.len() != s.n as usize {
            incomplete.push(format!("epoch {epoch}: {} trained + {} skipped of {}", ids.len(), skipped.len(), s.n));
        }
    }
    let pass = mismatched.is_empty() && repeated == 0 && skipped_trained == 0 && incomplete.is_empty();
    Check {
        invariant,
        pass: Some(pass),
        detail: if pass {
            format!(
                "{} steps match the recorded orders over {} epoch(s); {skipped_total} skipped sample(s) accounted \
                 for{}",
                steps - unchecked,
                trained.len(),
                if unchecked > 0 {
                    format!("; {unchecked} steps of unrecorded epochs not checked")
                } else {
                    String::new()
                }
            )
        } else {
            format!(
                "{} step(s) differ ({}), {repeated} repeated, {skipped_trained} skipped but trained{}",
                mismatched.len(),
                mismatched.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                if incomplete.is_empty() { String::new() } else { format!(", incomplete: {}", incomplete.join("; ")) }
            )
        },
    }
}

fn same_weights(a: &Path, b: &Path) -> Check {
    let invariant = "final weights bit-identical to the reference";
    let read = |d: &Path| -> std::result::Result<Vec<(String, tch::Tensor)>, String> {
        let mut w =
            tch::Tensor::read_safetensors(d.join("model.safetensors")).map_err(|e| format!("{}: {e}", d.display()))?;
        w.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(w)
    };
    match (read(a), read(b)) {
        (Ok(x), Ok(y)) => {
            let differ: Vec<&String> = x
                .iter()
                .zip(&y)
                .filter(|((n, p), (m, q))| n != m || p.size() != q.size() || !p.equal(q))
                .map(|((n, _), _)| n)
                .collect();
            Check {
                invariant,
                pass: Some(differ.is_empty() && x.len() == y.len()),
                detail: if differ.is_empty() {
                    format!("{} tensors equal", x.len())
                } else {
                    format!("{differ:?} differ")
                },
            }
        }
        (Err(e), _) | (_, Err(e)) => Check { invariant, pass: Some(false), detail: e },
    }
}

/// The report as the tables `tessera chaos` prints.
pub fn render(r: &ChaosReport) -> String {
    let mut out = String::new();
    out.push_str("\nfaults\n");
    out.push_str(&format!(
        "  {:<3} {:<22} {:>6} {:>5} {:>8} {:<22} {:>9} {:>10}  {}\n",
        "#", "kind", "step", "rank", "fired", "detected as", "detect s", "recover s", "outcome"
    ));
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for (i, f) in r.faults.iter().enumerate() {
        let when = f.step.map_or_else(|| format!("{:.1}s", f.at_s.unwrap_or(0.0)), |s| s.to_string());
        out.push_str(&format!(
            "  {:<3} {:<22} {:>6} {:>5} {:>8} {:<22} {:>9} {:>10}  {} {}\n",
            i + 1,
            f.kind,
            when,
            f.rank.map_or("-".into(), |r| r.to_string()),
            opt(f.fired_s),
            f.detected_as.clone().unwrap_or_else(|| "-".into()),
            opt(f.detect_s),
            opt(f.recover_s),
            if f.ok { "ok" } else { "FAIL" },
            f.detail
        ));
    }
    out.push_str("\ninvariants\n");
    for c in &r.checks {
        let verdict = match c.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        out.push_str(&format!("  {verdict}  {:<58} {}\n", c.invariant, c.detail));
    }
    out.push_str(&format!(
        "\n{}: report {}{}\n",
        if r.passed { "chaos: all invariants hold" } else { "chaos: INVARIANTS FAILED" },
        r.run_dir.join("chaos-report.json").display(),
        r.picture.as_ref().map(|p| format!(", picture {}", p.display())).unwrap_or_default()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fault_events_pair_each_fault_with_its_detection() {
        let events = vec![
            json!({"event": "detected", "unix_s": 10.0}),
            json!({"event": "fault", "kind": "hung", "unix_s": 10.5}),
            json!({"event": "recovered", "unix_s": 11.0}),
            json!({"event": "fault", "kind": "spike", "unix_s": 20.0}),
        ];
        let f = fault_events(&events);
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].1.as_str(), f[0].2, f[0].3), ("hung", 10.0, 10.5));
        assert_eq!(f[1].2, 20.0, "without a detected line, the fault line's time");
    }

    /// A run directory as the trainer leaves it: `steps` steps of `b` samples, epoch 0 with a skipping layer.
    fn ledger(dir: &Path, b: u64, steps: u64, write_epochs: bool) {
        let mut s0 = DataState::new(20, 3, 1);
        s0.add_layer_skipping(8, 99, 0, 2).unwrap(); // epoch 0: 18 trained, 2 skipped
        let mut fin = s0.clone();
        fin.seek(steps * b);
        assert_eq!(fin.epoch, 1);
        let mut samples = String::new();
        for step in 0..steps {
            let ids = (step * b..(step + 1) * b).map(|g| if g < 18 { s0.locate(g) } else { fin.locate(g) }.sample);
            let d = format!("{:016x}", digest(ids));
            samples += &format!("{}\n", json!({"step": step, "epoch": 0, "digest": d}));
        }
        std::fs::write(dir.join("samples.jsonl"), samples).unwrap();
        std::fs::write(dir.join("data_state.json"), serde_json::to_string(&fin).unwrap()).unwrap();
        if write_epochs {
            std::fs::write(dir.join("epochs.jsonl"), serde_json::to_string(&s0).unwrap() + "\n").unwrap();
        }
    }

    #[test]
    fn the_sample_check_follows_each_epochs_own_layers_and_counts_a_finished_epoch_whole() {
        let dir = tempfile::tempdir().unwrap();
        ledger(dir.path(), 4, 8, true);
        let c = samples_once(4, 8, dir.path());
        assert_eq!(c.pass, Some(true), "{}", c.detail);
        assert!(c.detail.contains("8 steps match") && c.detail.contains("2 epoch(s)"), "{}", c.detail);

        // A step that recorded other samples (here: step 1's again) is caught, in the ended epoch too.
        let text = std::fs::read_to_string(dir.path().join("samples.jsonl")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let d1 = serde_json::from_str::<Value>(lines[1]).unwrap()["digest"].clone();
        let twice = json!({"step": 2, "epoch": 0, "digest": d1});
        std::fs::write(dir.path().join("samples.jsonl"), format!("{text}{twice}\n")).unwrap();
        let c = samples_once(4, 8, dir.path());
        assert_eq!(c.pass, Some(false), "{}", c.detail);
        assert!(c.detail.contains("step 2"), "{}", c.detail);
    }

    #[test]
    fn without_the_epoch_ledger_earlier_epochs_are_reported_unchecked_not_passed_as_checked() {
        let dir = tempfile::tempdir().unwrap();
        ledger(dir.path(), 4, 8, false);
        let c = samples_once(4, 8, dir.path());
        // Epoch 0's positions map by the final state's epoch range only from 18 on: the first steps are
        // unchecked, and the step straddling the boundary too.
        assert!(c.detail.contains("not checked"), "{}", c.detail);
    }
}
