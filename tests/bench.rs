//! `tessera bench` and `tessera doctor` as a user runs them (on the CPU here; scripts/gpu-check.sh runs them
//! on a GPU).

use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().unwrap()
}

fn results(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("RESULT ")).map(String::from).collect()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

#[test]
fn bench_times_the_training_step_and_reports_in_the_pytorch_baselines_format() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = tessera(&[
        "bench",
        "--model",
        "tiny",
        "--batch",
        "4",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = results(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!((field(line, "impl"), field(line, "size"), field(line, "batch")), ("tessera", "tiny", "4"));
    assert!(field(line, "step_ms").parse::<f64>().unwrap() > 0.0);
    assert_eq!(field(line, "mfu"), "n/a", "the CPU has no peak to compare with");
    let parsed: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let r = &parsed[0];
    assert_eq!(r["seq"], 64);
    assert_eq!(r["steps"], 3);
    // tokens/s is the batch's tokens over the step time.
    let tps = r["tokens_per_s"].as_f64().unwrap();
    let expected = 4.0 * 64.0 / (r["step_ms"].as_f64().unwrap() / 1e3);
    assert!((tps - expected).abs() < 1e-6 * expected);
    // The step trains: 4 steps on random tokens from a random init stay near ln(256) = 5.55 and are finite.
    let loss = r["last_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && (4.0..7.0).contains(&loss), "loss {loss}");
    assert_eq!(r["levers"]["fused_cross_entropy"], true);
    assert_eq!(r["levers"]["sync_every_step"], false);
}

#[test]
fn the_ladder_turns_the_levers_on_one_at_a_time() {
    let out = tessera(&[
        "bench", "--model", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--ladder",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names: Vec<String> = results(&out).iter().map(|l| field(l, "impl").to_string()).collect();
    assert_eq!(
        names,
        ["tessera[plain]", "tessera[+fused-ce]", "tessera[+fused-adamw]", "tessera[+no-sync]", "tessera[+tf32]"]
    );
}

#[test]
fn kernels_compares_tessera_s_own_kernels_in_one_process() {
    let out = tessera(&[
        "bench",
        "--model",
        "tiny",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--kernels",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names: Vec<String> = results(&out).iter().map(|l| field(l, "impl").to_string()).collect();
    assert_eq!(
        names,
        [
            "tessera",
            "tessera[ce-kernel]",
            "tessera[ln-kernel]",
            "tessera[adamw-kernel]",
            "tessera[adamw-kernel+bf16-weights]",
            "tessera[ce-kernel+ln-kernel+adamw-kernel+bf16-weights]"
        ]
    );
    let out = tessera(&["bench", "--model", "tiny", "--batch", "2", "--device", "cpu", "--kernels", "--ladder"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn profile_writes_a_trace_and_counts_each_operator_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = tessera(&[
        "bench",
        "--model",
        "tiny",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--profile",
        dir.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("trace-tiny-all.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().expect("a Chrome trace");
    assert!(events.iter().any(|e| e["name"] == "aten::addmm"), "no addmm in the trace");
    let calls = |op: &str| {
        let line = stdout
            .lines()
            .find(|l| l.starts_with("PROFILE") && l.ends_with(&format!(" name={op}")))
            .unwrap_or_else(|| panic!("no PROFILE line for {op} in:\n{stdout}"));
        field(line, "calls_per_step").parse::<f64>().unwrap()
    };
    // tiny has 2 blocks of 4 linear layers, each one addmm forward; AdamW is one fused call per group (the
    // weight-decayed matmul weights, and the rest).
    assert_eq!(calls("aten::addmm"), 8.0);
    assert_eq!(calls("aten::_fused_adamw_"), 2.0);
    assert!(dir.path().join("kernels-tiny-all.tsv").exists());

    // Several variants: each timed first, then each profiled, each result printed with its own kernels.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = tessera(&[
        "bench",
        "--model",
        "tiny",
        "--batch",
        "2",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--kernels",
        "--profile",
        d,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let traces = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("trace-tiny-"));
    assert_eq!(traces.count(), 6);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    for (i, l) in lines.iter().enumerate().filter(|(_, l)| l.starts_with("RESULT ")) {
        let variant = field(l, "impl");
        assert!(lines.get(i + 1).is_some_and(|p| p.starts_with(&format!("PROFILE impl={variant} "))), "{stdout}");
    }
}

#[test]
fn on_the_cpu_the_bench_step_runs_on_one_thread_as_training_does_unless_told_otherwise() {
    for (args, want) in [(&[][..], "cpu, 1 thread\""), (&["--threads", "2"][..], "cpu, 2 threads\"")] {
        let mut all =
            vec!["bench", "--model", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu"];
        all.extend_from_slice(args);
        let out = tessera(&all);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines = results(&out);
        assert!(lines.len() == 1 && lines[0].ends_with(&format!("device=\"{want}")), "{lines:?}");
    }
    let out = tessera(&["bench", "--model", "tiny", "--batch", "2", "--device", "cpu", "--threads", "0"]);
    assert_eq!(out.status.code(), Some(2), "--threads 0 is refused");
}

#[test]
fn bad_bench_arguments_are_named_with_what_to_do() {
    let out = tessera(&["bench", "--model", "gpt-9000", "--batch", "4", "--device", "cpu"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gpt-9000") && err.contains("gpt-125m"), "{err}");
    let out = tessera(&["bench", "--model", "tiny", "--batch", "0", "--device", "cpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch 0"));
    let out = tessera(&["bench", "--model", "tiny", "--batch", "2", "--heads", "5", "--device", "cpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--heads"));
    let out = tessera(&["bench", "--model", "tiny", "--batch", "2", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2));
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    let out = tessera(&["bench", "--model", "tiny", "--batch", "2", "--device", "cpu", "--profile", path]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot make it a directory"));
    // Sizes that used to panic inside libtorch's allocations are named first.
    for (args, says) in [
        (&["--batch", "100000000000"][..], "--batch 100000000000"),
        (&["--batch", "100000", "--seq", "100000"][..], "tokens a step"),
        (&["--batch", "2", "--seq", "100000000000"][..], "model.seq_len"),
    ] {
        let out = tessera(&[&["bench", "--model", "tiny", "--device", "cpu"][..], args].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A model whose state alone cannot fit (1 TB) is refused before anything is allocated.
    let out = tessera(&["bench", "--model", "gpt-70b", "--batch", "1", "--seq", "64", "--device", "cpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("gpt-70b") && err.contains("needs"), "{err}");
}

#[test]
fn doctor_checks_the_kernels_on_the_cpu_and_says_nccl_does_not_apply() {
    let out = tessera(&["doctor", "--device", "cpu"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for check in ["device", "cross-entropy", "CUDA kernels", "recomputation", "fused AdamW"] {
        assert!(text.lines().any(|l| l.starts_with("ok") && l.contains(check)), "{check} not ok in:\n{text}");
    }
    // What only a GPU has is listed as not applying, not left out.
    for check in ["bf16 autocast", "memory statistics", "NCCL"] {
        assert!(text.lines().any(|l| l.starts_with("n/a") && l.contains(check)), "{check} not n/a in:\n{text}");
    }
}

#[test]
fn bench_with_phases_also_times_forward_backward_the_norm_and_the_update_apart() {
    let out = tessera(&[
        "bench", "--model", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu", "--phases",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = results(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    for key in ["fwd_ms", "bwd_ms", "norm_ms", "opt_ms"] {
        let ms: f64 = field(&lines[0], key).parse().unwrap();
        assert!(ms > 0.0, "{key} = {ms} in {}", lines[0]);
    }
}
