//! `tessera export --format hf`: a trained checkpoint becomes a Hugging Face GPT-2 directory that transformers'
//! `GPT2LMHeadModel` loads and runs with Tessera's logits; bad input is a clear error with exit code 2.
//!
//! The transformers side is `tests/reference/hf_export_check.py`, run by the `.venv` Python.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};
use tessera::ckpt::manifest::{FileEntry, Manifest, MANIFEST_FILE};
use tessera::ckpt::store::{self as local, CkptStore};
use tessera::data::TokenizerKind;
use tessera::model::gpt::param_specs;
use tessera::model::{Gpt, ParamLayout, Params};

/// Largest logit difference accepted between Tessera and transformers: both run libtorch's fp32 CPU kernels,
/// so what is left is summation order (the logits themselves are of order 10).
const LOGIT_TOLERANCE: f64 = 1e-4;

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn export(ckpt: &Path, out: &Path, extra: &[&str]) -> Output {
    tessera()
        .arg("export")
        .arg("--ckpt")
        .arg(ckpt)
        .args(["--format", "hf"])
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Asserts that `out` failed with exit code 2 and a message containing every one of `needles`.
fn assert_bad_input(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "expected exit code 2, stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "the error should mention {n:?}: {err}");
    }
}

/// Trains the tiny preset for 6 steps with the real binary, checkpointing every 3; returns the run directory.
fn trained_run(tmp: &Path) -> PathBuf {
    let corpus = tmp.join("corpus");
    common::stdlib_corpus(&corpus, 3, TokenizerKind::Byte);
    let run = tmp.join("run");
    let cfg = tmp.join("run.toml");
    let text = format!(
        "run_dir = {:?}\nseed = 5\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\neval_fraction = 0.05\n[train]\nsteps = 6\nbatch_size = 8\nmicro_batch = 4\nlr = 3e-3\nwarmup_steps = 2\nlog_every = 1\neval_every = 0\neval_batches = 2\ncheckpoint_every = 3\n",
        run.display().to_string(),
        corpus.display().to_string()
    );
    std::fs::write(&cfg, text).unwrap();
    let out = tessera().arg("train").arg("--config").arg(&cfg).arg("--quiet").output().unwrap();
    assert!(out.status.success(), "training failed: {}", stderr(&out));
    assert!(run.join("checkpoints/step-000000006/manifest.json").exists(), "the run wrote its last checkpoint");
    run
}

/// Asserts that `hf/model.safetensors` holds exactly the named tensors of the flat buffer `flat`, bit for bit.
fn assert_written_weights(hf: &Path, flat: &Tensor) {
    let cfg = tessera::model::preset("tiny").unwrap();
    let params = Params::from_flat(ParamLayout::new(param_specs(&cfg)), flat.copy());
    let written: HashMap<String, Tensor> =
        Tensor::read_safetensors(hf.join("model.safetensors")).unwrap().into_iter().collect();
    assert_eq!(written.len(), params.layout.specs.len(), "one tensor per parameter, the tied LM head not repeated");
    for (name, t) in params.named() {
        let w = written.get(name).unwrap_or_else(|| panic!("{name} is not in model.safetensors"));
        assert_eq!(w.kind(), Kind::Float, "{name}");
        assert!(w.equal(&t.detach()), "{name} differs from the checkpoint's");
    }
}

fn rank0(dir: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join(local::rank_file(0))).unwrap().into_iter().collect()
}

