//! Config validation: the TOML file form through `tessera::config::parse`, `--set` overrides, and the checks of
//! `RunConfigFile::resolve` against a corpus index; plus the user's view through the real `tessera train`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera::config::{parse, ConfigError, DeviceSpec, MicroBatch, RunConfig, RunConfigFile};
use tessera::data::shards::{ShardInfo, TokenDtype, FORMAT};
use tessera::data::{ShardIndex, TokenizerKind};
use tessera::model::preset;
use tessera::model::PRESETS;

/// The smallest config a user can write: everything else has a default.
const MINIMAL: &str = r#"
[model]
preset = "tiny"

[data]
path = "data/tiny"
"#;

fn parse_with(text: &str, overrides: &[&str]) -> Result<RunConfigFile, ConfigError> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    parse(text, Path::new("run.toml"), &overrides)
}

/// An index as `data prepare` would write it for a small corpus of `tokenizer`.
fn corpus(tokenizer: TokenizerKind) -> ShardIndex {
    let (vocab_size, eot_token) = match tokenizer {
        TokenizerKind::Gpt2 => (50_257, 50_256),
        TokenizerKind::Byte => (256, 0),
    };
    ShardIndex {
        format: FORMAT.into(),
        tokenizer,
        vocab_size,
        eot_token,
        dtype: TokenDtype::U16,
        total_tokens: 10_000,
        documents: 3,
        shards: vec![ShardInfo { file: "shard-00000.bin".into(), tokens: 10_000, xxh3: "0123456789abcdef".into() }],
        skipped: vec![],
    }
}

/// Parses `MINIMAL` with `overrides` and resolves it against a byte-level corpus.
fn resolve_with(overrides: &[&str]) -> Result<RunConfig, ConfigError> {
    parse_with(MINIMAL, overrides).expect("the config parses").resolve(&corpus(TokenizerKind::Byte))
}

/// The key of a `ConfigError::Invalid`, panicking on any other outcome.
fn invalid_key(result: Result<RunConfig, ConfigError>) -> (String, String) {
    match result {
        Err(ConfigError::Invalid { key, reason }) => (key, reason),
        Err(other) => panic!("expected ConfigError::Invalid, got {other:?}"),
        Ok(cfg) => panic!("expected an invalid config, but it resolved: {cfg:?}"),
    }
}

fn parse_error(result: Result<RunConfigFile, ConfigError>) -> String {
    match result {
        Err(e @ ConfigError::Parse { .. }) => e.to_string(),
        Err(other) => panic!("expected ConfigError::Parse, got {other:?}"),
        Ok(file) => panic!("expected a parse error, but it parsed: {file:?}"),
    }
}

#[test]
fn minimal_config_resolves_with_the_documented_defaults() {
    let cfg = resolve_with(&[]).unwrap();
    assert_eq!(cfg.run_dir, PathBuf::from("runs/default"));
    assert_eq!(cfg.seed, 0);
    assert_eq!(cfg.device, DeviceSpec::Cpu);
    assert_eq!(cfg.preset, "tiny");
    // The preset's shape; the vocabulary is the byte corpus's 256.
    let tiny = preset("tiny").unwrap();
    assert_eq!((cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model), (tiny.n_layer, tiny.n_head, tiny.d_model));
    assert_eq!(cfg.model.seq_len, tiny.seq_len);
    assert_eq!(cfg.model.vocab_size, 256);
    assert_eq!(cfg.data_path, PathBuf::from("data/tiny"));
    assert_eq!(cfg.tokenizer, TokenizerKind::Byte);
    assert_eq!(cfg.eval_fraction, 0.01);
    assert_eq!(cfg.steps, 100);
    assert_eq!(cfg.batch_size, 16);
    assert_eq!(cfg.micro_batch_for(1), 16, "micro_batch defaults to each rank's whole share");
    assert_eq!(cfg.accum_steps, 1);
    // So the same config scales to any world size the batch divides over, with no accumulation.
    for world in [2, 4, 16] {
        cfg.check_world(world).unwrap();
        assert_eq!(cfg.micro_batch_for(world), 16 / world);
    }
    assert!(cfg.check_world(3).unwrap_err().to_string().contains("train.batch_size"));
    assert_eq!(cfg.schedule.lr, 6e-4);
    assert_eq!(cfg.schedule.warmup_steps, 10);
    assert_eq!(cfg.schedule.total_steps, 100);
    assert_eq!(cfg.schedule.min_lr_ratio, 0.1);
    // GPT-3's AdamW settings.
    assert_eq!(cfg.adamw.beta1, 0.9);
    assert_eq!(cfg.adamw.beta2, 0.95);
    assert_eq!(cfg.adamw.eps, 1e-8);
    assert_eq!(cfg.adamw.weight_decay, 0.1);
    assert_eq!(cfg.grad_clip, 1.0);
    assert_eq!(cfg.log_every, 10);
    assert_eq!(cfg.eval_every, 100);
    assert_eq!(cfg.eval_batches, 8);
    assert_eq!(cfg.read_every, 8);
    assert_eq!(cfg.threads, 0);
    assert_eq!(cfg.peak_tflops, 989.0);
}

