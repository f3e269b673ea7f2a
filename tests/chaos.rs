//! `tessera chaos` end to end, with real rank processes: a seeded schedule with every kind of fault passes
//! every invariant; faults that keep the data order end bit-identical to the fault-free reference; a fault
//! that goes undetected fails the run (exit code 1) with the table saying which; a schedule the run cannot
//! carry out is refused before anything runs (exit code 2).

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera::data::TokenizerKind;

/// Two ranks on the tiny preset, a checkpoint every 5 steps, a 3 s hang timeout, the spike detector armed
/// from step 8 with a patience of 3.
fn config(corpus: &Path, run_dir: &Path, steps: u64) -> PathBuf {
    let path = run_dir.with_extension("toml");
    let text = format!(
        "run_dir = {:?}\nseed = 3\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\neval_fraction = 0.02\n[train]\nsteps = {steps}\nbatch_size = 8\nmicro_batch = 4\nlr = 3e-3\nwarmup_steps = 5\nlog_every = 7\nread_every = 4\neval_every = 0\ncheckpoint_every = 5\n[launch]\nhang_timeout_s = 3\nrdzv_timeout_s = 10\n[spike]\nwarmup_steps = 8\npatience = 3\n",
        run_dir.display().to_string(),
        corpus.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn chaos(cfg: &Path, args: &[&str]) -> Output {
    chaos_with(&["--nproc", "2"], cfg, args)
}

/// Two simulated nodes (two launchers on loopback) with one rank each.
fn chaos_on_two_nodes(cfg: &Path, args: &[&str]) -> Output {
    chaos_with(&["--nproc", "1", "--nnodes", "2"], cfg, args)
}

fn chaos_with(layout: &[&str], cfg: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("chaos")
        .args(layout)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

fn report(run_dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("chaos-report.json")).unwrap()).unwrap()
}

fn check<'a>(report: &'a Value, starts: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["invariant"].as_str().unwrap().starts_with(starts))
        .unwrap_or_else(|| panic!("no check {starts:?} in {report}"))
}

fn corpus(tmp: &Path) -> PathBuf {
    let corpus = tmp.join("corpus");
    common::stdlib_corpus(&corpus, 20, TokenizerKind::Byte);
    corpus
}

#[test]
fn a_seeded_schedule_with_every_kind_of_fault_passes_every_invariant() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("every-kind");
    let out = chaos(&config(&corpus, &run, 170), &["--random", "12", "--seed", "7"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("chaos: all invariants hold"), "{stdout}");

    let r = report(&run);
    let faults = r["faults"].as_array().unwrap();
    let mut kinds: Vec<&str> = faults.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), 12, "every kind of fault: {kinds:?}");
    for f in faults {
        assert_eq!(f["ok"], true, "{f}");
        assert!(f["fired_s"].as_f64().is_some(), "{f}");
    }
    // Faults that stop the gang were detected and recovered from, with their latencies measured.
    let hang = faults.iter().find(|f| f["kind"] == "hang_rank").unwrap();
    assert_eq!(hang["detected_as"], "hung");
    assert!(hang["detect_s"].as_f64().unwrap() <= 3.0 + 1.0, "{hang}");
    assert!(faults.iter().filter(|f| f["recover_s"].is_number()).count() >= 8);
    for c in r["checks"].as_array().unwrap() {
        assert_ne!(c["pass"], false, "{c}");
    }
    assert_eq!(check(&r, "final weights")["pass"], Value::Null, "spikes reshuffle: not comparable");
    let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("spike"), "the picture marks the faults");
}

#[test]
fn faults_that_keep_the_data_order_end_bit_identical_to_the_fault_free_run() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("in-order");
    let schedule = common::repo().join("tests/chaos/no-reshuffle.toml");
    let out = chaos(&config(&corpus, &run, 65), &["--schedule", schedule.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&run);
    assert_eq!(check(&r, "final weights")["pass"], true, "{r}");
    assert_eq!(r["launches"], 2, "the killed launcher was run again");
    let outage = r["faults"].as_array().unwrap().iter().find(|f| f["kind"] == "storage_outage").unwrap();
    assert_eq!(outage["ok"], true, "{outage}");
    assert!(outage["detail"].as_str().unwrap().contains("waited"), "the restart waited for the store: {outage}");
}