#[test]
fn exported_weights_give_tesseras_logits_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let hf = tmp.path().join("hf");

    // The run directory names its newest checkpoint.
    let out = export(&run, &hf, &[]);
    assert!(out.status.success(), "export failed: {}", stderr(&out));
    assert!(stdout(&out).contains("exported step 6 of"), "{}", stdout(&out));

    // Tessera's model on the checkpoint's weights.
    let loaded =
        CkptStore::open(run.join("checkpoints").to_str().unwrap(), &[]).unwrap().load("step-000000006").unwrap();
    let cfg = loaded.manifest.model;
    let params = loaded.rank_file(0).unwrap().remove("params").expect("rank 0 holds the parameters");
    let model = Gpt::new(cfg, Device::Cpu, 0);
    tch::no_grad(|| model.params.flat.shallow_clone().copy_(&params));
    let init = Gpt::new(cfg, Device::Cpu, 5);
    assert!(!params.equal(&init.params.flat), "the checkpoint holds trained weights, not the initial ones");

    // The safetensors file holds exactly the model's named tensors, bit for bit, and no separate LM head.
    assert_written_weights(&hf, &params);

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    for (key, value) in [("n_layer", cfg.n_layer), ("n_head", cfg.n_head), ("n_embd", cfg.d_model)] {
        assert_eq!(config[key], value, "{key}");
    }
    assert_eq!(config["n_positions"], cfg.seq_len);
    assert_eq!(config["vocab_size"], cfg.vocab_size);
    assert_eq!(config["eos_token_id"], 0, "the byte tokenizer's end-of-text, read from the run's resolved config");
    assert_eq!(config["tie_word_embeddings"], true);

    // Tessera's logits for a fixed batch: every position of the context, the end-of-text byte included.
    let (b, t) = (3, cfg.seq_len);
    let tokens = (Tensor::arange(b * t, (Kind::Int64, Device::Cpu)) * 7919 + 13).remainder(cfg.vocab_size).view([b, t]);
    let _ = tokens.get(0).get(0).fill_(0);
    let logits = tch::no_grad(|| model.forward(&tokens));
    assert_eq!(logits.size(), [b, t, cfg.vocab_size]);
    let expected = tmp.path().join("expected.safetensors");
    Tensor::write_safetensors(&[("tokens", &tokens), ("logits", &logits)], &expected).unwrap();

    let out = Command::new(common::repo().join(".venv/bin/python"))
        .arg(common::repo().join("tests/reference/hf_export_check.py"))
        .arg(&hf)
        .arg(&expected)
        .arg(LOGIT_TOLERANCE.to_string())
        .output()
        .expect("the .venv Python runs (make setup)");
    let report = stdout(&out);
    let line = report.lines().last().unwrap_or_default();
    let Ok(result) = serde_json::from_str::<serde_json::Value>(line) else {
        panic!("the check printed no result (is transformers installed? make setup):\n{report}\n{}", stderr(&out));
    };
    let diff = result["max_abs_diff"].as_f64().unwrap_or(f64::INFINITY);
    println!("transformers vs Tessera: max |logit difference| = {diff:e} ({result})");
    assert!(out.status.success(), "transformers disagrees: {result}\n{}", stderr(&out));
    assert!(diff <= LOGIT_TOLERANCE, "max logit difference {diff:e} above {LOGIT_TOLERANCE:e}");

    // A non-empty --out is refused unless --force, and left as it was.
    let before = std::fs::read(hf.join("model.safetensors")).unwrap();
    let older = run.join("checkpoints/step-000000003");
    let out = export(&older, &hf, &[]);
    assert_bad_input(&out, &["is not empty", "--force"]);
    assert_eq!(std::fs::read(hf.join("model.safetensors")).unwrap(), before);
    let out = export(&older, &hf, &["--force"]);
    assert!(out.status.success(), "export --force failed: {}", stderr(&out));
    assert!(stdout(&out).contains("exported step 3 of"), "{}", stdout(&out));
    assert_written_weights(&hf, &rank0(&older)["params"]);
    let leftovers: Vec<_> = std::fs::read_dir(&hf).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "only config.json and model.safetensors: {leftovers:?}");

    // The checkpoints directory also names its newest checkpoint.
    let out = export(&run.join("checkpoints"), &tmp.path().join("hf-root"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("exported step 6 of"), "{}", stdout(&out));
}