#[test]
fn gpt2_corpus_defaults_the_vocabulary_to_50304_padded() {
    let cfg = parse_with(MINIMAL, &[]).unwrap().resolve(&corpus(TokenizerKind::Gpt2)).unwrap();
    assert_eq!(cfg.model.vocab_size, 50_304);
    assert_eq!(cfg.tokenizer, TokenizerKind::Gpt2);
}

#[test]
fn config_resolves_against_a_really_prepared_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let text_file = tmp.path().join("a.txt");
    std::fs::write(&text_file, "a few bytes of text").unwrap();
    let out = tmp.path().join("corpus");
    tessera::data::prepare(&tessera::data::PrepareOptions {
        inputs: vec![text_file],
        out: out.clone(),
        tokenizer: TokenizerKind::Byte,
        shard_tokens: 1 << 20,
        skip_bad: false,
        extensions: None,
        force: false,
        progress: false,
    })
    .unwrap();
    let index = ShardIndex::load(&out).unwrap();
    let text = format!("[model]\npreset = \"mini\"\n[data]\npath = {:?}\n", out.display().to_string());
    let cfg = parse_with(&text, &[]).unwrap().resolve(&index).unwrap();
    assert_eq!(cfg.tokenizer, TokenizerKind::Byte);
    assert_eq!(cfg.model.vocab_size, 256);
    assert_eq!(cfg.data_path, out);
}

#[test]
fn unknown_top_level_key_is_rejected_naming_the_key() {
    let msg = parse_error(parse_with(&format!("stepz = 5\n{MINIMAL}"), &[]));
    assert!(msg.contains("stepz"), "{msg}");
    assert!(msg.contains("run.toml"), "the message names the file: {msg}");
}

#[test]
fn unknown_key_inside_train_is_rejected_naming_the_key_and_table() {
    let msg = parse_error(parse_with(&format!("{MINIMAL}\n[train]\nsteps = 5\nlr_max = 1e-3\n"), &[]));
    assert!(msg.contains("lr_max"), "{msg}");
    assert!(msg.contains("train"), "{msg}");
}

#[test]
fn unknown_keys_inside_model_and_data_are_rejected() {
    let msg = parse_error(parse_with("[model]\npreset = \"tiny\"\nlayers = 3\n[data]\npath = \"d\"\n", &[]));
    assert!(msg.contains("layers"), "{msg}");
    let msg = parse_error(parse_with("[model]\npreset = \"tiny\"\n[data]\npath = \"d\"\neval_frac = 0.1\n", &[]));
    assert!(msg.contains("eval_frac"), "{msg}");
}

