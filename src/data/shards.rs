//! Token shards on disk: the index format, writing, and verified, memory-mapped reading.
//!
//! A prepared corpus is a directory holding `index.json` and `shard-NNNNN.bin` files. Each shard is the raw
//! little-endian token stream (`u16` when the vocabulary fits, else `u32`); concatenated in index order they
//! are the corpus, documents separated by the end-of-text token. The index records each shard's token count
//! and xxh3-64 checksum, so a truncated or corrupted shard is caught before training reads it.
//!
//! **What is checked when.** Opening a corpus costs O(shards) metadata calls, never O(bytes), so a restart
//! does not slow down as the corpus grows: a local corpus checks at open that every shard exists and has the
//! size the index gives (a missing or truncated shard fails the open); a remote one reads only its index.
//! The checksum, which must read every byte, is checked on a shard's first touch, before any of its tokens are
//! returned: a local shard is mapped and hashed then, a remote one when it is fetched into the cache (or found
//! there). A shard that fails is never used; the read that touched it fails naming it.

use super::tokenizer::TokenizerKind;
use super::DataError;
use crate::storage::Store;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use xxhash_rust::xxh3::Xxh3;

/// Identifies the format, so a future change is detected rather than misread.
pub const FORMAT: &str = "tessera-tokens-v1";
pub const INDEX_FILE: &str = "index.json";

/// Width of one stored token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// The narrowest type that holds every id of a vocabulary this size.
    pub fn for_vocab(vocab_size: u32) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// One shard's entry in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name, relative to the corpus directory.
    pub file: String,
    pub tokens: u64,
    /// xxh3-64 of the file's bytes, as 16 hex digits.
    pub xxh3: String,
}

/// An input that `--skip-bad` skipped, recorded so nothing is dropped silently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedInput {
    pub path: String,
    /// 1-based line for JSON Lines and text errors, when known.
    pub line: Option<u64>,
    pub reason: String,
}

/// `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardIndex {
    pub format: String,
    pub tokenizer: TokenizerKind,
    pub vocab_size: u32,
    pub eot_token: u32,
    pub dtype: TokenDtype,
    pub total_tokens: u64,
    pub documents: u64,
    pub shards: Vec<ShardInfo>,
    #[serde(default)]
    pub skipped: Vec<SkippedInput>,
}

impl ShardIndex {
    /// Reads and checks `DIR/index.json`.
    ///
    /// # Errors
    /// [`DataError::MissingCorpus`] when there is no index, [`DataError::BadIndex`] when it does not parse or
    /// does not add up.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join(INDEX_FILE);
        if !path.exists() {
            return Err(DataError::MissingCorpus { dir: dir.to_path_buf() });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Reads and checks the index of a corpus given as a local directory or an object-store URL.
    ///
    /// # Errors
    /// As [`ShardIndex::load`], plus [`DataError::Storage`] for a remote corpus that cannot be read.
    pub fn load_from(location: &str, storage_options: &[(String, String)]) -> Result<Self, DataError> {
        if !crate::storage::is_url(location) {
            return Self::load(Path::new(location));
        }
        let store = crate::storage::Store::open(location, storage_options)?;
        let bytes = store.get(INDEX_FILE).map_err(|e| match e {
            crate::storage::StorageError::NotFound { .. } => DataError::MissingCorpus { dir: location.into() },
            e => e.into(),
        })?;
        let text = String::from_utf8(bytes.to_vec()).map_err(|_| DataError::BadIndex {
            path: format!("{location}/{INDEX_FILE}").into(),
            reason: "not UTF-8".into(),
        })?;
        Self::parse(&text, &format!("{}/{INDEX_FILE}", location.trim_end_matches('/')))
    }

    /// Parses and checks index text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`DataError::BadIndex`].
    pub fn parse(text: &str, origin: &str) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::BadIndex { path: origin.into(), reason };
        let index: ShardIndex = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if index.format != FORMAT {
            return Err(bad(format!("format is {:?}, this Tessera reads {FORMAT:?}", index.format)));
        }
        let mut total = 0u64;
        for s in &index.shards {
            // Checked here once, so that sizes computed from these counts later cannot overflow.
            let fits = s.tokens.checked_mul(index.dtype.bytes() as u64).is_some();
            total = total
                .checked_add(s.tokens)
                .filter(|_| fits)
                .ok_or_else(|| bad(format!("shard {} claims {} tokens, more than any file holds", s.file, s.tokens)))?;
        }
        if total != index.total_tokens {
            return Err(bad("total_tokens is not the sum of the shards' tokens".into()));
        }
        if index.dtype != TokenDtype::for_vocab(index.vocab_size) && index.dtype != TokenDtype::U32 {
            return Err(bad(format!("dtype {:?} cannot hold vocabulary {}", index.dtype, index.vocab_size)));
        }
        if index.shards.iter().any(|s| s.file.contains('/') || s.file.starts_with('.')) {
            return Err(bad("a shard file name contains a path; shards must sit beside the index".into()));
        }
        if index.vocab_size == 0 {
            return Err(bad("vocab_size is 0".into()));
        }
        if index.eot_token >= index.vocab_size {
            return Err(bad(format!(
                "eot_token {} is outside the vocabulary of {}",
                index.eot_token, index.vocab_size
            )));
        }
        Ok(index)
    }

