//! Shared test fixtures: a real corpus from the `.venv` Python's standard library, and run configs.
#![allow(dead_code)]

pub mod gate;
pub mod moto;

use std::path::{Path, PathBuf};
use std::process::Command;
use tessera::config::{parse, RunConfig};
use tessera::data::{prepare, PrepareOptions, ShardIndex, TokenizerKind};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The standard-library directory of the project's `.venv` Python.
pub fn stdlib_dir() -> PathBuf {
    let out = Command::new(repo().join(".venv/bin/python3"))
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .output()
        .expect("the .venv Python runs (make setup)");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The first `n_files` top-level standard-library modules, sorted by name.
pub fn stdlib_files(n_files: usize) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(stdlib_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "py") && p.is_file())
        .collect();
    files.sort();
    files.truncate(n_files);
    files
}

/// Prepares the first `n_files` top-level standard-library modules (sorted by name) into `out`.
pub fn stdlib_corpus(out: &Path, n_files: usize, tokenizer: TokenizerKind) -> ShardIndex {
    prepare(&PrepareOptions {
        inputs: stdlib_files(n_files),
        out: out.to_path_buf(),
        tokenizer,
        shard_tokens: 1 << 16,
        skip_bad: true,
        extensions: None,
        force: false,
        progress: false,
    })
    .expect("stdlib corpus prepares")
}

/// A resolved config for the `tiny` preset on `corpus`, writing to `run_dir`, with extra TOML lines.
pub fn tiny_run(corpus: &Path, run_dir: &Path, extra: &[&str]) -> RunConfig {
    let text = format!(
        "run_dir = {run:?}\nseed = 7\n[model]\npreset = \"tiny\"\n[data]\npath = {data:?}\neval_fraction = 0.05\n[train]\nsteps = 20\nbatch_size = 8\nmicro_batch = 4\nlr = 3e-3\nwarmup_steps = 5\nlog_every = 1\neval_every = 0\neval_batches = 4\n",
        run = run_dir.display().to_string(),
        data = corpus.display().to_string(),
    );
    let file = parse(&text, Path::new("test.toml"), &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("test config parses");
    file.resolve(&ShardIndex::load(corpus).unwrap()).expect("test config resolves")
}

/// The training-step lines of a run's metrics file: (step, loss).
pub fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The lines of a file (none if it does not exist yet).
pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|s| s.lines().map(String::from).collect()).unwrap_or_default()
}

/// Child processes and environments, as the chaos harness reads them.
#[allow(unused_imports)] // not every test binary uses them
pub use tessera::chaos::harness::{children, environ};

/// Whether `pid` is a zombie (exited, not yet reaped).
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
}

/// Scrapes a Tessera metrics endpoint and parses the exposition with the Prometheus project's own Python
/// parser (`tests/reference/parse_metrics.py`): metric name -> [[labels, value], ...].
pub fn scrape(addr: &str) -> serde_json::Map<String, serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut py = std::process::Command::new(repo().join(".venv/bin/python3"))
        .arg(repo().join("tests/reference/parse_metrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected the exposition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_object().unwrap().clone()
}

pub fn sample(m: &serde_json::Map<String, serde_json::Value>, name: &str, label: Option<(&str, &str)>) -> f64 {
    let samples = m.get(name).unwrap_or_else(|| panic!("no {name} among {:?}", m.keys().collect::<Vec<_>>()));
    samples
        .as_array()
        .unwrap()
        .iter()
        .find(|s| label.is_none_or(|(k, v)| s[0][k] == v))
        .unwrap_or_else(|| panic!("no {name} sample with {label:?}: {samples}"))[1]
        .as_f64()
        .unwrap()
}

/// `world` ranks of this process, joined by a real TCP ring on loopback (each rank a thread of its own).
pub fn rings(world: usize) -> Vec<tessera::comm::tcp::TcpRing> {
    tessera::comm::tcp::TcpRing::on_loopback(world, b"secret", std::time::Duration::from_secs(20)).unwrap()
}
