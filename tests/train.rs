//! The single-process trainer learns real text, deterministically.

mod common;

use common::{losses, stdlib_corpus, tiny_run};
use tessera::data::TokenizerKind;
use tessera::train::{TrainOptions, Trainer};

#[test]
fn tiny_model_loss_falls_well_below_ln_vocab_on_the_stdlib_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 40, TokenizerKind::Byte);
    let run = tmp.path().join("run");
    let cfg = tiny_run(&corpus, &run, &["train.steps=150", "train.warmup_steps=15", "train.log_every=10"]);
    let summary = Trainer::new(cfg).unwrap().run(TrainOptions { quiet: true }).unwrap();
    let ln_vocab = 256f64.ln(); // 5.55
    assert!((summary.first_loss - ln_vocab).abs() < 0.3, "starts near ln V: {}", summary.first_loss);
    // A byte-level model that has learned Python's character statistics is far below uniform.
    assert!(summary.final_loss < 0.55 * ln_vocab, "train loss only fell to {}", summary.final_loss);
    let eval = summary.final_eval_loss.expect("held-out split is evaluated at the end");
    assert!(eval < 0.6 * ln_vocab, "held-out loss only fell to {eval}");
    assert!(run.join("config.resolved.toml").exists());
}

#[test]
fn without_a_held_out_split_nothing_is_evaluated_and_no_held_out_loss_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 5, TokenizerKind::Byte);
    let run = tmp.path().join("run");
    let cfg = tiny_run(&corpus, &run, &["data.eval_fraction=0", "train.steps=6", "train.eval_every=2"]);
    let summary = Trainer::new(cfg).unwrap().run(TrainOptions { quiet: true }).unwrap();
    assert_eq!(summary.final_eval_loss, None, "there is no held-out set to have a loss on");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(!metrics.contains("eval_loss"), "{metrics}");
}

#[test]
fn same_config_and_seed_give_bit_identical_losses_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 5, TokenizerKind::Byte);
    let mut runs = vec![];
    for name in ["a", "b"] {
        let run = tmp.path().join(name);
        let mut t = Trainer::new(tiny_run(&corpus, &run, &[])).unwrap();
        t.run(TrainOptions { quiet: true }).unwrap();
        runs.push((losses(&run), t.model.params.flat.copy()));
    }
    assert_eq!(runs[0].0.len(), 20);
    assert_eq!(runs[0].0, runs[1].0, "loss sequences differ");
    assert!(runs[0].1.equal(&runs[1].1), "final weights differ");
    let other = tmp.path().join("c");
    let mut t = Trainer::new(tiny_run(&corpus, &other, &["seed=8"])).unwrap();
    t.run(TrainOptions { quiet: true }).unwrap();
    assert_ne!(losses(&other), runs[0].0, "a different seed should give a different run");
}

#[test]
fn reading_the_numbers_back_every_few_steps_waits_for_the_device_less_and_changes_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 5, TokenizerKind::Byte);
    let mut runs = vec![];
    for every in [1, 8] {
        let run = tmp.path().join(format!("every-{every}"));
        let read_every = format!("train.read_every={every}");
        let cfg =
            tiny_run(&corpus, &run, &[&read_every, "train.steps=20", "train.log_every=10", "train.check_every=0"]);
        let mut t = Trainer::new(cfg).unwrap();
        let summary = t.run(TrainOptions { quiet: true }).unwrap();
        let samples = std::fs::read_to_string(run.join("samples.jsonl")).unwrap();
        runs.push((summary, losses(&run), samples, t.model.params.flat.copy()));
    }
    // Every step: 20 readings. Every 8: after steps 1 (the first is logged), 9, 10 (logged), 18, 20 (the last).
    assert_eq!((runs[0].0.readings, runs[1].0.readings), (20, 5));
    assert_eq!(runs[0].1, runs[1].1, "logged losses");
    assert_eq!(runs[0].2, runs[1].2, "every step's samples are on record, in order");
    assert_eq!(runs[0].2.lines().count(), 20);
    assert!(runs[0].3.equal(&runs[1].3), "weights");
}

#[test]
fn asking_for_tesseras_cuda_kernels_changes_nothing_off_cuda() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 5, TokenizerKind::Byte);
    let mut runs = vec![];
    for kernels in ["train.kernels=false", "train.kernels=true"] {
        let run = tmp.path().join(kernels);
        let mut t = Trainer::new(tiny_run(&corpus, &run, &[kernels, "train.steps=6"])).unwrap();
        assert_eq!(t.opt.kernel, kernels.ends_with("true"), "the optimizer is asked for its kernel");
        t.run(TrainOptions { quiet: true }).unwrap();
        assert!(t.opt.kernel == kernels.ends_with("true"), "a kernel that does not apply has not failed either");
        runs.push((losses(&run), t.model.params.flat.copy()));
    }
    assert_eq!(runs[0].0, runs[1].0, "losses");
    assert!(runs[0].1.equal(&runs[1].1), "weights");
}

