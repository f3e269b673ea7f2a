//! `tessera launch`: real rank processes on loopback. Data parallelism and ZeRO give what one rank gives;
//! set-up problems are clear errors within bounded time; a killed rank stops the gang without orphans.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tessera::data::TokenizerKind;

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// A config for the tiny preset on `corpus` writing to `run_dir`.
fn config(dir: &Path, corpus: &Path, run_dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join(format!("{}.toml", run_dir.file_name().unwrap().to_string_lossy()));
    let text = format!(
        "run_dir = {:?}\nseed = 3\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\neval_fraction = 0.02\n[train]\nsteps = 20\nbatch_size = 12\nmicro_batch = 2\nlr = 3e-3\nwarmup_steps = 2\nlog_every = 1\neval_every = 0\ncheck_every = 5\n{extra}",
        run_dir.display().to_string(),
        corpus.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn launch(cfg: &Path, nproc: usize, sets: &[&str]) -> Output {
    let mut cmd = tessera();
    cmd.arg("launch").arg("--config").arg(cfg).arg("--nproc").arg(nproc.to_string());
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output().unwrap()
}

fn weights(run_dir: &Path) -> Vec<(String, tch::Tensor)> {
    let mut w = tch::Tensor::read_safetensors(run_dir.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// Starts a two-rank launch that would run for a long time, and returns once training is under way.
/// With `capture`, the launcher's output is piped for the test to read; otherwise discarded.
fn start_long_launch(tmp: &Path, capture: bool, extra: &str) -> (std::process::Child, Vec<u32>) {
    let corpus = tmp.join("corpus");
    common::stdlib_corpus(&corpus, 4, TokenizerKind::Byte);
    let run = tmp.join("run");
    let cfg = config(tmp, &corpus, &run, extra);
    let output = || if capture { std::process::Stdio::piped() } else { std::process::Stdio::null() };
    let mut child = tessera()
        .arg("launch")
        .arg("--config")
        .arg(&cfg)
        .args(["--nproc", "2", "--set", "train.steps=100000"])
        .stdout(output())
        .stderr(output())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::read_lines(&run.join("metrics.jsonl")).len() < 2 {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("training never started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let workers = common::children(child.id());
    assert_eq!(workers.len(), 2, "two worker processes: {workers:?}");
    (child, workers)
}

#[test]
fn two_and_three_ranks_with_and_without_zero_match_one_rank_over_twenty_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 4, TokenizerKind::Byte);
    let run = |name: &str, nproc: usize, zero: u8| {
        let dir = tmp.path().join(name);
        let cfg = config(tmp.path(), &corpus, &dir, &format!("zero = {zero}\n"));
        let out = launch(&cfg, nproc, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {err}");
        // The leader measures its optimizer state: about 1/W of the model's with ZeRO.
        let pct: f64 = err
            .lines()
            .find_map(|l| l.split(" unsharded (").nth(1))
            .and_then(|r| r.trim_end_matches("%)").parse().ok())
            .expect("the optimizer-state line");
        let want = if zero == 0 { 100.0 } else { 100.0 / nproc as f64 };
        assert!((pct - want).abs() < 0.5, "{name}: optimizer state is {pct}% of unsharded, expected about {want}%");
        (common::losses(&dir), weights(&dir))
    };
    let (base_losses, base_weights) = run("w1", 1, 0);
    assert_eq!(base_losses.len(), 20);
    // Tolerances: the ring sums gradients in another order than one process does, so results agree to float
    // rounding, not bit for bit: losses to 1e-5, weights (after 20 steps at lr 3e-3) to 1e-4.
    for (name, nproc, zero) in [("w2", 2, 0), ("w3", 3, 0), ("w2z2", 2, 2), ("w3z1", 3, 1)] {
        let (losses, w) = run(name, nproc, zero);
        assert_eq!(losses.len(), base_losses.len(), "{name}");
        for ((step, a), (_, b)) in losses.iter().zip(&base_losses) {
            assert!((a - b).abs() < 1e-5, "{name}: loss at step {step} is {a}, one rank gives {b}");
        }
        for ((n, a), (_, b)) in w.iter().zip(&base_weights) {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-4, "{name}: {n} differs from one rank's by {d}");
        }
    }
}

#[test]
fn a_worker_that_cannot_reach_the_rendezvous_fails_clearly_within_its_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 1, TokenizerKind::Byte);
    let cfg = config(tmp.path(), &corpus, &tmp.path().join("run"), "[launch]\nrdzv_timeout_s = 2\n");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // then dropped
    let t0 = Instant::now();
    let out = tessera()
        .args(["worker", "--config"])
        .arg(&cfg)
        .env("TESSERA_RDZV", closed.to_string())
        .env("TESSERA_SECRET", "x")
        .env("TESSERA_RANK", "0")
        .env("TESSERA_WORLD", "2")
        .env("TESSERA_LOCAL_RANK", "0")
        .output()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(30), "bounded by the rendezvous timeout");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the rendezvous") && err.contains(&closed.to_string()), "{err}");
}

#[test]
fn a_rank_killed_mid_run_with_no_restarts_allowed_stops_the_gang_naming_it_and_leaves_no_orphans() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, workers) = start_long_launch(tmp.path(), true, "[launch]\nmax_restarts = 0\n");
    let rank1 = workers.iter().copied().find(|&p| common::environ(p).contains("TESSERA_RANK=1")).unwrap();
    unsafe { libc::kill(rank1 as i32, libc::SIGKILL) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the launcher did not stop after a rank was killed");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("rank 1 failed") && err.contains("SIGKILL") && err.contains("max_restarts"), "{err}");
    for p in workers {
        assert!(!Path::new(&format!("/proc/{p}")).exists() || common::is_zombie(p), "worker {p} outlived the launcher");
    }
}