#[test]
fn wrong_type_is_rejected_naming_the_key() {
    let msg = parse_error(parse_with(&format!("{MINIMAL}\n[train]\nsteps = \"many\"\n"), &[]));
    assert!(msg.contains("train.steps"), "{msg}");
    let msg = parse_error(parse_with(&format!("seed = -1\n{MINIMAL}"), &[]));
    assert!(msg.contains("seed"), "{msg}");
    let msg = parse_error(parse_with("[model]\npreset = 5\n[data]\npath = \"d\"\n", &[]));
    assert!(msg.contains("model.preset"), "{msg}");
}

#[test]
fn missing_data_section_is_rejected() {
    let msg = parse_error(parse_with("[model]\npreset = \"tiny\"\n", &[]));
    assert!(msg.contains("data"), "{msg}");
}

#[test]
fn reading_the_device_never_is_refused_with_what_to_write_instead() {
    let (key, reason) = invalid_key(resolve_with(&["train.read_every=0"]));
    assert_eq!(key, "train.read_every");
    assert!(reason.contains("1 reads every step"), "{reason}");
}

#[test]
fn invalid_toml_is_a_parse_error_naming_the_file() {
    let msg = parse_error(parse_with("[model\npreset = \"tiny\"\n", &[]));
    assert!(msg.contains("run.toml"), "{msg}");
}

#[test]
fn unknown_preset_is_rejected_listing_every_preset() {
    let (key, reason) = invalid_key(resolve_with(&["model.preset=gpt-9000"]));
    assert_eq!(key, "model.preset");
    assert!(reason.contains("gpt-9000"), "{reason}");
    for p in PRESETS {
        assert!(reason.contains(p.name), "preset {} is not listed in: {reason}", p.name);
    }
}

#[test]
fn micro_batch_that_does_not_divide_batch_size_is_rejected() {
    let (key, reason) = invalid_key(resolve_with(&["train.batch_size=16", "train.micro_batch=5"]));
    assert_eq!(key, "train.micro_batch");
    assert!(reason.contains("16"), "{reason}");
    let (key, _) = invalid_key(resolve_with(&["train.batch_size=16", "train.micro_batch=0"]));
    assert_eq!(key, "train.micro_batch");
    // A divisor is accepted and sets the accumulation.
    let cfg = resolve_with(&["train.batch_size=16", "train.micro_batch=4"]).unwrap();
    assert_eq!((cfg.micro_batch, cfg.accum_steps), (4, 4));
    assert!(!cfg.micro_batch_auto);
}

#[test]
fn micro_batch_auto_is_accepted_and_other_words_are_rejected_saying_what_to_write() {
    // From the file and from --set (a bare word is taken as a string).
    let file = parse_with(&format!("{MINIMAL}\n[train]\nmicro_batch = \"auto\"\n"), &[]).unwrap();
    assert_eq!(file.train.micro_batch, Some(MicroBatch::Auto));
    let cfg = resolve_with(&["train.batch_size=16", "train.micro_batch=auto"]).unwrap();
    assert!(cfg.micro_batch_auto);
    assert_eq!((cfg.micro_batch, cfg.accum_steps), (16, 1), "starts at the whole batch");

    for text in
        [format!("{MINIMAL}\n[train]\nmicro_batch = \"big\"\n"), format!("{MINIMAL}\n[train]\nmicro_batch = -2\n")]
    {
        let err = parse_error(parse_with(&text, &[]));
        assert!(err.contains("train.micro_batch") && err.contains("\"auto\""), "{err}");
    }
    let err = parse_error(parse_with(MINIMAL, &["train.micro_batch=big"]));
    assert!(err.contains("train.micro_batch") && err.contains("\"auto\""), "{err}");
    // Zero and a number that does not divide the batch name the key, the divisors and "auto".
    let (key, reason) = invalid_key(resolve_with(&["train.batch_size=12", "train.micro_batch=5"]));
    assert_eq!(key, "train.micro_batch");
    assert!(reason.contains("1, 2, 3, 4, 6, 12") && reason.contains("\"auto\""), "{reason}");
    let (key, _) = invalid_key(resolve_with(&["train.micro_batch=0"]));
    assert_eq!(key, "train.micro_batch");
}