    /// A fingerprint of the corpus: its shards' names, sizes and checksums, hashed (16 hex digits). A
    /// checkpoint records it, so that a run resumes only on the data it was trained on.
    pub fn digest(&self) -> String {
        let mut h = Xxh3::new();
        for s in &self.shards {
            h.update(format!("{}:{}:{};", s.file, s.tokens, s.xxh3).as_bytes());
        }
        format!("{:016x}", h.digest())
    }
}

/// Streams tokens into size-bounded shards, checksumming as it goes.
pub struct ShardWriter {
    dir: PathBuf,
    dtype: TokenDtype,
    shard_tokens: u64,
    current: Option<(BufWriter<File>, Xxh3, u64)>,
    done: Vec<ShardInfo>,
}

impl ShardWriter {
    /// Writes into `dir` (which must exist), starting a new shard every `shard_tokens` tokens.
    pub fn new(dir: &Path, dtype: TokenDtype, shard_tokens: u64) -> Self {
        ShardWriter { dir: dir.to_path_buf(), dtype, shard_tokens: shard_tokens.max(1), current: None, done: vec![] }
    }

    fn shard_name(i: usize) -> String {
        format!("shard-{i:05}.bin")
    }

    /// Appends tokens, rolling over to new shards as they fill.
    ///
    /// # Errors
    /// I/O errors, naming the shard.
    pub fn write(&mut self, mut tokens: &[u32]) -> Result<(), DataError> {
        while !tokens.is_empty() {
            if self.current.is_none() {
                let path = self.dir.join(Self::shard_name(self.done.len()));
                let f = File::create(&path).map_err(|source| DataError::Io { path, source })?;
                self.current = Some((BufWriter::with_capacity(1 << 20, f), Xxh3::new(), 0));
            }
            let (w, h, n) = self.current.as_mut().unwrap();
            let take = ((self.shard_tokens - *n) as usize).min(tokens.len());
            let mut buf = Vec::with_capacity(take * self.dtype.bytes());
            for &t in &tokens[..take] {
                match self.dtype {
                    TokenDtype::U16 => buf.extend_from_slice(&(t as u16).to_le_bytes()),
                    TokenDtype::U32 => buf.extend_from_slice(&t.to_le_bytes()),
                }
            }
            h.update(&buf);
            let path = self.dir.join(Self::shard_name(self.done.len()));
            w.write_all(&buf).map_err(|source| DataError::Io { path, source })?;
            *n += take as u64;
            tokens = &tokens[take..];
            if *n == self.shard_tokens {
                self.finish_shard()?;
            }
        }
        Ok(())
    }

    fn finish_shard(&mut self) -> Result<(), DataError> {
        if let Some((w, h, n)) = self.current.take() {
            let file = Self::shard_name(self.done.len());
            let path = self.dir.join(&file);
            let f = w.into_inner().map_err(|e| DataError::Io { path: path.clone(), source: e.into_error() })?;
            f.sync_all().map_err(|source| DataError::Io { path, source })?;
            self.done.push(ShardInfo { file, tokens: n, xxh3: format!("{:016x}", h.digest()) });
        }
        Ok(())
    }

    /// Closes (and fsyncs) the last shard and returns every shard's entry.
    ///
    /// # Errors
    /// I/O errors, naming the shard.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>, DataError> {
        self.finish_shard()?;
        Ok(self.done)
    }
}

