//! The shard reader's object-store path against a real S3-compatible server: moto's, from the project
//! `.venv`, started on a free loopback port for each test and killed when the test ends (even on panic).
//!
//! A small corpus is prepared locally from the `.venv` Python's standard library, uploaded with
//! `Store::upload`, and read back through `TokenShards::open_at`; the local copy, read with
//! `TokenShards::open`, is the reference every remote read is compared against.

mod common;

use common::losses;
use common::moto::{free_port, s3_options, Moto};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tessera::config::{parse, RunConfig};
use tessera::data::{prepare, CacheOptions, DataError, PrepareOptions, ShardIndex, TokenShards, TokenizerKind};
use tessera::storage::{StorageError, Store};
use tessera::train::{TrainOptions, Trainer};

/// Tokens per shard: small, so the byte-level corpus of eight stdlib modules (~71k tokens) has ~9 shards.
const SHARD_TOKENS: u64 = 8192;
/// Bytes of a full shard (the byte tokenizer stores u16 tokens).
const SHARD_BYTES: u64 = SHARD_TOKENS * 2;
const BUCKET: &str = "tessera-test";

// ---------------------------------------------------------------------------------------------------------
// The corpus.

/// Prepares the first eight top-level standard-library modules into `out`, in `SHARD_TOKENS` shards.
fn small_corpus(out: &Path) -> ShardIndex {
    prepare(&PrepareOptions {
        inputs: common::stdlib_files(8),
        out: out.to_path_buf(),
        tokenizer: TokenizerKind::Byte,
        shard_tokens: SHARD_TOKENS,
        skip_bad: true,
        extensions: None,
        force: false,
        progress: false,
    })
    .expect("stdlib corpus prepares")
}

/// A local corpus, a server, and the same corpus uploaded to `s3://BUCKET/corpus`.
struct Remote {
    tmp: tempfile::TempDir,
    local: PathBuf,
    index: ShardIndex,
    url: String,
    options: Vec<(String, String)>,
    store: Store,
    // Last, so it is killed after the store is dropped.
    _server: Moto,
}

impl Remote {
    /// Everything uploaded except the shards named in `skip`.
    fn new(skip: &[&str]) -> Remote {
        let tmp = tempfile::tempdir().unwrap();
        let local = tmp.path().join("corpus");
        let index = small_corpus(&local);
        assert!(index.shards.len() >= 6, "the test corpus should have several shards, has {}", index.shards.len());
        let server = Moto::start();
        server.create_bucket(BUCKET);
        let url = format!("s3://{BUCKET}/corpus");
        let options = s3_options(&server.endpoint());
        let store = Store::open(&url, &options).unwrap();
        for s in index.shards.iter().filter(|s| !skip.contains(&s.file.as_str())) {
            store.upload(&local.join(&s.file), &s.file).unwrap();
        }
        store.upload(&local.join("index.json"), "index.json").unwrap();
        Remote { tmp, local, index, url, options, store, _server: server }
    }

    fn cache_dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn open(&self, cache: &Path, max_bytes: u64) -> TokenShards {
        TokenShards::open_at(&self.url, &self.options, &CacheOptions { dir: cache.to_path_buf(), max_bytes })
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.url))
    }

    fn local_shards(&self) -> TokenShards {
        TokenShards::open(&self.local).unwrap()
    }

    /// The global token offset of each shard's first token.
    fn starts(&self) -> Vec<u64> {
        self.index.shards.iter().scan(0, |at, s| Some(std::mem::replace(at, *at + s.tokens))).collect()
    }
}

/// Every token of the corpus, in one read (across every shard boundary).
fn read_all(shards: &TokenShards) -> Vec<i64> {
    let mut out = vec![0i64; shards.total_tokens() as usize];
    shards.read(0, &mut out).unwrap_or_else(|e| panic!("reading {}: {e}", shards.location));
    out
}