#[test]
fn zero_steps_and_zero_batch_size_are_rejected() {
    assert_eq!(invalid_key(resolve_with(&["train.steps=0", "train.warmup_steps=0"])).0, "train.steps");
    assert_eq!(invalid_key(resolve_with(&["train.batch_size=0"])).0, "train.batch_size");
}

#[test]
fn absurdly_large_sizes_and_timeouts_are_refused_naming_the_key_instead_of_overflowing_later() {
    for (set, key) in [
        ("train.batch_size=4294967296", "train.batch_size"),
        ("train.threads=100000", "train.threads"),
        ("launch.nproc=100000", "launch.nproc"),
        ("launch.rdzv_timeout_s=1e300", "launch.rdzv_timeout_s"),
        ("launch.comm_timeout_s=1e300", "launch.comm_timeout_s"),
        ("launch.hang_timeout_s=1e300", "launch.hang_timeout_s"),
        ("launch.restart_window_s=1e300", "launch.restart_window_s"),
        ("checkpoint.timeout_s=1e300", "checkpoint.timeout_s"),
        ("model.d_model=4294967296", "model.d_model"),
        ("model.n_layer=999999999999", "model.n_layer"),
        ("model.vocab_size=9000000000000000", "model.vocab_size"),
        ("data.prefetch=1000000000000", "data.prefetch"),
    ] {
        let (k, reason) = invalid_key(resolve_with(&[set]));
        assert_eq!(k, key, "{set}: {reason}");
    }
    // The largest accepted values still make durations.
    let cfg = resolve_with(&["launch.hang_timeout_s=1e7", "checkpoint.timeout_s=1e7"]).unwrap();
    assert_eq!(std::time::Duration::from_secs_f64(cfg.launch.hang_timeout_s).as_secs(), 10_000_000);
}

#[test]
fn learning_rate_that_is_not_positive_or_not_a_number_is_rejected() {
    for bad in ["0.0", "-1e-3", "nan", "inf"] {
        let (key, _) = invalid_key(resolve_with(&[&format!("train.lr={bad}")]));
        assert_eq!(key, "train.lr", "lr = {bad}");
    }
    assert_eq!(resolve_with(&["train.lr=1e-3"]).unwrap().schedule.lr, 1e-3);
}

#[test]
fn warmup_longer_than_the_run_is_rejected() {
    let (key, reason) = invalid_key(resolve_with(&["train.steps=10", "train.warmup_steps=11"]));
    assert_eq!(key, "train.warmup_steps");
    assert!(reason.contains("11") && reason.contains("10"), "{reason}");
    // Warm-up over the whole run is allowed.
    assert_eq!(resolve_with(&["train.steps=10", "train.warmup_steps=10"]).unwrap().schedule.warmup_steps, 10);
}

#[test]
fn eval_fraction_outside_zero_to_one_half_is_rejected() {
    for bad in ["-0.1", "0.51", "1.0", "nan"] {
        let (key, _) = invalid_key(resolve_with(&[&format!("data.eval_fraction={bad}")]));
        assert_eq!(key, "data.eval_fraction", "eval_fraction = {bad}");
    }
    for good in ["0.0", "0.5"] {
        resolve_with(&[&format!("data.eval_fraction={good}")]).unwrap();
    }
}

#[test]
fn betas_and_min_lr_ratio_outside_their_range_are_rejected() {
    assert_eq!(invalid_key(resolve_with(&["train.beta1=1.0"])).0, "train.beta1");
    assert_eq!(invalid_key(resolve_with(&["train.beta2=-0.5"])).0, "train.beta2");
    assert_eq!(invalid_key(resolve_with(&["train.min_lr_ratio=1.5"])).0, "train.min_lr_ratio");
    // A ratio of exactly 1 (a constant rate after warm-up) is allowed.
    assert_eq!(resolve_with(&["train.min_lr_ratio=1.0"]).unwrap().schedule.min_lr_ratio, 1.0);
}

