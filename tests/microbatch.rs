//! Auto micro-batching (`train.micro_batch = "auto"`): out of memory in forward/backward, injected on the CPU
//! through the `train.oom.rankR.stepS` failpoint, halves the micro-batch on every rank and retries the same
//! step with the same samples; the size chosen is recorded in the metrics and the checkpoints, and a resumed
//! run starts from it. Real `tessera train` / `tessera launch` processes on the tiny preset.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera::comm::Solo;
use tessera::data::{Batch, TokenizerKind};
use tessera::model::optim::ShardLayout;
use tessera::model::{preset, AdamW, AdamWConfig, Gpt};
use tessera::train::step::{try_step, StepFaults, StepOutcome};
use tessera::train::{TrainOptions, Trainer};

/// Losses of runs that cut the same samples differently agree up to float rounding (at most 1.5e-6 measured
/// over these six steps).
const LOSS_TOLERANCE: f64 = 1e-4;

fn corpus(tmp: &Path) -> PathBuf {
    let corpus = tmp.join("corpus");
    common::stdlib_corpus(&corpus, 3, TokenizerKind::Byte);
    corpus
}

/// A tiny run with `micro_batch = "auto"`: 6 steps of `batch` samples, every step logged and checked.
fn config(corpus: &Path, run_dir: &Path, batch: u64, extra: &str) -> PathBuf {
    let path = run_dir.with_extension("toml");
    let text = format!(
        "run_dir = {:?}\nseed = 7\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\neval_fraction = 0.05\n[train]\nsteps = 6\nbatch_size = {batch}\nmicro_batch = \"auto\"\nlr = 3e-3\nwarmup_steps = 2\nlog_every = 1\neval_every = 0\neval_batches = 1\ncheck_every = 1\n[spike]\nenabled = false\n{extra}",
        run_dir.display().to_string(),
        corpus.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `tessera train` (`nproc` 0) or `tessera launch --nproc N` with failpoints armed.
fn tessera(cfg: &Path, nproc: usize, failpoints: &str, sets: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    match nproc {
        0 => c.args(["train", "--quiet", "--config"]).arg(cfg),
        n => c.args(["launch", "--config"]).arg(cfg).args(["--nproc", &n.to_string()]),
    };
    for s in sets {
        c.args(["--set", s]);
    }
    c.env("TESSERA_FAILPOINTS", failpoints).env("TESSERA_CHAOS_STATE", cfg.with_extension("chaos"));
    c.output().unwrap()
}

fn succeeded(out: &Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn metrics(run_dir: &Path) -> Vec<Value> {
    common::read_lines(&run_dir.join("metrics.jsonl")).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Step records: (steps completed, loss, micro_batch).
fn steps(run_dir: &Path) -> Vec<(u64, f64, u64)> {
    metrics(run_dir)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["micro_batch"].as_u64().unwrap()))
        .collect()
}

fn micro_batch_events(run_dir: &Path) -> Vec<Value> {
    metrics(run_dir).into_iter().filter_map(|v| v.get("micro_batch").filter(|m| m.is_object()).cloned()).collect()
}

/// The sample ledger: (step, digest) per line.
fn digests(run_dir: &Path) -> Vec<(u64, String)> {
    common::read_lines(&run_dir.join("samples.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["step"].as_u64().unwrap(), v["digest"].as_str().unwrap().to_string()))
        .collect()
}

fn assert_losses_match(run: &Path, reference: &Path) {
    let (a, b) = (steps(run), steps(reference));
    assert_eq!(a.len(), b.len());
    for ((step, x, _), (_, y, _)) in a.iter().zip(&b) {
        assert!((x - y).abs() < LOSS_TOLERANCE, "step {step}: loss {x} vs the reference's {y}");
    }
}

#[test]
fn one_rank_out_of_memory_halves_the_micro_batch_and_retries_the_same_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let reference = tmp.path().join("reference");
    succeeded(&tessera(&config(&corpus, &reference, 8, ""), 0, "", &[]));
    let run = tmp.path().join("run");
    let out = tessera(&config(&corpus, &run, 8, ""), 0, "train.oom.rank0.step3=error@once", &[]);
    succeeded(&out);

    assert_eq!(micro_batch_events(&run), vec![serde_json::json!({"step": 3, "from": 8, "to": 4, "ranks": [0]})]);
    let sizes: Vec<(u64, u64)> = steps(&run).iter().map(|&(s, _, mb)| (s, mb)).collect();
    assert_eq!(sizes, vec![(1, 8), (2, 8), (3, 8), (4, 4), (5, 4), (6, 4)], "0-based step 3 is the 4th");
    assert!(steps(&reference).iter().all(|&(_, _, mb)| mb == 8), "the reference never changes size");
    assert_eq!(digests(&run), digests(&reference), "every step consumed the reference's samples, once");
    assert_losses_match(&run, &reference);
}

#[test]
fn two_ranks_agree_when_only_rank_1_runs_out_of_memory_and_finish_with_identical_weights() {
    // 5 samples per rank: 5 -> 2 leaves micro-batches of 2, 2 and 1, weighted by their sizes.
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let reference = tmp.path().join("reference");
    succeeded(&tessera(&config(&corpus, &reference, 10, ""), 0, "", &[]));
    let run = tmp.path().join("run");
    let out = tessera(&config(&corpus, &run, 10, ""), 2, "train.oom.rank1.step2=error@once", &[]);
    succeeded(&out); // no deadlock, and the replica check after every step passed
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Two processes share stderr, and a line may arrive in pieces around the other's: look for its tail.
    assert!(stderr.contains("runs out of memory at step 2"), "{stderr}");

    assert_eq!(micro_batch_events(&run), vec![serde_json::json!({"step": 2, "from": 5, "to": 2, "ranks": [1]})]);
    let sizes: Vec<u64> = steps(&run).iter().map(|&(_, _, mb)| mb).collect();
    assert_eq!(sizes, vec![5, 5, 2, 2, 2, 2]);
    let restarts = common::read_lines(&run.join("events.jsonl")).iter().filter(|l| l.contains("\"restart\"")).count();
    assert_eq!(restarts, 0, "recovered inside the step loop, not by restarting the gang");
    assert_eq!(digests(&run), digests(&reference), "the same global sequence of samples as one process");
    assert_losses_match(&run, &reference);
}

#[test]
fn a_run_resumed_after_the_switch_starts_with_the_halved_micro_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("run");
    let cfg = config(&corpus, &run, 8, "");
    let every = "train.checkpoint_every=3";
    succeeded(&tessera(&cfg, 0, "train.oom.rank0.step1=error@once", &[every, "train.steps=3"]));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/step-000000003/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["train"]["micro_batch"], 4, "the checkpoint records the size in force");

    let file = tessera::config::load(&cfg, &[every.into(), "train.steps=5".into()]).unwrap();
    let mut resumed = Trainer::new(file.resolve(&tessera::data::ShardIndex::load(&corpus).unwrap()).unwrap()).unwrap();
    assert_eq!(resumed.resumed_from.as_ref().map(|r| r.0), Some(3));
    assert_eq!(resumed.micro_batch(), 4, "starts where the checkpoint's run had come to, not at 8");
    resumed.run(TrainOptions { quiet: true }).unwrap();
    let after: Vec<(u64, u64)> = steps(&run).iter().filter(|s| s.0 > 3).map(|&(s, _, mb)| (s, mb)).collect();
    assert_eq!(after, vec![(4, 4), (5, 4)]);
    assert_eq!(micro_batch_events(&run).len(), 1, "the resumed run ran out of memory nowhere");
}

#[test]
fn out_of_memory_at_micro_batch_1_stops_the_run_with_advice() {
    // `error` without `@once` fails every attempt of the step: 2 -> 1, then nothing smaller is left.
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("run");
    let out = tessera(&config(&corpus, &run, 2, ""), 0, "train.oom.rank0.step1=error", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ran out of memory") && stderr.contains("at step 1"), "{stderr}");
    assert!(stderr.contains("micro_batch 1 is the smallest") && stderr.contains("train.zero = 2"), "{stderr}");
    assert_eq!(micro_batch_events(&run), vec![serde_json::json!({"step": 1, "from": 2, "to": 1, "ranks": [0]})]);
}

#[test]
fn a_fixed_micro_batch_is_never_changed_out_of_memory_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("run");
    let out = tessera(&config(&corpus, &run, 8, ""), 0, "train.oom.rank0.step1=error@once", &["train.micro_batch=4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("train.micro_batch = 4 (fixed)") && stderr.contains("\"auto\""), "{stderr}");
    assert!(micro_batch_events(&run).is_empty());
}

/// Five samples as micro-batches of 2, 2 and 1 give one batch of 5's loss and gradient: each micro-batch's
/// mean loss is weighted by its share of the samples, not averaged over micro-batches.
#[test]
fn a_shorter_last_micro_batch_is_weighted_by_its_samples() {
    tch::set_num_threads(1);
    let cfg = preset("tiny").unwrap();
    let tokens = tch::Tensor::randint(cfg.vocab_size, [5, cfg.seq_len + 1], (tch::Kind::Int64, tch::Device::Cpu));
    let batch = |rows: std::ops::Range<i64>| {
        let t = tokens.narrow(0, rows.start, rows.end - rows.start);
        Batch {
            inputs: t.narrow(1, 0, cfg.seq_len).contiguous(),
            targets: t.narrow(1, 1, cfg.seq_len).contiguous(),
            ids: (rows.start as u64..rows.end as u64).collect(),
        }
    };
    let run = |micro: Vec<Batch>| {
        let mut model = Gpt::new(cfg, tch::Device::Cpu, 3);
        let shard = ShardLayout::new(0, 0, 1, model.params.layout.numel);
        let mut opt = AdamW::new(AdamWConfig::default(), &model.params.flat);
        let mut comm = Solo::default();
        let faults = StepFaults::default();
        match try_step(&mut model, &mut opt, &shard, &mut comm, &micro, 1e-3, 0.0, faults, None, false).unwrap() {
            StepOutcome::Done(out) => (out.loss.double_value(&[]), out.grad_norm.double_value(&[])),
            StepOutcome::OutOfMemory(oom) => panic!("{oom}"),
        }
    };
    let (whole_loss, whole_norm) = run(vec![batch(0..5)]);
    let (cut_loss, cut_norm) = run(vec![batch(0..2), batch(2..4), batch(4..5)]);
    assert!((whole_loss - cut_loss).abs() < 1e-5, "loss {cut_loss} vs {whole_loss}");
    assert!((whole_norm - cut_norm).abs() < 1e-5 * whole_norm, "gradient norm {cut_norm} vs {whole_norm}");
}

/// An injected out of memory leaves nothing behind: the step changes no weight, and every rank (here the
/// only one) names the ranks that failed.
#[test]
fn an_out_of_memory_attempt_changes_no_weight() {
    tch::set_num_threads(1);
    let cfg = preset("tiny").unwrap();
    let tokens = tch::Tensor::randint(cfg.vocab_size, [4, cfg.seq_len + 1], (tch::Kind::Int64, tch::Device::Cpu));
    let mb = |r: i64| Batch {
        inputs: tokens.narrow(0, r, 2).narrow(1, 0, cfg.seq_len).contiguous(),
        targets: tokens.narrow(0, r, 2).narrow(1, 1, cfg.seq_len).contiguous(),
        ids: vec![r as u64, r as u64 + 1],
    };
    let mut model = Gpt::new(cfg, tch::Device::Cpu, 3);
    let before = model.params.flat.copy();
    let shard = ShardLayout::new(0, 0, 1, model.params.layout.numel);
    let mut opt = AdamW::new(AdamWConfig::default(), &model.params.flat);
    let faults = StepFaults { out_of_memory: true, ..StepFaults::default() };
    let outcome =
        try_step(&mut model, &mut opt, &shard, &mut Solo::default(), &[mb(0), mb(2)], 1e-3, 1.0, faults, None, false);
    match outcome.unwrap() {
        StepOutcome::OutOfMemory(oom) => {
            assert_eq!(oom.ranks, vec![0]);
            assert!(oom.message.unwrap().contains("out of memory"));
        }
        StepOutcome::Done(_) => panic!("the injected out of memory was not reported"),
    }
    assert!(model.params.flat.equal(&before), "weights changed");
    assert_eq!(model.params.flat_grad().abs().sum(tch::Kind::Double).double_value(&[]), 0.0, "gradients zeroed");
    assert!(tessera::train::step::is_out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB"));
    assert!(tessera::train::step::is_out_of_memory(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes."
    ));
    assert!(!tessera::train::step::is_out_of_memory("shape '[4, 64]' is invalid for input of size 3"));
    // cuBLAS and cuDNN with the card full.
    assert!(tessera::train::step::is_out_of_memory(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    ));
    assert!(tessera::train::step::is_out_of_memory(
        "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"
    ));
    assert!(tessera::train::step::is_out_of_memory("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"));
    assert!(!tessera::train::step::is_out_of_memory(
        "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasLtMatmul(...)`"
    ));
}