/// Asserts two token sequences are equal, naming the first difference (not printing tens of thousands of
/// tokens).
#[track_caller]
fn assert_same_tokens(got: &[i64], want: &[i64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at token {i}: {} vs {}", got[i], want[i]);
    }
}

/// The corpus's tokens decoded straight from the local shard files (u16, little-endian), independently of
/// `TokenShards`.
fn raw_tokens(dir: &Path, index: &ShardIndex) -> Vec<i64> {
    let mut out = vec![];
    for s in &index.shards {
        let bytes = std::fs::read(dir.join(&s.file)).unwrap();
        out.extend(bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as i64));
    }
    out
}

fn read(shards: &TokenShards, start: u64, len: usize) -> Result<Vec<i64>, DataError> {
    let mut out = vec![0i64; len];
    shards.read(start, &mut out).map(|()| out)
}

/// Bytes of every file in `dir` (the cache is flat).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The error of an operation that must fail (`TokenShards` is not `Debug`, so no `unwrap_err`).
fn error<T>(r: Result<T, DataError>, what: &str) -> DataError {
    match r {
        Ok(_) => panic!("{what} succeeded"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------------------
// The reader.

#[test]
fn remote_corpus_reads_the_same_tokens_as_the_local_copy() {
    let r = Remote::new(&[]);
    assert_eq!(ShardIndex::load_from(&r.url, &r.options).unwrap(), r.index);
    let local = r.local_shards();
    let remote = r.open(&r.cache_dir("cache"), u64::MAX);
    assert_eq!(remote.index, local.index);
    assert_eq!(remote.total_tokens(), local.total_tokens());

    // First touches of the remote shards are windows straddling each boundary, then around the ends; each is
    // compared with the local reader and with the shard files decoded directly.
    let raw = raw_tokens(&r.local, &r.index);
    let total = local.total_tokens();
    assert_eq!(raw.len() as u64, total);
    let mut windows: Vec<(u64, usize)> =
        r.starts()[1..].iter().map(|&b| (b - 100, 200.min((total - b + 100) as usize))).collect();
    windows.extend([(0, 65), (1, 64), (total - 65, 65), (total - 1, 1)]);
    for (start, len) in windows {
        let got = read(&remote, start, len).unwrap();
        assert_same_tokens(&got, &read(&local, start, len).unwrap(), &format!("window at {start}, vs local"));
        assert_same_tokens(&got, &raw[start as usize..start as usize + len], &format!("window at {start}, vs files"));
    }
    let all = read_all(&remote);
    assert_same_tokens(&all, &read_all(&local), "whole corpus, remote vs local");
    assert_same_tokens(&all, &raw_tokens(&r.local, &r.index), "whole corpus, remote vs the shard files");
    // Real text, not zeros: the byte tokenizer's stream is mostly printable ASCII.
    assert!(all.iter().filter(|&&t| (32..127).contains(&t)).count() > all.len() * 9 / 10);
}

#[test]
fn remote_shards_are_downloaded_once_and_then_served_from_the_cache() {
    let r = Remote::new(&[]);
    let want = read_all(&r.local_shards());
    let n = r.index.shards.len() as u64;
    let cache = r.cache_dir("cache");

    let remote = r.open(&cache, u64::MAX);
    assert_eq!(remote.downloads(), 0, "opening reads only the index");
    assert_same_tokens(&read_all(&remote), &want, "first pass");
    assert_same_tokens(&read_all(&remote), &want, "second pass");
    assert_eq!(remote.downloads(), n, "each shard is downloaded exactly once");
    for s in &r.index.shards {
        assert_eq!(std::fs::read(cache.join(&s.file)).unwrap(), std::fs::read(r.local.join(&s.file)).unwrap());
    }
    drop(remote);

    // A new reader on the same cache downloads nothing.
    let again = r.open(&cache, u64::MAX);
    assert_same_tokens(&read_all(&again), &want, "from the warm cache");
    assert_eq!(again.downloads(), 0, "a warm cache is reused");
    drop(again);

    // Cached files are verified, not trusted: a damaged one is fetched again, and only that one.
    let damaged = cache.join(&r.index.shards[1].file);
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&damaged, &bytes).unwrap();
    let third = r.open(&cache, u64::MAX);
    assert_same_tokens(&read_all(&third), &want, "after repairing the cache");
    assert_eq!(third.downloads(), 1, "only the damaged cached shard is fetched again");
    assert_eq!(std::fs::read(&damaged).unwrap(), std::fs::read(r.local.join(&r.index.shards[1].file)).unwrap());
}

#[test]
fn cache_stays_within_its_byte_budget() {
    let r = Remote::new(&[]);
    let local = r.local_shards();
    let n = r.index.shards.len() as u64;
    let cache = r.cache_dir("cache");
    let budget = 2 * SHARD_BYTES;
    let remote = r.open(&cache, budget);

    // Read the whole corpus in windows, checking the budget after every read.
    let total = local.total_tokens();
    let window = 3000u64;
    let mut start = 0;
    while start < total {
        let len = window.min(total - start) as usize;
        assert_eq!(read(&remote, start, len).unwrap(), read(&local, start, len).unwrap(), "window at {start}");
        let used = dir_bytes(&cache);
        assert!(
            used <= budget,
            "after the window at {start}, the cache holds {used} bytes > budget {budget}: {:?}",
            file_names(&cache)
        );
        start += window;
    }
    assert_eq!(remote.downloads(), n, "one sequential pass downloads each shard once");
    let kept = file_names(&cache);
    assert!(!kept.is_empty() && kept.len() <= 2, "cache holds {kept:?}");
    assert!(!kept.contains(&r.index.shards[0].file), "the first shard should have been evicted: {kept:?}");

    // The evicted first shard is downloaded again, and still reads correctly.
    assert_eq!(read(&remote, 10, 500).unwrap(), read(&local, 10, 500).unwrap());
    assert_eq!(remote.downloads(), n + 1, "an evicted shard is fetched again");
    assert!(dir_bytes(&cache) <= budget, "cache holds {:?}", file_names(&cache));

    // A budget smaller than one shard still keeps (and serves) the shard being read.
    let tiny_cache = r.cache_dir("tiny");
    let tiny = r.open(&tiny_cache, 1);
    assert_same_tokens(&read_all(&tiny), &read_all(&local), "through a one-shard cache");
    assert_eq!(file_names(&tiny_cache).len(), 1, "exactly one shard is kept: {:?}", file_names(&tiny_cache));
}

#[test]
fn corrupt_remote_shard_is_rejected_naming_it() {
    let r = Remote::new(&[]);
    let local = r.local_shards();
    let bad = &r.index.shards[2];
    let good_bytes = std::fs::read(r.local.join(&bad.file)).unwrap();
    let mut flipped = good_bytes.clone();
    flipped[1234] ^= 0x40;
    r.store.put(&bad.file, flipped.into()).unwrap();

    let cache = r.cache_dir("cache");
    let remote = r.open(&cache, u64::MAX);
    let at = r.starts()[2] + 10;
    // The shards around it are fine.
    assert_eq!(read(&remote, 0, 100).unwrap(), read(&local, 0, 100).unwrap());
    for attempt in 0..2 {
        match error(read(&remote, at, 100), "reading the corrupt shard") {
            DataError::CorruptShard { path, reason } => {
                let path = path.display().to_string();
                assert!(path.contains(&bad.file) && path.starts_with(&r.url), "attempt {attempt}: names {path}");
                assert!(reason.contains("checksum"), "attempt {attempt}: reason {reason}");
            }
            e => panic!("attempt {attempt}: expected CorruptShard, got {e}"),
        }
        // Not cached as a valid shard, so the next attempt checks the object again.
        assert!(!cache.join(&bad.file).exists(), "the corrupt shard was cached: {:?}", file_names(&cache));
    }
    let message = error(read(&remote, at, 100), "reading the corrupt shard").to_string();
    assert!(message.contains(&bad.file) && message.contains("checksum"), "{message}");

    // Once the object is repaired, the same reader reads it.
    r.store.put(&bad.file, good_bytes.clone().into()).unwrap();
    assert_eq!(read(&remote, at, 100).unwrap(), read(&local, at, 100).unwrap());
    assert_eq!(std::fs::read(cache.join(&bad.file)).unwrap(), good_bytes);
    assert_same_tokens(&read_all(&remote), &read_all(&local), "after the repair");
}

#[test]
fn missing_remote_shard_is_reported_naming_it() {
    let r = Remote::new(&["shard-00003.bin"]);
    assert_eq!(r.index.shards[3].file, "shard-00003.bin");
    let local = r.local_shards();
    let cache = r.cache_dir("cache");
    let remote = r.open(&cache, u64::MAX);
    assert_eq!(read(&remote, 0, 100).unwrap(), read(&local, 0, 100).unwrap());
    // A window that starts in shard 2 and runs into the missing shard 3.
    let at = r.starts()[3] - 50;
    match error(read(&remote, at, 100), "reading into the missing shard") {
        DataError::MissingShard { path } => {
            let path = path.display().to_string();
            assert_eq!(path, format!("{}/shard-00003.bin", r.url));
        }
        e => panic!("expected MissingShard, got {e}"),
    }
    assert!(!cache.join("shard-00003.bin").exists());
    // Shards after it are still readable.
    let after = r.starts()[4] + 5;
    assert_eq!(read(&remote, after, 100).unwrap(), read(&local, after, 100).unwrap());
}

#[test]
fn missing_remote_index_is_reported_as_no_corpus() {
    let r = Remote::new(&[]);
    let url = format!("s3://{BUCKET}/not-a-corpus");
    match error(ShardIndex::load_from(&url, &r.options), "loading a missing index") {
        DataError::MissingCorpus { dir } => assert_eq!(dir, PathBuf::from(&url)),
        e => panic!("expected MissingCorpus, got {e}"),
    }
    let cache = CacheOptions { dir: r.cache_dir("cache"), max_bytes: u64::MAX };
    match error(TokenShards::open_at(&url, &r.options, &cache), "opening a missing corpus") {
        DataError::MissingCorpus { dir } => assert_eq!(dir, PathBuf::from(&url)),
        e => panic!("expected MissingCorpus, got {e}"),
    }
    // The shards alone, without an index, are not a corpus either.
    let shards_only = format!("s3://{BUCKET}/shards-only");
    let store = Store::open(&shards_only, &r.options).unwrap();
    store.upload(&r.local.join(&r.index.shards[0].file), &r.index.shards[0].file).unwrap();
    assert!(matches!(ShardIndex::load_from(&shards_only, &r.options), Err(DataError::MissingCorpus { .. })));
    // Nor is a bucket that does not exist: named as such, not as a corpus to prepare.
    match error(ShardIndex::load_from("s3://no-such-bucket/corpus", &r.options), "a corpus in no bucket") {
        DataError::Storage(e @ StorageError::Refused { .. }) => {
            assert!(e.to_string().contains("the bucket does not exist: create it"), "{e}");
        }
        e => panic!("expected the bucket to be named missing, got {e}"),
    }
}

#[test]
fn unreachable_endpoint_is_a_clear_error_not_a_hang() {
    // A port nothing listens on: connections are refused, and the client retries, then gives up.
    let options = s3_options(&format!("http://127.0.0.1:{}", free_port()));
    let url = format!("s3://{BUCKET}/corpus");
    let cache = tempfile::tempdir().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (u, c) = (url.clone(), cache.path().to_path_buf());
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let r = TokenShards::open_at(&u, &options, &CacheOptions { dir: c, max_bytes: u64::MAX }).map(|_| ());
        let _ = tx.send(r);
    });
    // A hang guard, not a timing assertion.
    let result = rx.recv_timeout(Duration::from_secs(120)).expect("opening an unreachable store hung for 120 s");
    eprintln!("unreachable endpoint: gave up after {:.1} s", t0.elapsed().as_secs_f64());
    match error(result, "opening a store on a closed port") {
        // Unavailable (transient), not refused: a launch waits for such a store instead of counting crashes.
        DataError::Storage(StorageError::Unavailable { url: at, message }) => {
            assert_eq!(at, format!("{url}/index.json"));
            assert!(!message.is_empty());
            eprintln!("unreachable endpoint: {at}: {message}");
        }
        e => panic!("expected the store to be unavailable, got {e}"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Training.

/// A resolved `tiny` run on `data` (a directory or URL) with extra `[data]` lines (which may open further
/// `[data.*]` tables). One libtorch thread: the comparison is about the data, and multi-threaded CPU kernels
/// are not guaranteed to reduce in the same order from one run to the next.
fn run_config(data: &str, index: &ShardIndex, run_dir: &Path, data_extra: &str) -> RunConfig {
    let text = format!(
        "run_dir = {run:?}\nseed = 7\n[model]\npreset = \"tiny\"\n[data]\npath = {data:?}\neval_fraction = 0.05\n{data_extra}\n[train]\nsteps = 10\nbatch_size = 8\nmicro_batch = 4\nlr = 3e-3\nwarmup_steps = 3\nlog_every = 1\neval_every = 5\neval_batches = 2\nthreads = 1\n",
        run = run_dir.display().to_string(),
    );
    parse(&text, Path::new("test.toml"), &[])
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .resolve(index)
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn training_streams_a_remote_corpus() {
    let r = Remote::new(&[]);
    let local_run = r.tmp.path().join("local-run");
    let mut local = Trainer::new(run_config(&r.local.display().to_string(), &r.index, &local_run, "")).unwrap();
    local.run(TrainOptions { quiet: true }).unwrap();

    // The remote run caches about two shards, so it also evicts and refetches while it trains.
    let cache = r.cache_dir("cache");
    let budget = 2 * SHARD_BYTES;
    let mut extra = format!(
        "cache_dir = {:?}\ncache_gb = {}\n[data.storage_options]\n",
        cache.display().to_string(),
        budget as f64 / (1u64 << 30) as f64
    );
    for (k, v) in &r.options {
        extra += &format!("{k} = {v:?}\n");
    }
    let remote_index = ShardIndex::load_from(&r.url, &r.options).unwrap();
    let remote_run = r.tmp.path().join("remote-run");
    let cfg = run_config(&r.url, &remote_index, &remote_run, &extra);
    assert_eq!(cfg.cache_bytes, budget);
    assert_eq!(cfg.cache_dir, cache);
    let mut remote = Trainer::new(cfg).unwrap();
    let summary = remote.run(TrainOptions { quiet: true }).unwrap();
    assert_eq!(summary.steps, 10);

    // The remote trainer sees exactly the local trainer's samples...
    let (lset, rset) = (local.train_set(), remote.train_set());
    assert_eq!((rset.first, rset.len, rset.seq_len), (lset.first, lset.len, lset.seq_len));
    let ids: Vec<u64> = (0..lset.len).collect();
    for chunk in ids.chunks(64) {
        let (l, r) = (lset.host_batch(chunk).unwrap(), rset.host_batch(chunk).unwrap());
        assert!(l == r, "training samples {}..={} differ", chunk[0], chunk[chunk.len() - 1]);
    }
    // ...and so trains bit-identically.
    let want = losses(&local_run);
    assert_eq!(want.len(), 10);
    assert_eq!(losses(&remote_run), want, "the remote run's losses differ from the local run's");
    assert!(remote.model.params.flat.equal(&local.model.params.flat), "final weights differ");
    // It read through the cache, which stayed within budget.
    let cached = file_names(&cache);
    assert!(cached.iter().any(|f| f.starts_with("shard-")), "nothing was cached: {cached:?}");
    assert!(dir_bytes(&cache) <= budget, "cache holds {cached:?}");
}