#[test]
fn negative_weight_decay_and_grad_clip_are_rejected() {
    assert_eq!(invalid_key(resolve_with(&["train.weight_decay=-0.1"])).0, "train.weight_decay");
    assert_eq!(invalid_key(resolve_with(&["train.grad_clip=-1.0"])).0, "train.grad_clip");
    // Zero disables clipping.
    assert_eq!(resolve_with(&["train.grad_clip=0.0"]).unwrap().grad_clip, 0.0);
}

#[test]
fn d_model_not_divisible_by_n_head_is_rejected_naming_both_keys() {
    let (key, reason) = invalid_key(resolve_with(&["model.d_model=66", "model.n_head=4"]));
    assert_eq!(key, "model.d_model");
    assert!(reason.contains("model.n_head"), "{reason}");
    assert!(reason.contains("66"), "{reason}");
}

#[test]
fn non_positive_model_shape_is_rejected_naming_the_field() {
    assert_eq!(invalid_key(resolve_with(&["model.n_layer=0"])).0, "model.n_layer");
    assert_eq!(invalid_key(resolve_with(&["model.seq_len=-8"])).0, "model.seq_len");
}

#[test]
fn vocab_size_smaller_than_the_corpus_vocabulary_is_rejected() {
    let (key, reason) = invalid_key(resolve_with(&["model.vocab_size=200"]));
    assert_eq!(key, "model.vocab_size");
    assert!(reason.contains("200") && reason.contains("256"), "{reason}");

    let file = parse_with(MINIMAL, &["model.vocab_size=50256"]).unwrap();
    let (key, reason) = invalid_key(file.resolve(&corpus(TokenizerKind::Gpt2)));
    assert_eq!(key, "model.vocab_size");
    assert!(reason.contains("50257"), "{reason}");

    // Exactly the corpus's vocabulary, or larger, is fine.
    let file = parse_with(MINIMAL, &["model.vocab_size=50257"]).unwrap();
    assert_eq!(file.resolve(&corpus(TokenizerKind::Gpt2)).unwrap().model.vocab_size, 50_257);
    assert_eq!(resolve_with(&["model.vocab_size=512"]).unwrap().model.vocab_size, 512);
}

#[test]
fn bad_device_strings_are_rejected_and_good_ones_parse() {
    for bad in ["gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda0", ""] {
        let (key, reason) = invalid_key(resolve_with(&[&format!("device=\"{bad}\"")]));
        assert_eq!(key, "device", "device = {bad:?}");
        assert!(reason.contains("cpu, cuda, cuda:N or auto"), "{reason}");
    }
    for (good, want) in [
        ("cpu", DeviceSpec::Cpu),
        ("cuda", DeviceSpec::Cuda(0)),
        ("cuda:3", DeviceSpec::Cuda(3)),
        ("auto", DeviceSpec::Auto),
    ] {
        assert_eq!(resolve_with(&[&format!("device={good}")]).unwrap().device, want, "device = {good}");
    }
}

#[test]
fn set_overrides_apply_dotted_keys_numbers_and_strings() {
    let text = format!("seed = 1\n{MINIMAL}\n[train]\nsteps = 50\nlr = 1e-3\n");
    let file = parse_with(
        &text,
        &[
            "train.steps=12",        // integer, replacing the file's value
            "train.lr=3e-4",         // float
            "train.micro_batch = 4", // spaces around `=`
            "seed=42",               // top-level key
            "model.preset=mini",     // bare string (not TOML) is taken as a string
            "data.path=\"other/dir\"",
            "run_dir=runs/exp-1",
            "model.seq_len=32", // a key the file does not have
            "data.eval_fraction=0.25",
        ],
    )
    .unwrap();
    assert_eq!(file.train.steps, 12);
    assert_eq!(file.train.lr, 3e-4);
    assert_eq!(file.train.micro_batch, Some(MicroBatch::Samples(4)));
    assert_eq!(file.seed, 42);
    assert_eq!(file.model.preset, "mini");
    assert_eq!(file.data.path, PathBuf::from("other/dir"));
    assert_eq!(file.run_dir, PathBuf::from("runs/exp-1"));
    assert_eq!(file.model.seq_len, Some(32));
    assert_eq!(file.data.eval_fraction, 0.25);

    let cfg = file.resolve(&corpus(TokenizerKind::Byte)).unwrap();
    assert_eq!(cfg.model.d_model, preset("mini").unwrap().d_model);
    assert_eq!((cfg.steps, cfg.accum_steps, cfg.model.seq_len), (12, 4, 32));
}

