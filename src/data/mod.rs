//! Data: tokenizers, corpus preparation into token shards, the deterministic sample order and the loader.

pub mod loader;
pub mod order;
pub mod prefetch;
pub mod prepare;
pub mod shards;
pub mod stream;
pub mod tokenizer;

pub use loader::{Batch, HostBatch, SampleSet};
pub use order::SampleOrder;
pub use prefetch::{Prefetcher, StepData, StepShape};
pub use prepare::{prepare, PrepareOptions};
pub use shards::{CacheOptions, ShardIndex, TokenShards};
pub use stream::{DataState, Layer, LayerError};
pub use tokenizer::{Tokenizer, TokenizerKind};

use std::path::PathBuf;

/// Errors from preparing or reading a corpus. None is recovered automatically: each names the file (and the
/// line, for input text) so the user can fix it, or rerun `data prepare` with `--skip-bad` for input errors.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("input {path} does not exist")]
    MissingInput { path: PathBuf },
    #[error("{path}:{line}: not valid UTF-8 text")]
    InvalidUtf8 { path: PathBuf, line: u64 },
    #[error("{path}:{line}: contains a NUL byte, so it is binary data, not text")]
    NotText { path: PathBuf, line: u64 },
    #[error("{path}:{line}: malformed JSON line: {reason}")]
    MalformedJsonLine { path: PathBuf, line: u64, reason: String },
    #[error("no text found in {inputs:?} ({files} file(s) read, {skipped} skipped): nothing to train on")]
    EmptyCorpus { inputs: Vec<PathBuf>, files: usize, skipped: usize },
    #[error("{dir} already holds a prepared corpus; pass --force to replace it or choose another --out")]
    OutputExists { dir: PathBuf },
    #[error("no prepared corpus at {dir} (no index.json); create one with `tessera data prepare --out {dir}`")]
    MissingCorpus { dir: PathBuf },
    #[error("corpus index {path} is invalid: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("token shard {path} is missing; re-run `tessera data prepare` or restore the file")]
    MissingShard { path: PathBuf },
    #[error("token shard {path} is corrupt: {reason}; re-run `tessera data prepare` or restore the file")]
    CorruptShard { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the corpus has {tokens} tokens, too few for one sample of {seq_len} + 1 tokens{hint}")]
    TooSmall { tokens: u64, seq_len: i64, hint: String },
    #[error("the data prefetcher stopped before the run's last step")]
    PrefetchEnded,
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

impl DataError {
    /// Whether `data prepare --skip-bad` would skip the input this error is about (and record it in the index)
    /// instead of stopping.
    pub fn skippable(&self) -> bool {
        matches!(self, DataError::InvalidUtf8 { .. } | DataError::NotText { .. } | DataError::MalformedJsonLine { .. })
    }
}