/// A prepared corpus opened for reading, from a local directory (memory-mapped in place) or an object store
/// (shards downloaded on first use into a bounded local cache). Every shard's size and checksum are checked
/// against the index before its tokens are used, lazily, on the shard's first touch (see the module doc for
/// what opening checks). A reader may be shared between threads (the prefetcher reads on its own).
pub struct TokenShards {
    /// Where the corpus lives, as given.
    pub location: String,
    pub index: ShardIndex,
    source: Source,
    /// `starts[i]` is the global token offset of shard i; one extra entry holds the total.
    starts: Vec<u64>,
    /// Mapped and verified shards; `None` until first use, and again after eviction from a remote cache. A
    /// mapping is only ever stored here after its checksum matched, so a `Some` is safe to read.
    maps: Mutex<Vec<Option<Arc<memmap2::Mmap>>>>,
    /// Held while mapping, verifying (and, if remote, fetching) a shard, so two threads never hash or
    /// download the same shard at once; `maps` is checked again under it. Always taken before `maps`, never
    /// while holding it, so the two cannot deadlock.
    load: Mutex<()>,
    /// Shard downloads so far (a cache hit is not a download).
    downloads: AtomicU64,
    /// Shards whose checksum has been verified so far (a shard evicted from a remote cache and fetched again
    /// counts again).
    verified: AtomicU64,
}

enum Source {
    Local { dir: PathBuf },
    Remote { store: Store, cache: ShardCache },
}

/// A directory of downloaded shards, kept under a byte budget by evicting the least recently fetched.
struct ShardCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Cached shard indices, least recently fetched first.
    lru: Mutex<Vec<usize>>,
}

/// Makes download temporaries unique within the process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A download in progress: removed unless renamed into place.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Checks a shard's length in bytes against its index entry: the cheap check, done at open for local shards.
fn check_size(path: &Path, len: u64, info: &ShardInfo, dtype: TokenDtype) -> Result<(), DataError> {
    let want = info.tokens * dtype.bytes() as u64;
    if len != want {
        return Err(DataError::CorruptShard {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, the index says {want} ({} tokens)", info.tokens),
        });
    }
    Ok(())
}

/// Checks a mapped shard against its index entry: its size, the checksum of every byte, then that every
/// token is inside the vocabulary (an index written for other shards would otherwise reach the model's
/// embedding as an index out of range).
fn verify(path: &Path, map: &[u8], info: &ShardInfo, dtype: TokenDtype, vocab: u32) -> Result<(), DataError> {
    check_size(path, map.len() as u64, info, dtype)?;
    let sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(map));
    if sum != info.xxh3 {
        return Err(DataError::CorruptShard {
            path: path.to_path_buf(),
            reason: format!("checksum {sum} does not match the index's {}", info.xxh3),
        });
    }
    let w = dtype.bytes();
    let token = |b: &[u8]| match dtype {
        TokenDtype::U16 => u16::from_le_bytes([b[0], b[1]]) as u32,
        TokenDtype::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    };
    if let Some((at, t)) = map.chunks_exact(w).map(token).enumerate().find(|&(_, t)| t >= vocab) {
        return Err(DataError::CorruptShard {
            path: path.to_path_buf(),
            reason: format!(
                "token {at} is {t}, outside the vocabulary of {vocab} that index.json declares (an index written \
                 for other shards?)"
            ),
        });
    }
    Ok(())
}