#[test]
fn set_creates_a_table_the_file_does_not_have() {
    // MINIMAL has no [train] table.
    let file = parse_with(MINIMAL, &["train.batch_size=8"]).unwrap();
    assert_eq!(file.train.batch_size, 8);
    assert_eq!(file.train.steps, 100, "the rest of [train] keeps its defaults");
}

#[test]
fn later_set_wins_over_earlier_set() {
    let file = parse_with(MINIMAL, &["train.steps=3", "train.steps=9"]).unwrap();
    assert_eq!(file.train.steps, 9);
}

#[test]
fn set_without_equals_sign_is_rejected() {
    match parse_with(MINIMAL, &["train.lr"]) {
        Err(ConfigError::BadOverride { arg, reason }) => {
            assert_eq!(arg, "train.lr");
            assert!(reason.contains("key=value"), "{reason}");
        }
        other => panic!("expected BadOverride, got {other:?}"),
    }
}

#[test]
fn set_with_an_empty_key_or_key_part_is_rejected() {
    for arg in ["=5", "train..lr=1e-3", "train.=3", ".steps=3"] {
        assert!(
            matches!(parse_with(MINIMAL, &[arg]), Err(ConfigError::BadOverride { .. })),
            "--set {arg:?} was accepted"
        );
    }
}

#[test]
fn set_through_a_value_is_rejected_naming_it() {
    match parse_with(&format!("seed = 1\n{MINIMAL}"), &["seed.x=1"]) {
        Err(ConfigError::BadOverride { reason, .. }) => {
            assert!(reason.contains("`seed`"), "{reason}")
        }
        other => panic!("expected BadOverride, got {other:?}"),
    }
}

#[test]
fn set_of_an_unknown_key_or_wrong_type_is_rejected_naming_the_key() {
    let msg = parse_error(parse_with(MINIMAL, &["train.stepz=4"]));
    assert!(msg.contains("stepz"), "{msg}");
    let msg = parse_error(parse_with(MINIMAL, &["train.steps=abc"]));
    assert!(msg.contains("train.steps"), "{msg}");
}

// ---- through the real binary ----

fn tessera(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).current_dir(cwd).output().expect("tessera runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small byte-level corpus in `dir/corpus`, prepared by the real binary.
fn prepare_corpus(dir: &Path) {
    std::fs::write(dir.join("a.txt"), "enough text for a corpus. ".repeat(40)).unwrap();
    let prep = tessera(&["data", "prepare", "--input", "a.txt", "--out", "corpus", "--tokenizer", "byte"], dir);
    assert!(prep.status.success(), "prepare failed: {}", stderr(&prep));
}

#[test]
fn train_with_an_unknown_key_exits_2_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, format!("run_dir = \"run\"\n{MINIMAL}\n[train]\nstepps = 5\n")).unwrap();
    let o = tessera(&["train", "--config", config.to_str().unwrap()], tmp.path());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("stepps"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
    assert!(!tmp.path().join("run").exists(), "no run directory is created for a bad config");
}

