//! Checkpoints as a user relies on them: a process killed at any stage of a save leaves the old checkpoint
//! or the new one and resumes bit-exactly; a failing disk costs a checkpoint, not the run; retention keeps
//! what it promises; a checkpoint written by W ranks resumes on W' ranks; checkpoints live on a real
//! S3-compatible server as well as on disk; `tessera ckpt list|verify` tell a user what is there.

mod common;

use common::moto::{s3_options, Moto};
use common::stdlib_corpus;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera::ckpt::store::CkptStore;
use tessera::data::TokenizerKind;

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// A tiny run on `corpus` writing to `run_dir`, checkpointing every 5 steps, with extra TOML lines.
fn config(corpus: &Path, run_dir: &Path, extra: &str) -> PathBuf {
    let path = run_dir.with_extension("toml");
    let text = format!(
        "run_dir = {:?}\nseed = 11\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\neval_fraction = 0.05\n[train]\nsteps = 15\nbatch_size = 8\nmicro_batch = 4\nlr = 3e-3\nwarmup_steps = 2\nlog_every = 1\neval_every = 0\neval_batches = 2\ncheckpoint_every = 5\n{extra}",
        run_dir.display().to_string(),
        corpus.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn run(cmd: &str, cfg: &Path, env: &[(&str, &str)], extra: &[&str]) -> Output {
    let mut c = tessera();
    c.arg(cmd).arg("--config").arg(cfg).args(extra);
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

/// The last logged loss of every step.
fn losses(run_dir: &Path) -> BTreeMap<u64, f64> {
    common::losses(run_dir).into_iter().collect()
}

fn assert_same_run(a: &Path, b: &Path) {
    for ((n, x), (_, y)) in weights(a).iter().zip(&weights(b)) {
        assert!(x.equal(y), "{n} differs between {} and {}", a.display(), b.display());
    }
    assert_eq!(losses(a), losses(b));
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_process_killed_at_each_stage_of_a_save_resumes_bit_exactly_from_the_old_or_the_new_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 3, TokenizerKind::Byte);
    let straight = tmp.path().join("straight");
    let out = run("train", &config(&corpus, &straight, ""), &[], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The second save (after step 10) dies at each stage; the first (after step 5) committed.
    for (stage, resumes_at) in [
        ("ckpt.write", 5),
        ("ckpt.before_ack", 5),
        ("ckpt.commit.before_manifest", 5),
        ("ckpt.commit.before_latest", 10),
    ] {
        let dir = tmp.path().join(stage.replace('.', "-"));
        let cfg = config(&corpus, &dir, "");
        let killed = run("train", &cfg, &[("TESSERA_FAILPOINTS", &format!("{stage}=kill@2"))], &[]);
        assert!(!killed.status.success(), "{stage}: the failpoint must kill the run");
        let ckpts = dir.join("checkpoints");
        let listed = entries(&ckpts);
        assert!(listed.contains(&"step-000000005".to_string()), "{stage}: {listed:?}");

        let out = run("train", &cfg, &[], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stage}: {err}");
        assert!(err.contains(&format!("at step {resumes_at}")), "{stage}: should resume at {resumes_at}: {err}");
        if matches!(stage, "ckpt.before_ack" | "ckpt.commit.before_manifest") {
            assert!(err.contains("left by an interrupted checkpoint"), "{stage}: leftovers are cleaned: {err}");
        }
        assert!(
            entries(&ckpts).iter().all(|n| !n.contains("staging") && !n.starts_with('.')),
            "{stage}: no leftovers: {:?}",
            entries(&ckpts)
        );
        assert_same_run(&straight, &dir);
    }
}

#[test]
fn a_failing_disk_costs_the_checkpoint_not_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    let dir = tmp.path().join("run");
    let out = run("train", &config(&corpus, &dir, ""), &[("TESSERA_FAILPOINTS", "ckpt.write=error@2")], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("checkpoint after step 10 abandoned") && err.contains("injected failure"), "{err}");
    assert_eq!(entries(&dir.join("checkpoints")), ["latest", "step-000000005", "step-000000015"]);
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains(r#""checkpoint":"abandoned","step":10"#), "{metrics}");

    // A disk too full to take even the "no" vote: the coordinator beside the writer hears of it in process
    // and gives the checkpoint up at once, instead of waiting out checkpoint.timeout_s for a vote (training
    // stalled behind it: ten minutes by default).
    let dir = tmp.path().join("full");
    let cfg = config(&corpus, &dir, "[checkpoint]\ntimeout_s = 3600\n");
    let out = run("train", &cfg, &[("TESSERA_FAILPOINTS", "ckpt.write=error@2;ckpt.no_vote=error")], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("checkpoint after step 10 abandoned (rank 0 could not write its file"), "{err}");
    assert_eq!(entries(&dir.join("checkpoints")), ["latest", "step-000000005", "step-000000015"]);

    // The last step's checkpoint lost: the summary says what a rerun would do.
    let dir = tmp.path().join("last");
    let out = run("train", &config(&corpus, &dir, ""), &[("TESSERA_FAILPOINTS", "ckpt.write=error@3")], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("the checkpoint of the last step (15) did not commit")
            && err.contains("the newest committed checkpoint is step 10"),
        "{err}"
    );
}

#[test]
fn a_write_stuck_on_a_slow_store_costs_the_next_checkpoints_not_a_stalled_loop_and_the_last_one_still_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    let straight = tmp.path().join("straight");
    let out = run("train", &config(&corpus, &straight, ""), &[], &["--set", "train.steps=20"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The write of step 5 takes 6 s; the loop waits half of checkpoint.timeout_s (2 s) at most for it.
    let dir = tmp.path().join("slow");
    let cfg = config(&corpus, &dir, "[checkpoint]\ntimeout_s = 4\n");
    let slow = [("TESSERA_FAILPOINTS", "ckpt.write.rank0.step5=sleep(6000)")];
    let out = run("train", &cfg, &slow, &["--set", "train.steps=20"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no checkpoint after step 10: the previous one is still being written"), "{err}");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains(r#""checkpoint":"busy","step":10"#), "{metrics}");
    assert!(!metrics.contains(r#""checkpoint":"saved","step":10"#), "{metrics}");
    // The loop waited once for the stuck write, at step 10 (its 2 s, recorded as the stall), and not again
    // at step 15: that write had had its time.
    let stall = |step: u64| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.contains(&format!(r#""checkpoint":"busy","step":{step},"#)))
            .unwrap_or_else(|| panic!("no busy line for step {step}: {metrics}"));
        serde_json::from_str::<serde_json::Value>(line).unwrap()["stall_ms"].as_f64().unwrap()
    };
    assert!(stall(10) >= 1900.0, "{metrics}");
    assert!(stall(15) < 1500.0, "not a second wait: {metrics}");
    assert!(metrics.contains(r#""checkpoint":"committed","step":20"#), "{metrics}");
    // The same training, to the bit: a checkpoint given up changes nothing in the mathematics.
    assert_same_run(&straight, &dir);
}

#[test]
fn retention_keeps_the_newest_and_every_milestone_and_deletes_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    let dir = tmp.path().join("run");
    let cfg = config(&corpus, &dir, "[checkpoint]\nkeep_last = 2\nkeep_every = 10\nasync_write = false\n");
    let out = run("train", &cfg, &[], &["--set", "train.steps=30"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kept: Vec<u64> = CkptStore::open(dir.join("checkpoints").to_str().unwrap(), &[])
        .unwrap()
        .list()
        .unwrap()
        .iter()
        .map(|l| l.step)
        .collect();
    assert_eq!(kept, [10, 20, 25, 30]);
}

#[test]
fn a_checkpoint_written_by_two_zero2_ranks_resumes_on_three_zero1_ranks_and_on_one() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 3, TokenizerKind::Byte);
    let extra = "zero = 2\n";
    let two = tmp.path().join("two");
    let cfg = config(&corpus, &two, extra);
    let sets =
        ["--nproc", "2", "--set", "train.batch_size=12", "--set", "train.micro_batch=2", "--set", "train.steps=10"];
    let out = run("launch", &cfg, &[], &sets);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The optimizer state as the two ranks wrote it, reassembled from their shards.
    let store = CkptStore::open(two.join("checkpoints").to_str().unwrap(), &[]).unwrap();
    let loaded = store.load("step-000000005").unwrap();
    assert_eq!((loaded.manifest.world_size, loaded.manifest.zero_stage), (2, 2));
    let full = |name: &str| {
        let parts: Vec<tch::Tensor> = (0..2).map(|r| loaded.rank_file(r).unwrap()[name].shallow_clone()).collect();
        tch::Tensor::cat(&parts, 0)
    };
    let (m, v) = (full("exp_avg"), full("exp_avg_sq"));

    // One rank, replicated optimizer: the whole state, exactly.
    let t = tessera::train::Trainer::new(
        tessera::config::load_resolved(
            &cfg,
            &[
                "train.batch_size=12".into(),
                "train.micro_batch=2".into(),
                "train.zero=0".into(),
                format!("resume={:?}", two.join("checkpoints/step-000000005").display().to_string()),
                format!("run_dir={:?}", tmp.path().join("one").display().to_string()),
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let numel = t.shard.numel;
    assert!(t.opt.exp_avg.equal(&m.narrow(0, 0, numel)), "exp_avg resharded from 2 x ZeRO-2 to 1 rank");
    assert!(t.opt.exp_avg_sq.equal(&v.narrow(0, 0, numel)), "exp_avg_sq resharded from 2 x ZeRO-2 to 1 rank");
    assert_eq!(t.opt.step, 5);

    // Three ranks with ZeRO-1 pick up where two left off and finish the run.
    let three = tmp.path().join("three");
    let resume = format!("resume={:?}", two.join("checkpoints/step-000000005").display().to_string());
    let out = run(
        "launch",
        &config(&corpus, &three, "zero = 1\n"),
        &[],
        &[
            "--nproc",
            "3",
            "--set",
            "train.batch_size=12",
            "--set",
            "train.micro_batch=2",
            "--set",
            "train.steps=10",
            "--set",
            &resume,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("at step 5"), "{err}");
    // The same run to float rounding: the ring sums in another order on three ranks than on two.
    let (a, b) = (losses(&two), losses(&three));
    for step in 6..=10 {
        assert!((a[&step] - b[&step]).abs() < 1e-4, "step {step}: two ranks {} three ranks {}", a[&step], b[&step]);
    }
}

#[test]
fn checkpoints_on_a_real_s3_server_commit_in_parts_resume_and_verify() {
    let moto = Moto::start();
    moto.create_bucket("ckpts");
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    let options: String =
        s3_options(&moto.endpoint()).iter().map(|(k, v)| format!("{k} = {v:?}")).collect::<Vec<_>>().join(", ");
    // d_model 512: rank 0's file (weights and two moments) is about 40 MB, above the 16 MiB part size.
    let extra = format!("[checkpoint]\ndir = \"s3://ckpts/run-a\"\nstorage_options = {{ {options} }}\n");
    let dir = tmp.path().join("run");
    let cfg = config(&corpus, &dir, &extra);
    let big = ["--set", "model.d_model=512", "--set", "model.n_head=8"];
    let killed = run("train", &cfg, &[("TESSERA_FAILPOINTS", "ckpt.write=kill@2")], &big);
    assert!(!killed.status.success());
    let out = run("train", &cfg, &[], &big);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resumed from s3://ckpts/run-a/step-000000005 at step 5"), "{err}");

    let store = CkptStore::open("s3://ckpts/run-a", &s3_options(&moto.endpoint())).unwrap();
    let listed: Vec<(u64, bool)> = store.list().unwrap().iter().map(|l| (l.step, l.committed)).collect();
    assert_eq!(listed, [(5, true), (10, true), (15, true)]);
    let loaded = store.load("step-000000015").unwrap();
    assert!(loaded.manifest.files[0].bytes > 16 << 20, "rank 0's file went up in parts");

    // The CLI on the same bucket: list, then verify one checkpoint.
    let with_env = |c: &mut Command| {
        c.env("AWS_ENDPOINT", moto.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1");
    };
    let mut c = tessera();
    c.args(["ckpt", "list", "s3://ckpts/run-a"]);
    with_env(&mut c);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("step-000000015") && text.contains("committed"), "{text}");
    let mut c = tessera();
    c.args(["ckpt", "verify", "s3://ckpts/run-a/step-000000010"]);
    with_env(&mut c);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    // What is not there is the user's to fix (exit code 2), as on a local disk: a checkpoint, a bucket.
    for (cmd, target, says) in [
        ("verify", "s3://ckpts/run-a/step-000000099", "step-000000099/manifest.json: not found"),
        ("list", "s3://no-such-bucket/run-a", "the bucket does not exist: create it"),
    ] {
        let mut c = tessera();
        c.args(["ckpt", cmd, target]);
        with_env(&mut c);
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "ckpt {cmd} {target}: {err}");
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn ckpt_verify_names_a_corrupt_file_and_list_marks_leftovers() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    let dir = tmp.path().join("run");
    let out = run("train", &config(&corpus, &dir, ""), &[], &["--set", "train.steps=10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ckpts = dir.join("checkpoints");
    let file = ckpts.join("step-000000010/rank-00000.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&file, bytes).unwrap();
    std::fs::create_dir(ckpts.join("step-000000015.staging-0123456789abcdef")).unwrap();

    let out = tessera().args(["ckpt", "verify"]).arg(ckpts.join("step-000000010")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("rank-00000.safetensors") && err.contains("truncated"), "{err}");
    assert!(tessera().args(["ckpt", "verify"]).arg(ckpts.join("step-000000005")).status().unwrap().success());

    let out = tessera().args(["ckpt", "list"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    let line =
        |name: &str| text.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name}: {text}")).to_string();
    assert!(line("step-000000005").contains("committed"), "{text}");
    assert!(!line("step-000000005").contains("CORRUPT"), "{text}");
    assert!(line("step-000000010").contains("CORRUPT: rank-00000.safetensors"), "the truncated file is named: {text}");
    assert!(line("step-000000015.staging").contains("leftover"), "{text}");
    let missing = tessera().args(["ckpt", "list"]).arg(tmp.path().join("nope")).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    // A manifest edited into other valid JSON fails its own checksum.
    let manifest = ckpts.join("step-000000005/manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"step\": 5,", "\"step\": 6,")).unwrap();
    let out = tessera().args(["ckpt", "verify"]).arg(ckpts.join("step-000000005")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("edited or corrupted"), "{err}");
    // Nothing to verify is not a pass.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = tessera().args(["ckpt", "verify"]).arg(&empty).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was verified"));
}

/// Builds a two-rank gang's trainers, rank `r` resuming (`auto`) from `run_dirs[r]`'s checkpoints: the step
/// each resumed from, or its error.
fn resume_as_a_gang(corpus: &Path, run_dirs: [&Path; 2]) -> Vec<Result<Option<u64>, String>> {
    let rings = common::rings(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = rings
            .into_iter()
            .zip(run_dirs)
            .map(|(ring, dir)| {
                s.spawn(move || {
                    let cfg = common::tiny_run(corpus, dir, &["train.steps=10", "train.checkpoint_every=5"]);
                    tessera::train::Trainer::with_comm(cfg, Box::new(ring))
                        .map(|t| t.resumed_from.map(|r| r.0))
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn every_rank_resumes_from_rank_0s_newest_checkpoint_and_a_rank_that_cannot_find_it_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    stdlib_corpus(&corpus, 2, TokenizerKind::Byte);
    // Two stores: one with checkpoints after steps 5 and 10, the other with only the one after step 5 (as if
    // a commit landed between two ranks' listings).
    let (older, newer) = (tmp.path().join("older"), tmp.path().join("newer"));
    for (dir, steps) in [(&older, "train.steps=5"), (&newer, "train.steps=10")] {
        let cfg = common::tiny_run(&corpus, dir, &[steps, "train.checkpoint_every=5"]);
        tessera::train::Trainer::new(cfg).unwrap().run(tessera::train::TrainOptions { quiet: true }).unwrap();
    }
    // Rank 1 sees a newer checkpoint than rank 0: it follows rank 0.
    let got = resume_as_a_gang(&corpus, [&older, &newer]);
    assert_eq!(got, [Ok(Some(5)), Ok(Some(5))], "both resume where rank 0 does");
    // Rank 1 cannot find rank 0's newest: it says so, naming the checkpoint and the fix.
    let got = resume_as_a_gang(&corpus, [&newer, &older]);
    assert_eq!(got[0], Ok(Some(10)));
    let err = got[1].as_ref().expect_err("rank 1 cannot resume where rank 0 does");
    assert!(err.contains("step-000000010") && err.contains("every rank must read one store"), "{err}");
}

#[test]
fn a_write_that_runs_out_of_space_leaves_nothing_behind_to_keep_the_disk_full() {
    // /dev/full answers every write with ENOSPC: the rank file and the vote's temporary file point there.
    let tmp = tempfile::tempdir().unwrap();
    let store = CkptStore::open(tmp.path().to_str().unwrap(), &[]).unwrap();
    let stage = store.stage_name(5, 1);
    let dir = tmp.path().join(&stage);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.join("rank-00000.safetensors")).unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.join(".ack-rank-00000.json.tmp")).unwrap();

    let tensors = vec![("params".to_string(), tch::Tensor::ones([1 << 16], (tch::Kind::Float, tch::Device::Cpu)))];
    let e = store.write_rank_file(&stage, 0, &tensors).unwrap_err();
    assert!(e.to_string().ends_with("No space left on device (os error 28)"), "said plainly, once: {e}");
    let no = tessera::ckpt::store::Ack { rank: 0, file: None, error: Some("no room".into()) };
    let e = store.write_ack(&stage, &no).unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    assert_eq!(entries(&dir), Vec::<String>::new(), "the part-written file and vote are gone");
}