/// A shard file's I/O error: [`DataError::MissingShard`] when it does not exist.
fn shard_io_error(path: &Path, e: std::io::Error) -> DataError {
    match e.kind() {
        std::io::ErrorKind::NotFound => DataError::MissingShard { path: path.to_path_buf() },
        _ => DataError::Io { path: path.to_path_buf(), source: e },
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap, DataError> {
    let f = File::open(path).map_err(|e| shard_io_error(path, e))?;
    // SAFETY: shards are written once and never modified in place; each mapping is verified against the
    // index's checksum before use.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|source| DataError::Io { path: path.to_path_buf(), source })
}

/// Where [`TokenShards::open_at`] keeps downloaded shards of a remote corpus.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub dir: PathBuf,
    /// Budget in bytes; at least one shard is always kept.
    pub max_bytes: u64,
}

impl TokenShards {
    /// Opens a local corpus directory. Every shard's existence and size are checked now, from file metadata
    /// (O(shards), reading no shard's bytes); each shard is mapped and its checksum verified on first touch,
    /// by [`TokenShards::read`].
    ///
    /// # Errors
    /// [`DataError::MissingShard`], [`DataError::CorruptShard`] (size), or index errors, each naming the
    /// file. A checksum mismatch is reported by the first read that touches the shard.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let index = ShardIndex::load(dir)?;
        for s in &index.shards {
            let path = dir.join(&s.file);
            let meta = std::fs::metadata(&path).map_err(|e| shard_io_error(&path, e))?;
            check_size(&path, meta.len(), s, index.dtype)?;
        }
        let maps = vec![None; index.shards.len()];
        Ok(Self::assemble(dir.display().to_string(), index, Source::Local { dir: dir.to_path_buf() }, maps))
    }

    /// Opens a corpus given as a local directory or an object-store URL. A remote corpus's index is read
    /// now; its shards are downloaded (and verified) on first touch into `cache`.
    ///
    /// # Errors
    /// As [`TokenShards::open`], plus [`DataError::Storage`] when the store cannot be reached.
    pub fn open_at(
        location: &str,
        storage_options: &[(String, String)],
        cache: &CacheOptions,
    ) -> Result<Self, DataError> {
        if !crate::storage::is_url(location) {
            return Self::open(Path::new(location));
        }
        let index = ShardIndex::load_from(location, storage_options)?;
        let store = Store::open(location, storage_options)?;
        std::fs::create_dir_all(&cache.dir).map_err(|source| DataError::Io { path: cache.dir.clone(), source })?;
        let maps = vec![None; index.shards.len()];
        // Shards already in the cache directory (from an earlier run or another rank on this host) count
        // towards the budget, oldest first; downloads that never finished are removed.
        let mut present: Vec<(std::time::SystemTime, usize)> = vec![];
        for e in
            std::fs::read_dir(&cache.dir).map_err(|source| DataError::Io { path: cache.dir.clone(), source })?.flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".part-") {
                // Only a download whose process is gone is stale; another rank may be mid-download.
                let pid = name.rsplit(".part-").next().and_then(|r| r.split('-').next()).unwrap_or("");
                if !Path::new("/proc").join(pid).exists() || pid.is_empty() {
                    let _ = std::fs::remove_file(e.path());
                }
            } else if let Some(i) = index.shards.iter().position(|s| s.file == name) {
                let when = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                present.push((when, i));
            }
        }
        present.sort();
        let lru = present.into_iter().map(|(_, i)| i).collect();
        let cache = ShardCache { dir: cache.dir.clone(), max_bytes: cache.max_bytes, lru: Mutex::new(lru) };
        Ok(Self::assemble(location.into(), index, Source::Remote { store, cache }, maps))
    }

    fn assemble(location: String, index: ShardIndex, source: Source, maps: Vec<Option<Arc<memmap2::Mmap>>>) -> Self {
        let mut starts = Vec::with_capacity(index.shards.len() + 1);
        let mut at = 0;
        for s in &index.shards {
            starts.push(at);
            at += s.tokens;
        }
        starts.push(at);
        TokenShards {
            location,
            index,
            source,
            starts,
            maps: Mutex::new(maps),
            load: Mutex::new(()),
            downloads: AtomicU64::new(0),
            verified: AtomicU64::new(0),
        }
    }

    pub fn total_tokens(&self) -> u64 {
        self.index.total_tokens
    }

    /// Shards downloaded from the object store so far.
    pub fn downloads(&self) -> u64 {
        self.downloads.load(Ordering::Relaxed)
    }

    /// Shards whose checksum has been verified so far: 0 right after opening, then one per shard on its
    /// first touch (and again for a remote shard fetched again after eviction).
    pub fn verified(&self) -> u64 {
        self.verified.load(Ordering::Relaxed)
    }

    /// Which shard holds global token `pos`, and where in it: O(log shards).
    pub fn locate(&self, pos: u64) -> (usize, u64) {
        let shard = self.starts.partition_point(|&s| s <= pos) - 1;
        (shard, pos - self.starts[shard])
    }

    /// The verified mapping of shard `i`. On its first touch a local shard is mapped and its checksum
    /// verified; a remote one is fetched into the cache (unless a verified copy is there) and verified.
    fn shard(&self, i: usize) -> Result<Arc<memmap2::Mmap>, DataError> {
        if let Some(m) = &self.maps.lock().expect("shard map lock")[i] {
            return Ok(m.clone());
        }
        // One load at a time per reader; another thread may have loaded this shard while we waited.
        let _loading = self.load.lock().expect("shard load lock");
        if let Some(m) = &self.maps.lock().expect("shard map lock")[i] {
            return Ok(m.clone());
        }
        let info = &self.index.shards[i];
        let (store, cache) = match &self.source {
            Source::Local { dir } => {
                let path = dir.join(&info.file);
                let map = map_file(&path)?;
                verify(&path, &map, info, self.index.dtype, self.index.vocab_size)?;
                self.verified.fetch_add(1, Ordering::Relaxed);
                let map = Arc::new(map);
                self.maps.lock().expect("shard map lock")[i] = Some(map.clone());
                return Ok(map);
            }
            Source::Remote { store, cache } => (store, cache),
        };
        let path = cache.dir.join(&info.file);
        // A cached copy is reused if it verifies; a missing one (perhaps evicted by another process sharing the
        // cache) or a bad one is fetched again.
        let cached = match map_file(&path) {
            Ok(m) => Some(m),
            Err(DataError::MissingShard { .. }) => None,
            Err(e) => return Err(e),
        };
        let map = match cached {
            Some(m) if verify(&path, &m, info, self.index.dtype, self.index.vocab_size).is_ok() => m,
            _ => {
                let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
                let tmp = TempFile(cache.dir.join(format!(".{}.part-{}-{n}", info.file, std::process::id())));
                store.download(&info.file, &tmp.0).map_err(|e| match e {
                    crate::storage::StorageError::NotFound { url } => DataError::MissingShard { path: url.into() },
                    e => e.into(),
                })?;
                self.downloads.fetch_add(1, Ordering::Relaxed);
                let m = map_file(&tmp.0)?;
                let url = format!("{}/{}", self.location.trim_end_matches('/'), info.file);
                verify(Path::new(&url), &m, info, self.index.dtype, self.index.vocab_size)?;
                std::fs::rename(&tmp.0, &path).map_err(|source| DataError::Io { path: path.clone(), source })?;
                m
            }
        };
        self.verified.fetch_add(1, Ordering::Relaxed);
        let map = Arc::new(map);
        let mut maps = self.maps.lock().expect("shard map lock");
        maps[i] = Some(map.clone());
        // Keep the cache under budget: evict the least recently fetched shards other than this one. A reader
        // still holding an evicted mapping keeps it valid (unlinking does not unmap).
        let mut lru = cache.lru.lock().expect("cache lock");
        lru.retain(|&j| j != i);
        lru.push(i);
        let size = |j: usize| self.index.shards[j].tokens * self.index.dtype.bytes() as u64;
        let mut used: u64 = lru.iter().map(|&j| size(j)).sum();
        while used > cache.max_bytes && lru.len() > 1 {
            let j = lru.remove(0);
            used -= size(j);
            maps[j] = None;
            let _ = std::fs::remove_file(cache.dir.join(&self.index.shards[j].file));
        }
        Ok(map)
    }

    /// Copies tokens `[start, start + out.len())` of the concatenated corpus into `out`, across shard
    /// boundaries.
    ///
    /// # Errors
    /// A shard first touched by this read that is missing, fails verification ([`DataError::CorruptShard`],
    /// naming it, before any of its tokens are copied), or, if remote, cannot be fetched.
    ///
    /// # Panics
    /// If the range runs past the end of the corpus (callers derive ranges from `total_tokens`).
    pub fn read(&self, start: u64, out: &mut [i64]) -> Result<(), DataError> {
        assert!(start + out.len() as u64 <= self.total_tokens(), "token range past the end of the corpus");
        let w = self.index.dtype.bytes();
        let mut filled = 0;
        while filled < out.len() {
            let (shard, off) = self.locate(start + filled as u64);
            let in_shard = (self.index.shards[shard].tokens - off) as usize;
            let n = in_shard.min(out.len() - filled);
            let map = self.shard(shard)?;
            let bytes = &map[off as usize * w..(off as usize + n) * w];
            for (o, b) in out[filled..filled + n].iter_mut().zip(bytes.chunks_exact(w)) {
                *o = match self.index.dtype {
                    TokenDtype::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
                    TokenDtype::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
                };
            }
            filled += n;
        }
        Ok(())
    }
}