#[test]
fn on_two_simulated_nodes_every_kind_of_fault_is_recovered_from_and_every_invariant_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("two-nodes-every-kind");
    let out = chaos_on_two_nodes(&config(&corpus, &run, 170), &["--random", "12", "--seed", "7"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("chaos: all invariants hold"), "{stdout}");
    let r = report(&run);
    let faults = r["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 12);
    // Rank 1 runs under node 1's launcher: its faults were recovered from across nodes.
    assert!(faults.iter().any(|f| f["rank"] == 1 && f["kind"] == "kill_rank" && f["ok"] == true), "{r}");
    for c in r["checks"].as_array().unwrap() {
        assert_ne!(c["pass"], false, "{c}");
    }
}

#[test]
fn on_two_simulated_nodes_faults_that_keep_the_data_order_end_bit_identical_to_one_node_without_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("two-nodes-in-order");
    let schedule = common::repo().join("tests/chaos/no-reshuffle.toml");
    let out = chaos_on_two_nodes(&config(&corpus, &run, 65), &["--schedule", schedule.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&run);
    assert_eq!(check(&r, "final weights")["pass"], true, "{r}");
    assert_eq!(r["launches"], 2, "node 0's killed launcher was run again, with node 1's");
    // The simulated nodes all run here: no warning that a loopback --rdzv only reaches this machine.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("is a loopback address"), "{stderr}");
}

#[test]
fn a_fault_at_a_time_is_sent_as_a_signal_and_recovered_from() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("timed");
    let schedule = tmp.path().join("timed-schedule.toml");
    // SIGSTOP rank 1 1.5 s into a run long enough to be training then.
    std::fs::write(&schedule, "[[fault]]\nkind = \"hang_rank\"\nat_s = 1.5\nrank = 1\n").unwrap();
    let out = chaos(&config(&corpus, &run, 400), &["--schedule", schedule.to_str().unwrap(), "--no-reference"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let f = &report(&run)["faults"][0];
    assert_eq!((f["detected_as"].as_str(), f["ok"].as_bool()), (Some("hung"), Some(true)), "{f}");
    assert!((f["fired_s"].as_f64().unwrap() - 1.5).abs() < 0.5, "{f}");
}

#[test]
fn a_fault_that_goes_undetected_fails_the_run_and_says_which() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("blind");
    let schedule = tmp.path().join("spike.toml");
    std::fs::write(&schedule, "[[fault]]\nkind = \"loss_spike\"\nstep = 12\n").unwrap();
    let cfg = config(&corpus, &run, 40);
    let out =
        chaos(&cfg, &["--schedule", schedule.to_str().unwrap(), "--no-reference", "--set", "spike.enabled=false"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL") && stdout.contains("expected 1 spike fault(s), found 0"), "{stdout}");
    assert_eq!(check(&report(&run), "every fault")["pass"], false);
}

#[test]
fn a_schedule_the_run_cannot_carry_out_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("refused");
    let cfg = config(&corpus, &run, 40);
    for (text, says) in [
        ("[[fault]]\nkind = \"nan\"\nat_s = 1.0\n", "fires at a step, not at a time"),
        ("[[fault]]\nkind = \"kill_rank\"\nstep = 3\nrank = 2\n", "rank 2 is past the world of 2 ranks"),
        ("[[fault]]\nkind = \"loss_spike\"\nstep = 2\n", "before the spike detector judges anything"),
        ("[[fault]]\nkind = \"meteor\"\nstep = 2\n", "unknown variant `meteor`"),
    ] {
        let schedule = tmp.path().join("bad.toml");
        std::fs::write(&schedule, text).unwrap();
        let out = chaos(&cfg, &["--schedule", schedule.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!run.join("metrics.jsonl").exists(), "nothing ran");
    }
}
