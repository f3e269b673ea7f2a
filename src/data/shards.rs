//! Token shards on disk: the index format, writing, and verified, memory-mapped reading.
//!
//! A prepared corpus is a directory holding `index.json` and `shard-NNNNN.bin` files. Each shard is the raw
//! little-endian token stream (`u16` when the vocabulary fits, else `u32`); concatenated in index order they
//! are the corpus, documents separated by the end-of-text token. The index records each shard's token count
//! and xxh3-64 checksum, so a truncated or corrupted shard is caught before training reads it.

use super::tokenizer::TokenizerKind;
use super::DataError;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
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
            return Err(DataError::MissingCorpus {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| DataError::BadIndex {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| DataError::BadIndex {
            path: path.clone(),
            reason,
        };
        if index.format != FORMAT {
            return Err(bad(format!(
                "format is {:?}, this Tessera reads {FORMAT:?}",
                index.format
            )));
        }
        if index.shards.iter().map(|s| s.tokens).sum::<u64>() != index.total_tokens {
            return Err(bad(
                "total_tokens is not the sum of the shards' tokens".into()
            ));
        }
        if index.dtype != TokenDtype::for_vocab(index.vocab_size) && index.dtype != TokenDtype::U32
        {
            return Err(bad(format!(
                "dtype {:?} cannot hold vocabulary {}",
                index.dtype, index.vocab_size
            )));
        }
        Ok(index)
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
        ShardWriter {
            dir: dir.to_path_buf(),
            dtype,
            shard_tokens: shard_tokens.max(1),
            current: None,
            done: vec![],
        }
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
            w.write_all(&buf)
                .map_err(|source| DataError::Io { path, source })?;
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
            let f = w.into_inner().map_err(|e| DataError::Io {
                path: path.clone(),
                source: e.into_error(),
            })?;
            f.sync_all()
                .map_err(|source| DataError::Io { path, source })?;
            self.done.push(ShardInfo {
                file,
                tokens: n,
                xxh3: format!("{:016x}", h.digest()),
            });
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

/// A prepared corpus opened for reading: every shard memory-mapped and verified against the index.
pub struct TokenShards {
    pub dir: PathBuf,
    pub index: ShardIndex,
    maps: Vec<memmap2::Mmap>,
    /// `starts[i]` is the global token offset of shard i; one extra entry holds the total.
    starts: Vec<u64>,
}

impl TokenShards {
    /// Opens `dir`, checking every shard's size and checksum.
    ///
    /// # Errors
    /// [`DataError::MissingShard`], [`DataError::CorruptShard`] (size or checksum), or index errors, each
    /// naming the file.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let index = ShardIndex::load(dir)?;
        let mut maps = Vec::with_capacity(index.shards.len());
        let mut starts = Vec::with_capacity(index.shards.len() + 1);
        let mut at = 0;
        for s in &index.shards {
            let path = dir.join(&s.file);
            let f = File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => DataError::MissingShard { path: path.clone() },
                _ => DataError::Io {
                    path: path.clone(),
                    source: e,
                },
            })?;
            // SAFETY: shards are written once and never modified in place; a concurrent truncation by another
            // program would be caught by the size check below for the bytes we read.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            let want = s.tokens * index.dtype.bytes() as u64;
            if map.len() as u64 != want {
                return Err(DataError::CorruptShard {
                    path,
                    reason: format!(
                        "{} bytes on disk, the index says {want} ({} tokens)",
                        map.len(),
                        s.tokens
                    ),
                });
            }
            let sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&map));
            if sum != s.xxh3 {
                return Err(DataError::CorruptShard {
                    path,
                    reason: format!("checksum {sum} does not match the index's {}", s.xxh3),
                });
            }
            starts.push(at);
            at += s.tokens;
            maps.push(map);
        }
        starts.push(at);
        Ok(TokenShards {
            dir: dir.to_path_buf(),
            index,
            maps,
            starts,
        })
    }

    pub fn total_tokens(&self) -> u64 {
        self.index.total_tokens
    }

    /// Which shard holds global token `pos`, and where in it: O(log shards).
    pub fn locate(&self, pos: u64) -> (usize, u64) {
        let shard = self.starts.partition_point(|&s| s <= pos) - 1;
        (shard, pos - self.starts[shard])
    }

    /// Copies tokens `[start, start + out.len())` of the concatenated corpus into `out`, across shard
    /// boundaries.
    ///
    /// # Panics
    /// If the range runs past the end of the corpus (callers derive ranges from `total_tokens`).
    pub fn read(&self, start: u64, out: &mut [i64]) {
        assert!(
            start + out.len() as u64 <= self.total_tokens(),
            "token range past the end of the corpus"
        );
        let mut filled = 0;
        while filled < out.len() {
            let (shard, off) = self.locate(start + filled as u64);
            let in_shard = (self.index.shards[shard].tokens - off) as usize;
            let n = in_shard.min(out.len() - filled);
            let bytes = &self.maps[shard];
            let w = self.index.dtype.bytes();
            for (k, o) in out[filled..filled + n].iter_mut().enumerate() {
                let b = (off as usize + k) * w;
                *o = match self.index.dtype {
                    TokenDtype::U16 => u16::from_le_bytes([bytes[b], bytes[b + 1]]) as i64,
                    TokenDtype::U32 => {
                        u32::from_le_bytes([bytes[b], bytes[b + 1], bytes[b + 2], bytes[b + 3]])
                            as i64
                    }
                };
            }
            filled += n;
        }
    }
}