#[test]
fn paths_without_a_checkpoint_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");

    let missing = tmp.path().join("no-such-run");
    let out = export(&missing, &out_dir, &[]);
    assert_bad_input(&out, &["no-such-run", "does not exist", "checkpoint directory"]);
    assert!(!out_dir.exists(), "nothing is written when the input is bad");

    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "not a checkpoint").unwrap();
    assert_bad_input(&export(&file, &out_dir, &[]), &["notes.txt", "is not a directory"]);

    let empty_run = tmp.path().join("empty-run");
    std::fs::create_dir_all(empty_run.join("checkpoints")).unwrap();
    assert_bad_input(
        &export(&empty_run, &out_dir, &[]),
        &["no committed checkpoint", "empty-run/checkpoints", "train.checkpoint_every"],
    );
    // A checkpoint directory that was never committed (no manifest) is a leftover, no checkpoint either.
    std::fs::create_dir_all(empty_run.join("checkpoints/step-000000004")).unwrap();
    assert_bad_input(&export(&empty_run, &out_dir, &[]), &["no committed checkpoint", "empty-run/checkpoints"]);
    assert!(!out_dir.exists());

    let out = tessera()
        .arg("export")
        .arg("--ckpt")
        .arg(&empty_run)
        .args(["--format", "onnx"])
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_bad_input(&out, &["onnx", "possible values: hf"]);
}

/// Copies checkpoint directory `src` to `dst` (plain files only).
fn copy_checkpoint(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Rewrites a checkpoint's manifest through `edit`, keeping it valid.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let path = dir.join(MANIFEST_FILE);
    let mut m = Manifest::from_json(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, m.to_json()).unwrap();
}

/// Replaces rank 0's state file with `tensors`, with a manifest entry that matches (so it verifies).
fn replace_rank0(dir: &Path, tensors: &[(&str, Tensor)]) {
    let name = local::rank_file(0);
    Tensor::write_safetensors(tensors, dir.join(&name)).unwrap();
    let bytes = std::fs::read(dir.join(&name)).unwrap();
    edit_manifest(dir, |m| {
        let entry = m.files.iter_mut().find(|f| f.name == name).unwrap();
        *entry = FileEntry::of(name.clone(), Some(0), &bytes);
    });
}

#[test]
fn checkpoints_that_do_not_describe_a_model_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let good = run.join("checkpoints/step-000000006");
    let out_dir = tmp.path().join("out");
    let params = rank0(&good).remove("params").unwrap();

    // Bytes changed after the commit: the checksum catches it.
    let corrupt = tmp.path().join("corrupt/checkpoints/step-000000006");
    copy_checkpoint(&good, &corrupt);
    let path = corrupt.join(local::rank_file(0));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    assert_bad_input(&export(&corrupt, &out_dir, &[]), &["does not verify", "corrupt", "older checkpoint"]);
    assert_bad_input(
        &export(&tmp.path().join("corrupt"), &out_dir, &[]),
        &["no committed checkpoint", "1 checkpoint skipped", "corrupt"],
    );

    // A state file without the parameters.
    let no_params = tmp.path().join("no-params");
    copy_checkpoint(&good, &no_params);
    replace_rank0(&no_params, &[("exp_avg", params.zeros_like())]);
    assert_bad_input(&export(&no_params, &out_dir, &[]), &["no `params` tensor", "exp_avg"]);

    // Parameters that do not fit the manifest's model, in size or in type.
    let short = tmp.path().join("short");
    copy_checkpoint(&good, &short);
    replace_rank0(&short, &[("params", params.narrow(0, 0, 1000).copy())]);
    assert_bad_input(&export(&short, &out_dir, &[]), &["[1000]", &format!("needs [{}]", params.size()[0])]);
    let doubles = tmp.path().join("doubles");
    copy_checkpoint(&good, &doubles);
    replace_rank0(&doubles, &[("params", params.to_kind(Kind::Double))]);
    assert_bad_input(&export(&doubles, &out_dir, &[]), &["Double", "of Float"]);

    // A manifest whose model cannot exist.
    let bad_shape = tmp.path().join("bad-shape");
    copy_checkpoint(&good, &bad_shape);
    edit_manifest(&bad_shape, |m| m.model.n_head = 5);
    assert_bad_input(&export(&bad_shape, &out_dir, &[]), &["model shape is invalid", "n_head"]);
    let huge = tmp.path().join("huge");
    copy_checkpoint(&good, &huge);
    edit_manifest(&huge, |m| {
        m.model.n_head = 1;
        m.model.d_model = i64::MAX / 2;
    });
    assert_bad_input(&export(&huge, &out_dir, &[]), &["model shape is invalid", "larger than Tessera builds"]);

    assert!(!out_dir.exists(), "nothing was written for any of them");
}