#[test]
fn asking_for_more_ranks_than_gpus_or_for_cuda_on_a_cpu_host_is_refused_before_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 1, TokenizerKind::Byte);
    let cfg = config(tmp.path(), &corpus, &tmp.path().join("run"), "");
    let out = launch(&cfg, 64, &["device=\"cuda\""]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUDA is not available") || err.contains("larger than the"), "{err}");
    assert!(!tmp.path().join("run").exists(), "nothing started");
}

#[test]
fn workers_exit_by_themselves_when_the_launcher_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, workers) = start_long_launch(tmp.path(), false, "");
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let t0 = Instant::now();
    while workers.iter().any(|&p| Path::new(&format!("/proc/{p}")).exists() && !common::is_zombie(p)) {
        assert!(t0.elapsed() < Duration::from_secs(30), "workers {workers:?} outlived their launcher by 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn workers_still_starting_when_the_launcher_is_killed_stop_instead_of_waiting_for_its_rendezvous() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 1, TokenizerKind::Byte);
    // A long rendezvous timeout, which an orphan used to wait out, holding its memory (or GPU).
    let cfg = config(tmp.path(), &corpus, &tmp.path().join("run"), "[launch]\nrdzv_timeout_s = 600\n");
    let mut child = tessera()
        .arg("launch")
        .arg("--config")
        .arg(&cfg)
        .args(["--nproc", "2"])
        .env("TESSERA_FAILPOINTS", "worker.start=sleep(2000)") // both still starting when the launcher dies
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let workers = loop {
        let w = common::children(child.id());
        if w.len() == 2 {
            break w;
        }
        assert!(Instant::now() < deadline, "the workers never started: {w:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let t0 = Instant::now();
    while workers.iter().any(|&p| Path::new(&format!("/proc/{p}")).exists() && !common::is_zombie(p)) {
        assert!(t0.elapsed() < Duration::from_secs(30), "workers {workers:?} waited for a dead launcher");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_launcher_killed_mid_way_and_run_again_resumes_from_its_last_checkpoint_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 4, TokenizerKind::Byte);
    let extra = "checkpoint_every = 5\nzero = 2\n";
    let sets = ["train.steps=40"];
    // Straight through.
    let straight = tmp.path().join("straight");
    let out = launch(&config(tmp.path(), &corpus, &straight, extra), 2, &sets);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Interrupted: kill -9 the launcher once step 10's checkpoint is committed (its workers exit by
    // themselves), then run the same command again.
    let resumed = tmp.path().join("resumed");
    let cfg = config(tmp.path(), &corpus, &resumed, extra);
    let mut child = tessera()
        .arg("launch")
        .arg("--config")
        .arg(&cfg)
        .args(["--nproc", "2", "--set", sets[0]])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !resumed.join("checkpoints/step-000000010/manifest.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint at step 10");
        std::thread::sleep(Duration::from_millis(5));
    }
    let workers = common::children(child.id());
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success(), "the first attempt must have been interrupted");
    while workers.iter().any(|&p| Path::new(&format!("/proc/{p}")).exists() && !common::is_zombie(p)) {
        assert!(Instant::now() < deadline, "workers outlived their launcher");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = launch(&cfg, 2, &sets);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resumed from"), "{err}");

    // The same weights, bit for bit, and the same loss at every step (the last logged value per step).
    for ((n, a), (_, b)) in weights(&straight).iter().zip(&weights(&resumed)) {
        assert!(a.equal(b), "{n} differs after resuming");
    }
    let last_per_step =
        |dir: &Path| -> std::collections::BTreeMap<u64, f64> { common::losses(dir).into_iter().collect() };
    assert_eq!(last_per_step(&straight), last_per_step(&resumed));
}