#[test]
fn launch_refuses_a_batch_that_does_not_divide_over_its_ranks_before_starting_any() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_corpus(tmp.path());
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        "run_dir = \"run\"\n[model]\npreset = \"tiny\"\n[data]\npath = \"corpus\"\n[train]\nbatch_size = 8\n",
    )
    .unwrap();
    let o = tessera(&["launch", "--config", "run.toml", "--nproc", "3"], tmp.path());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("train.batch_size") && err.contains("world size (3)"), "{err}");
    assert!(!err.contains("rank 0") && !err.contains("reset in place"), "no rank was started: {err}");
    // (arguments, the run secret exported, what the error names)
    for (args, secret, flag) in [
        (&["--nproc", "0"][..], "", "--nproc"),
        (&["--nproc", "1", "--nnodes", "0"][..], "", "--nnodes"),
        (&["--nproc", "1", "--nnodes", "2"][..], "", "TESSERA_RUN_SECRET"),
        (&["--nproc", "1", "--nnodes", "2"][..], "s3cret", "--rdzv"),
        (&["--nproc", "1", "--nnodes", "2", "--rdzv", "no-such-host.invalid:1"][..], "s3cret", "--rdzv"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["launch", "--config", "run.toml"])
            .args(args)
            .env("TESSERA_RUN_SECRET", secret)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{}", stderr(&o));
    }
}

#[test]
fn train_with_an_invalid_value_exits_2_naming_the_key_before_touching_the_run_dir() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_corpus(tmp.path());

    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        "run_dir = \"run\"\n[model]\npreset = \"tiny\"\n[data]\npath = \"corpus\"\n[train]\nbatch_size = 16\nmicro_batch = 5\n",
    )
    .unwrap();
    let o = tessera(&["train", "--config", "run.toml"], tmp.path());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("train.micro_batch"), "{err}");
    assert!(!tmp.path().join("run").exists(), "no run directory is created for a bad config");

    // A bad --set is reported the same way.
    let o = tessera(&["train", "--config", "run.toml", "--set", "train.micro_batch"], tmp.path());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("--set") && err.contains("train.micro_batch"), "{err}");
}

#[test]
fn train_with_a_missing_config_file_exits_2_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tessera(&["train", "--config", "nope.toml"], tmp.path());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn a_cache_directory_that_is_not_utf8_is_refused_naming_the_key_instead_of_panicking() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    prepare_corpus(tmp.path());
    let config = tmp.path().join("run.toml");
    std::fs::write(&config, "run_dir = \"run\"\n[model]\npreset = \"tiny\"\n[data]\npath = \"corpus\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train", "--config", "run.toml"])
        .env("TESSERA_CACHE", std::ffi::OsStr::from_bytes(b"/tmp/cache-\xff"))
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("data.cache_dir") && err.contains("not UTF-8"), "{err}");
}

#[test]
fn a_url_missing_a_slash_is_refused_instead_of_being_taken_for_a_local_directory() {
    // `s3:/ckpts/x` used to write checkpoints into ./s3:/ckpts/x on the local disk, silently.
    let (key, reason) = invalid_key(resolve_with(&["checkpoint.dir=\"s3:/ckpts/x\""]));
    assert_eq!(key, "checkpoint.dir");
    assert!(reason.contains("s3://BUCKET/PATH"), "{reason}");
    for fine in ["runs/a", "s3://ckpts/x", "/tmp/x:y", "./s3:/ckpts/x"] {
        assert_eq!(tessera::storage::mistyped_url(fine), None, "{fine}");
    }
    assert!(tessera::storage::mistyped_url("gs:bucket/corpus").is_some());
}

#[test]
fn a_misspelt_storage_option_is_refused_naming_it_instead_of_being_ignored() {
    let good = [("endpoint".to_string(), "http://127.0.0.1:1".to_string()), ("allow_http".into(), "true".into())];
    tessera::storage::Store::open("s3://bucket/x", &good).unwrap();
    let bad = [("endpont".to_string(), "http://127.0.0.1:1".to_string())];
    let e = tessera::storage::Store::open("s3://bucket/x", &bad).err().expect("a misspelt key is refused").to_string();
    assert!(e.contains("unknown storage option `endpont`"), "{e}");
}