#[test]
fn recomputing_activations_in_backward_gives_bit_identical_losses_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 5, TokenizerKind::Byte);
    let mut finals = vec![];
    for (name, recompute) in [("kept", "train.recompute=false"), ("recomputed", "train.recompute=true")] {
        let run = tmp.path().join(name);
        let mut t =
            Trainer::new(tiny_run(&corpus, &run, &[recompute, "train.steps=6", "train.micro_batch=4"])).unwrap();
        assert_eq!(t.model.recompute, name == "recomputed");
        t.run(TrainOptions { quiet: true }).unwrap();
        finals.push((losses(&run), t.model.params.flat.copy()));
    }
    assert_eq!(finals[0].0, finals[1].0, "losses");
    assert!(finals[0].1.equal(&finals[1].1), "weights");
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    // 8 samples as 2 x 4 micro-batches or as 1 x 8 give the same update up to float rounding.
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 5, TokenizerKind::Byte);
    let mut finals = vec![];
    for (name, micro) in [("accum", "train.micro_batch=4"), ("whole", "train.micro_batch=8")] {
        let run = tmp.path().join(name);
        let mut t = Trainer::new(tiny_run(&corpus, &run, &[micro, "train.steps=5"])).unwrap();
        t.run(TrainOptions { quiet: true }).unwrap();
        finals.push((losses(&run), t.model.params.flat.copy()));
    }
    for ((_, a), (_, b)) in finals[0].0.iter().zip(&finals[1].0) {
        assert!((a - b).abs() < 1e-5, "losses {a} vs {b}");
    }
    let d = (&finals[0].1 - &finals[1].1).abs().max().double_value(&[]);
    assert!(d < 1e-5, "weights differ by {d}");
}

#[test]
fn sample_ledger_records_every_step_and_an_epoch_consumes_each_sample_once() {
    use tessera::data::prefetch::step_data;
    use tessera::data::DataState;
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 1, TokenizerKind::Byte);
    let run = tmp.path().join("run");
    let cfg = tiny_run(&corpus, &run, &["train.steps=5", "train.log_every=100"]);
    // Size the run to cross one epoch boundary: n train samples at 8 per step.
    let n = Trainer::new(cfg.clone()).unwrap().train_set().len;
    let steps = n / 8 + 3;
    let cfg = tiny_run(&corpus, &run, &[&format!("train.steps={steps}"), "train.log_every=100"]);
    let mut t = Trainer::new(cfg).unwrap();
    t.run(TrainOptions { quiet: true }).unwrap();

    let ledger: Vec<serde_json::Value> = std::fs::read_to_string(run.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ledger.len() as u64, steps, "one ledger line per step");
    let state = DataState::new(n, 7, 1);
    let mut epoch0 = vec![];
    for (step, line) in ledger.iter().enumerate() {
        let d = step_data(t.train_set(), &state, t.step_shape(), step as u64).unwrap();
        assert_eq!(line["digest"].as_str().unwrap(), format!("{:016x}", d.digest), "step {step}");
        assert_eq!(line["step"].as_u64().unwrap(), step as u64);
        for g in step as u64 * 8..step as u64 * 8 + 8 {
            let l = state.locate(g);
            if l.epoch == 0 {
                epoch0.push(l.sample);
            }
        }
    }
    epoch0.sort_unstable();
    assert_eq!(epoch0, (0..n).collect::<Vec<_>>(), "epoch 0 consumed every training sample exactly once");
    assert_eq!(ledger.last().unwrap()["epoch"].as_u64(), Some(1));
    // The state epoch 0 ended with is kept, for checking that epoch's order after its layers are gone.
    let ended: Vec<DataState> =
        common::read_lines(&run.join("epochs.jsonl")).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!((ended[0].epoch, ended[0].n, ended[0].epoch_start, ended[0].layers.len()), (0, n, 0, 0));
}

#[test]
fn a_second_run_on_a_run_directory_in_use_is_refused_and_a_killed_holder_leaves_no_stale_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, run) = endless_run(tmp.path(), "checkpoint_every = 5\n");
    let tessera = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"));
        c.args(["train", "--quiet", "--config"]).arg(&cfg);
        c
    };
    let mut first = tessera().stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while common::read_lines(&run.join("metrics.jsonl")).len() < 3 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Both would resume from the same checkpoint, write the same ledgers and prune each other's checkpoints.
    let second = tessera().args(["--set", "train.steps=20"]).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is in use by another tessera process") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    // SIGKILL gives the first no chance to clean up; the kernel releases its lock all the same.
    first.kill().unwrap();
    first.wait().unwrap();
    let third = tessera().args(["--set", "train.steps=20", "--resume", "never"]).output().unwrap();
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
}

