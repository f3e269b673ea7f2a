//! Supervision with real rank processes: a killed rank is replaced and the gang rolls back to its newest
//! checkpoint, ending with the weights of a run that never failed; a stopped (SIGSTOP) rank is detected
//! within the hang timeout, named, and recovered from; a rank that crashes at every start stops the run after
//! the restart limit, with a clear message and its own exit code; storage that stops answering (a real S3
//! server behind a gate that refuses connections) is waited for, not counted as crashes.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tessera::data::TokenizerKind;

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Two ranks with ZeRO-2 on the tiny preset, a checkpoint every 5 steps, a 3 s hang timeout.
fn config(corpus: &Path, run_dir: &Path, steps: u64) -> PathBuf {
    let path = run_dir.with_extension("toml");
    let text = format!(
        "run_dir = {:?}\nseed = 5\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\neval_fraction = 0.02\n[train]\nsteps = {steps}\nbatch_size = 8\nmicro_batch = 2\nlr = 3e-3\nwarmup_steps = 2\nlog_every = 1\neval_every = 0\nzero = 2\ncheckpoint_every = 5\n[launch]\nhang_timeout_s = 3\nmax_restarts = 2\n",
        run_dir.display().to_string(),
        corpus.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn launch(cfg: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = tessera();
    c.arg("launch").arg("--config").arg(cfg).args(["--nproc", "2"]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn weights(run_dir: &Path) -> Vec<(String, tch::Tensor)> {
    let mut w = tch::Tensor::read_safetensors(run_dir.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn events(run_dir: &Path) -> Vec<Value> {
    common::read_lines(&run_dir.join("events.jsonl")).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn event<'a>(events: &'a [Value], name: &str) -> &'a Value {
    events.iter().find(|e| e["event"] == name).unwrap_or_else(|| panic!("no {name} event in {events:?}"))
}

/// Starts a launch in the background and returns once the checkpoint after step 10 is committed.
fn start_until_step_10(cfg: &Path, run: &Path) -> std::process::Child {
    let child = tessera()
        .arg("launch")
        .arg("--config")
        .arg(cfg)
        .args(["--nproc", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run.join("checkpoints/step-000000010/manifest.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint after step 10");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

fn rank_pid(launcher: u32, rank: usize) -> i32 {
    common::children(launcher)
        .into_iter()
        .find(|&p| common::environ(p).contains(&format!("TESSERA_RANK={rank}")))
        .unwrap_or_else(|| panic!("rank {rank} is running")) as i32
}

fn straight(tmp: &Path, corpus: &Path, steps: u64) -> PathBuf {
    let dir = tmp.join("straight");
    let out = launch(&config(corpus, &dir, steps), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir
}

fn assert_same_weights(a: &Path, b: &Path) {
    for ((n, x), (_, y)) in weights(a).iter().zip(&weights(b)) {
        assert!(x.equal(y), "{n} differs between {} and {}", a.display(), b.display());
    }
}

#[test]
fn a_killed_rank_is_replaced_and_the_run_ends_with_the_weights_of_a_run_that_never_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 4, TokenizerKind::Byte);
    let straight = straight(tmp.path(), &corpus, 40);

    let run = tmp.path().join("killed");
    let child = start_until_step_10(&config(&corpus, &run, 40), &run);
    unsafe { libc::kill(rank_pid(child.id(), 1), libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("rank 1 failed") && err.contains("restarting the gang from its checkpoint"), "{err}");

    assert_same_weights(&straight, &run);
    let ev = events(&run);
    assert_eq!(event(&ev, "fault")["kind"], "rank_failed");
    assert_eq!(event(&ev, "fault")["ranks"], serde_json::json!([1]));
    let restart = event(&ev, "restart");
    assert!(restart["resume_from_step"].as_u64().unwrap() >= 10, "{restart}");
    // Only the killed rank got a new process: rank 0 was reset in place (same process, joined the next gang).
    assert_eq!(restart["reset_in_place"], serde_json::json!([0]), "{restart}");
    assert!(err.contains("rank 0: reset in place"), "{err}");
    let recovered = event(&ev, "recovered");
    assert!(recovered["recover_s"].as_f64().unwrap() > 0.0);
    // Where the new gang really resumed: the restart's checkpoint, or one committed while it restarted.
    let resumed = ev.iter().find(|e| e["event"] == "resumed" && e["attempt"] == restart["attempt"]).expect("resumed");
    let at = resumed["step"].as_u64().unwrap();
    assert!(at >= restart["resume_from_step"].as_u64().unwrap(), "{resumed} {restart}");
    assert_eq!(recovered["resumed_at"], at, "{recovered}");
    assert_eq!(recovered["lost_steps"], resumed["lost_steps"]);
    let last = event(&ev, "fault")["last_step"].as_u64().unwrap();
    assert_eq!(recovered["lost_steps"].as_u64(), Some(last.saturating_sub(at)), "{recovered}");
    assert_eq!(event(&ev, "finished")["steps"], 40);
}

#[test]
fn a_stopped_rank_is_detected_within_the_hang_timeout_named_and_recovered_from() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 4, TokenizerKind::Byte);
    let straight = straight(tmp.path(), &corpus, 40);

    let run = tmp.path().join("stopped");
    let child = start_until_step_10(&config(&corpus, &run, 40), &run);
    let stopped_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    unsafe { libc::kill(rank_pid(child.id(), 1), libc::SIGSTOP) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("rank(s) [1] hung") && err.contains("no heartbeat"), "{err}");

    let ev = events(&run);
    let fault = event(&ev, "fault");
    assert_eq!((fault["kind"].as_str(), &fault["ranks"]), (Some("hung"), &serde_json::json!([1])));
    let latency = event(&ev, "detected")["unix_s"].as_f64().unwrap() - stopped_at;
    assert!(latency <= 3.0 + 1.0, "detected {latency:.2} s after SIGSTOP; the hang timeout is 3 s");
    event(&ev, "recovered");
    assert_same_weights(&straight, &run);
}

#[test]
fn a_rank_that_crashes_at_every_start_stops_the_run_after_the_restart_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    let run = tmp.path().join("crashing");
    let out = launch(&config(&corpus, &run, 10), &[("TESSERA_FAILPOINTS", "worker.start.rank1=error")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("stopped after 2 gang restart(s)") && err.contains("rank 1 failed"), "{err}");
    let ev = events(&run);
    assert_eq!(ev.iter().filter(|e| e["event"] == "restart").count(), 2);
    event(&ev, "gave_up");
}

#[test]
fn sigterm_makes_the_launcher_checkpoint_a_common_step_and_exit_cleanly_and_a_rerun_resumes_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 4, TokenizerKind::Byte);
    let straight = straight(tmp.path(), &corpus, 300);

    let run = tmp.path().join("preempted");
    let cfg = config(&corpus, &run, 300);
    let mut child = tessera()
        .arg("launch")
        .arg("--config")
        .arg(&cfg)
        .args(["--nproc", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while common::read_lines(&run.join("metrics.jsonl")).len() < 12 {
        assert!(Instant::now() < deadline, "training never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the launcher did not stop within 60 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("preempted: stopped after step"), "{text}");
    let stopped: u64 =
        text.split("stopped after step ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
    assert!(stopped < 300, "stopped early, at {stopped}");
    let name = format!("step-{stopped:09}");
    assert!(run.join("checkpoints").join(&name).join("manifest.json").exists(), "{name} was committed");
    event(&events(&run), "preempted");

    let out = launch(&cfg, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("at step {stopped}")), "{err}");
    assert_same_weights(&straight, &run);
}

#[test]
fn a_preemption_that_lands_during_a_restart_reaches_the_new_gang_which_checkpoints_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 4, TokenizerKind::Byte);
    let run = tmp.path().join("preempted-in-restart");
    let state = tmp.path().join("chaos-state");
    std::fs::create_dir_all(&state).unwrap();
    let mut child = tessera()
        .arg("launch")
        .arg("--config")
        .arg(config(&corpus, &run, 100_000))
        .args(["--nproc", "2"])
        .env("TESSERA_FAILPOINTS", "train.step.rank1.step12=kill@once")
        .env("TESSERA_CHAOS_STATE", &state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The moment the supervisor decides to restart, before the new gang's ranks have joined.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !common::read_lines(&run.join("events.jsonl")).iter().any(|l| l.contains(r#""event":"restart""#)) {
        assert!(Instant::now() < deadline, "rank 1 was never killed and restarted");
        std::thread::sleep(Duration::from_millis(2));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // The new gang must hear of it: before, its ranks trained on until the 120 s grace killed them (exit 1).
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(100), "the preemption never reached the new gang");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stopped: u64 = text
        .split("stopped after step ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(run.join(format!("checkpoints/step-{stopped:09}/manifest.json")).exists(), "its checkpoint committed");
    event(&events(&run), "preempted");
}

/// Scrapes `addr`'s /metrics and parses it with Python's prometheus_client (OpenMetrics parser).
#[test]
fn the_metrics_endpoint_serves_training_checkpoint_and_recovery_metrics_that_prometheus_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 4, TokenizerKind::Byte);
    let run = tmp.path().join("metrics");
    let cfg = config(&corpus, &run, 100_000);
    let addr = format!("127.0.0.1:{}", common::moto::free_port());
    let mut child = tessera()
        .arg("launch")
        .arg("--config")
        .arg(&cfg)
        .args(["--nproc", "2", "--metrics-addr", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run.join("checkpoints/step-000000010/manifest.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint after step 10");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500)); // a few heartbeats and progress reports
    let m = common::scrape(&addr);
    assert!(common::sample(&m, "tessera_step", None) >= 10.0);
    let loss = common::sample(&m, "tessera_loss", None);
    assert!(loss.is_finite() && loss > 0.0 && loss < 6.0, "loss {loss}");
    assert!(common::sample(&m, "tessera_tokens_per_second", None) > 0.0);
    assert!(common::sample(&m, "tessera_learning_rate", None) > 0.0);
    assert_eq!(common::sample(&m, "tessera_micro_batch", None), 2.0, "the config's micro_batch");
    assert!(common::sample(&m, "tessera_step_seconds_count", None) > 0.0);
    assert!(common::sample(&m, "tessera_data_wait_seconds_count", None) > 0.0);
    assert!(common::sample(&m, "tessera_checkpoints_committed_total", None) >= 2.0);
    assert!(common::sample(&m, "tessera_checkpoint_stall_seconds_count", None) >= 2.0);
    // The tiny model's parameters and AdamW moments (ZeRO-2: each rank's shard), a little over 3 x 4 bytes each.
    let params = 120_576.0; // the tiny preset with the byte vocabulary, see `tessera presets`
    let bytes = common::sample(&m, "tessera_checkpoint_bytes", None);
    assert!(bytes > 12.0 * params && bytes < 13.0 * params, "checkpoint bytes {bytes}");
    assert!(common::sample(&m, "tessera_checkpoint_written_bytes_total", None) >= 2.0 * bytes);
    assert!(common::sample(&m, "tessera_heartbeat_age_seconds", Some(("rank", "1"))) < 3.0);
    assert!(common::sample(&m, "tessera_goodput_ratio", None) > 0.5);

    // A fault shows up as a restart and a rollback by reason, with detection and recovery times.
    let step_before = common::sample(&m, "tessera_step", None);
    unsafe { libc::kill(rank_pid(child.id(), 1), libc::SIGKILL) };
    let m = loop {
        let m = common::scrape(&addr);
        if m.contains_key("tessera_restarts_total") && common::sample(&m, "tessera_recover_seconds_count", None) > 0.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "no recovery in the metrics");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(common::sample(&m, "tessera_restarts_total", Some(("reason", "rank_failed"))), 1.0);
    assert_eq!(common::sample(&m, "tessera_rollbacks_total", Some(("reason", "rank_failed"))), 1.0);
    assert!(common::sample(&m, "tessera_detect_seconds_count", None) >= 1.0);
    assert!(common::sample(&m, "tessera_lost_steps_total", None) <= step_before);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_corrupt_corpus_stops_the_gang_at_once_naming_the_shard_instead_of_restarting_into_the_same_error() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    // One flipped byte in every shard: whichever a rank reads first fails its checksum.
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "bin") {
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[0] ^= 1;
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let run = tmp.path().join("corrupt");
    let out = launch(&config(&corpus, &run, 10), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is corrupt") && err.contains("not restarted"), "{err}");
    let ev = events(&run);
    assert_eq!(ev.iter().filter(|e| e["event"] == "restart").count(), 0, "{ev:?}");
    assert_eq!(event(&ev, "fault")["kind"], "unrecoverable");
}

/// The config of [`config`] with its checkpoints in `s3://ckpts/RUN` reached through `endpoint`, and at most
/// `max_restarts` crash restarts.
fn config_in_bucket(corpus: &Path, run: &Path, steps: u64, endpoint: &str, max_restarts: usize) -> PathBuf {
    let path = config(corpus, run, steps);
    let options: Vec<String> = common::moto::s3_options(endpoint).iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
    let mut text =
        std::fs::read_to_string(&path).unwrap().replace("max_restarts = 2", &format!("max_restarts = {max_restarts}"));
    let name = run.file_name().unwrap().to_str().unwrap();
    text += &format!("[checkpoint]\ndir = \"s3://ckpts/{name}\"\nstorage_options = {{ {} }}\n", options.join(", "));
    std::fs::write(&path, text).unwrap();
    path
}

/// A real S3 server with the bucket `ckpts`, behind a gate that can refuse connections, and a corpus of
/// `files` standard-library modules in a scratch directory.
struct BehindAGate {
    gate: common::gate::Gate,
    moto: common::moto::Moto,
    tmp: tempfile::TempDir,
    corpus: PathBuf,
}

impl BehindAGate {
    fn new(files: usize) -> Self {
        let moto = common::moto::Moto::start();
        moto.create_bucket("ckpts");
        let gate = common::gate::Gate::start(moto.port());
        let tmp = tempfile::tempdir().unwrap();
        let corpus = tmp.path().join("corpus");
        common::stdlib_corpus(&corpus, files, TokenizerKind::Byte);
        BehindAGate { gate, moto, tmp, corpus }
    }

    /// A run named `name` checkpointing into the bucket through the gate.
    fn config(&self, name: &str, steps: u64, max_restarts: usize) -> (PathBuf, PathBuf) {
        let run = self.tmp.path().join(name);
        (config_in_bucket(&self.corpus, &run, steps, &self.gate.endpoint(), max_restarts), run)
    }

    /// The run's checkpoints, read past the gate.
    fn store(&self, name: &str) -> tessera::ckpt::store::CkptStore {
        let url = format!("s3://ckpts/{name}");
        tessera::ckpt::store::CkptStore::open(&url, &common::moto::s3_options(&self.moto.endpoint())).unwrap()
    }
}

fn spawn_launch(cfg: &Path) -> std::process::Child {
    tessera().arg("launch").arg("--config").arg(cfg).args(["--nproc", "2"]).stderr(Stdio::piped()).spawn().unwrap()
}

fn wait_for_event(run: &Path, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run.join("events.jsonl").exists() || !events(run).iter().any(|e| e["event"] == name) {
        assert!(Instant::now() < deadline, "no {name} event within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_rank_killed_while_the_store_is_down_restarts_once_it_answers_and_ends_as_if_it_never_failed() {
    let s3 = BehindAGate::new(4);
    let straight = straight(s3.tmp.path(), &s3.corpus, 40);

    // One crash restart allowed: the kill takes it, so waiting for the store must not count as another.
    let (cfg, run) = s3.config("outage", 40, 1);
    let child = spawn_launch(&cfg);
    let store = s3.store("outage");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !store.list().unwrap().iter().any(|c| c.committed && c.step >= 10) {
        assert!(Instant::now() < deadline, "no checkpoint after step 10 in the bucket");
        std::thread::sleep(Duration::from_millis(20));
    }
    s3.gate.close();
    unsafe { libc::kill(rank_pid(child.id(), 1), libc::SIGKILL) };
    wait_for_event(&run, "storage_wait");
    std::thread::sleep(Duration::from_secs(3));
    s3.gate.open();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("waiting for the storage to answer"), "{err}");
    assert!(err.contains("the storage answers again after"), "{err}");

    assert_same_weights(&straight, &run);
    let ev = events(&run);
    event(&ev, "storage_back");
    let restarts: Vec<&Value> = ev.iter().filter(|e| e["event"] == "restart").collect();
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert_eq!(restarts[0]["n"], 1, "the kill's restart, counted once: {restarts:?}");
    assert!(restarts[0]["resume_from_step"].as_u64().unwrap() >= 10, "{restarts:?}");
    assert_eq!(event(&ev, "finished")["steps"], 40);
}

#[test]
fn ranks_that_cannot_reach_the_checkpoint_store_at_start_are_waited_for_not_counted_as_crashes() {
    let s3 = BehindAGate::new(2);
    s3.gate.close();
    // No crash restart allowed at all: the ranks' storage failures must not count as crashes.
    let (cfg, run) = s3.config("closed", 10, 0);
    let child = spawn_launch(&cfg);
    wait_for_event(&run, "storage_wait");
    s3.gate.open();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("could not reach the storage") && err.contains("the store is unavailable"), "{err}");
    let ev = events(&run);
    assert_eq!(event(&ev, "fault")["kind"], "storage");
    let restart = event(&ev, "restart");
    assert_eq!(restart["n"], Value::Null, "not counted: {restart}");
    assert_eq!(restart["reason"], "storage");
    assert_eq!(event(&ev, "finished")["steps"], 10);
    assert_eq!(s3.store("closed").newest_committed_step().unwrap(), Some(10));
}

#[test]
fn storage_that_stays_down_stops_the_launch_after_launch_storage_wait_s_with_exit_code_3() {
    let s3 = BehindAGate::new(2);
    s3.gate.close();
    let (cfg, run) = s3.config("down", 10, 3);
    let out = tessera()
        .arg("launch")
        .arg("--config")
        .arg(&cfg)
        .args(["--nproc", "2", "--set", "launch.storage_wait_s=2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("waiting") && err.contains("for the storage to answer (launch.storage_wait_s)"), "{err}");
    let ev = events(&run);
    assert_eq!(ev.iter().filter(|e| e["event"] == "restart").count(), 0, "{ev:?}");
    assert_eq!(event(&ev, "gave_up")["reason"], "storage");
}

#[test]
fn a_checkpoint_bucket_that_does_not_exist_stops_the_launch_at_once_saying_so_with_exit_code_2() {
    let moto = common::moto::Moto::start();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    let run = tmp.path().join("nobucket");
    let out = launch(&config_in_bucket(&corpus, &run, 10, &moto.endpoint(), 3), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the bucket does not exist: create it"), "{err}");
    let ev = events(&run);
    assert_eq!(ev.iter().filter(|e| e["event"] == "restart").count(), 0, "not restarted: {ev:?}");
}