#[test]
fn a_preemption_whose_checkpoint_cannot_commit_says_so_and_exits_1_instead_of_claiming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, run) = endless_run(tmp.path(), "checkpoint_every = 5\n");
    // Every checkpoint fails to write, as on a store that went away.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .env("TESSERA_FAILPOINTS", "ckpt.write=error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while common::read_lines(&run.join("metrics.jsonl")).len() < 10 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains("with its checkpoint committed"), "{stdout}");
    assert!(stderr.contains("did not commit") && stderr.contains("no checkpoint is committed"), "{stderr}");
}

#[test]
fn tessera_train_serves_metrics_and_on_sigterm_checkpoints_the_next_step_and_a_rerun_resumes_there() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, run) = endless_run(tmp.path(), "");
    let tessera = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"));
        c.args(["train", "--quiet", "--config"]).arg(&cfg);
        c
    };
    // With a metrics endpoint, as `tessera launch` serves one.
    let addr = format!("127.0.0.1:{}", common::moto::free_port());
    let child = tessera()
        .args(["--metrics-addr", &addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while common::read_lines(&run.join("metrics.jsonl")).len() < 10 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let m = common::scrape(&addr);
    assert!(common::sample(&m, "tessera_step", None) >= 5.0);
    let loss = common::sample(&m, "tessera_loss", None);
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert_eq!(common::sample(&m, "tessera_micro_batch", None), 8.0, "the whole batch in one micro-batch");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let stopped: u64 = stdout
        .split("stopped after step ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(run.join(format!("checkpoints/step-{stopped:09}/manifest.json")).exists(), "its checkpoint committed");
    // A rerun (with a reachable end) resumes right there.
    let out = tessera().args(["--set", &format!("train.steps={}", stopped + 2)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let steps: Vec<u64> = common::losses(&run).iter().map(|&(s, _)| s).collect();
    assert_eq!(steps.iter().filter(|&&s| s == 1).count(), 1, "the rerun did not start over: {steps:?}");
    assert_eq!(steps.iter().filter(|&&s| s == stopped + 1).count(), 1, "step {} ran once: {steps:?}", stopped + 1);
    let said = String::from_utf8_lossy(&out.stdout);
    let want = format!("trained 2 steps (steps {}-{}, resumed)", stopped + 1, stopped + 2);
    assert!(said.contains(&want), "the summary counts this session's steps only: {said}");
    // Once more: the run is over, and says so.
    let out = tessera().args(["--set", &format!("train.steps={}", stopped + 2)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to train"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A train.steps below where the run has come to is a mistake to name, not a run to redo (it panicked).
    let out = tessera().args(["--set", &format!("train.steps={stopped}")]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("at step {}, past this run's last", stopped + 2)), "{stderr}");
}

#[test]
fn a_second_signal_right_after_the_first_stops_tessera_train_at_once_with_exit_code_130() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, run) = endless_run(tmp.path(), "checkpoint_every = 5\n");
    // The second signal 1 to 5 ms after the first, while the process checkpoints the next step and winds
    // down: exiting then used to run libtorch's teardown twice (exit 139). A process that finished its
    // preemption before the second signal arrived exits 0; at least one attempt must see the second signal.
    let mut seen = 0;
    for attempt in 0..5u64 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["train", "--quiet", "--config"])
            .arg(&cfg)
            .args(["--set", &format!("run_dir={:?}", run.join(attempt.to_string()).display().to_string())])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let metrics = run.join(attempt.to_string()).join("metrics.jsonl");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while common::read_lines(&metrics).len() < 3 + attempt as usize {
            assert!(std::time::Instant::now() < deadline, "no progress");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        std::thread::sleep(std::time::Duration::from_millis(1 + attempt));
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        match status.code() {
            Some(130) => {
                assert!(err.contains("second signal: stopping now"), "{err}");
                seen += 1;
            }
            Some(0) => assert!(err.contains("preemption signal"), "a finished preemption: {err}"),
            _ => panic!("attempt {attempt}: {status:?}: {err}"),
        }
    }
    assert!(seen > 0, "no attempt saw the second signal before the process ended");
}

/// A tiny run in `dir/run` on a corpus in `dir/corpus`, trained to its end with `sets` (which checkpoint).
fn checkpointed_run(dir: &std::path::Path, sets: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let (corpus, run) = (dir.join("corpus"), dir.join("run"));
    stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    Trainer::new(tiny_run(&corpus, &run, sets)).unwrap().run(TrainOptions { quiet: true }).unwrap();
    (corpus, run)
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = ["train.steps=10", "train.checkpoint_every=5"];
    let (corpus, run) = checkpointed_run(tmp.path(), &sets);
    let newest = run.join("checkpoints/step-000000010/rank-00000.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&newest, bytes).unwrap();
    let t = Trainer::new(tiny_run(&corpus, &run, &sets)).unwrap();
    let (step, location) = t.resumed_from.clone().expect("resumed");
    assert_eq!(step, 5, "fell back to the previous committed checkpoint ({location})");
    assert_eq!(t.skipped_checkpoints.len(), 1, "the corrupt one is reported: {:?}", t.skipped_checkpoints);
    assert_eq!(t.skipped_checkpoints[0].0, 10, "with its step");
    assert_eq!(t.data.position, 5 * 8);
    // Set aside, not deleted: kept for inspection beside the others, where no listing sees it.
    let aside: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("corrupt-step-000000010-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(!run.join("checkpoints/step-000000010").exists());
    let never = Trainer::new(tiny_run(&corpus, &run, &[sets[0], sets[1], "resume=\"never\""])).unwrap();
    assert!(never.resumed_from.is_none());
}

#[test]
fn when_no_committed_checkpoint_verifies_the_run_stops_and_removes_nothing_instead_of_starting_over() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = ["train.steps=10", "train.checkpoint_every=5"];
    let (corpus, run) = checkpointed_run(tmp.path(), &sets);
    for step in [5, 10] {
        let file = run.join(format!("checkpoints/step-{step:09}/rank-00000.safetensors"));
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(1000).unwrap();
    }
    let err = Trainer::new(tiny_run(&corpus, &run, &sets)).err().expect("refused");
    assert!(err.to_string().contains("none of its 2 committed checkpoint(s) verifies"), "{err}");
    assert!(err.to_string().contains("resume = \"never\""), "says how to start over: {err}");
    assert!(
        err.recovery() == tessera::error::Recovery::Never && err.exit_code() == 2,
        "the user's to fix, not a restart's: {err:?}"
    );
    for step in [5, 10] {
        assert!(run.join(format!("checkpoints/step-{step:09}/manifest.json")).exists(), "step {step} kept");
    }
    // Asked to start over, it does.
    let fresh = Trainer::new(tiny_run(&corpus, &run, &[sets[0], sets[1], "resume=\"never\""])).unwrap();
    assert!(fresh.resumed_from.is_none());
}

#[test]
fn a_resume_on_another_corpus_model_or_split_is_refused_naming_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = ["train.steps=5", "train.checkpoint_every=5"];
    let (corpus, run) = checkpointed_run(tmp.path(), &sets);
    let other = tmp.path().join("other");
    stdlib_corpus(&other, 3, TokenizerKind::Byte);
    let refused = |corpus: &std::path::Path, extra: &[&str]| {
        let mut all = sets.to_vec();
        all.extend_from_slice(extra);
        let err = Trainer::new(tiny_run(corpus, &run, &all)).err().expect("refused");
        assert!(err.recovery() == tessera::error::Recovery::Never && err.exit_code() == 2, "{err:?}");
        assert!(err.to_string().contains("start a new run"), "says what to do: {err}");
        err.to_string()
    };
    let err = refused(&other, &[]);
    assert!(err.contains("another corpus"), "{err}");
    let err = refused(&corpus, &["data.eval_fraction=0.2"]);
    assert!(err.contains("training samples an epoch"), "{err}");
    let err = refused(&corpus, &["model.n_layer=3"]);
    assert!(err.contains("model.n_layer 2 (checkpoint) / 3 (this run)"), "{err}");
    // The same settings still resume.
    assert_eq!(Trainer::new(tiny_run(&corpus, &run, &sets)).unwrap().resumed_from.map(|r| r.0), Some(5));
}

/// A tiny run on a small stdlib corpus in `tmp` that would train for a very long time (to be stopped), with
/// `train_extra` lines in `[train]`: its config and run directory.
fn endless_run(tmp: &std::path::Path, train_extra: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let corpus = tmp.join("corpus");
    stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    let run = tmp.join("run");
    let cfg = tmp.join("run.toml");
    let text = format!(
        "run_dir = {:?}\nseed = 7\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\n[train]\nsteps = 100000\nbatch_size = 8\nlog_every = 1\neval_every = 0\n{train_extra}",
        run.display().to_string(),
        corpus.display().to_string()
    );
    std::fs::write(&cfg, text).unwrap();
    (cfg, run)
}
