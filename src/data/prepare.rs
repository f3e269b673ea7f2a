//! `tessera data prepare`: text files, directories and JSON Lines in; token shards and an index out.
//!
//! Each text file is one document; each line of a `.jsonl` file is one document (its `text` field). The
//! documents are tokenized in a deterministic order (inputs as given, directory entries sorted by name) and
//! concatenated with the end-of-text token after each one. Bad input stops the run with an error that names
//! the file and line, or with `skip_bad` is skipped and recorded in the index.

use super::shards::{ShardIndex, ShardWriter, SkippedInput, TokenDtype, FORMAT, INDEX_FILE};
use super::tokenizer::{EncodeError, Tokenizer, TokenizerKind};
use super::DataError;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What to prepare and how.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub tokenizer: TokenizerKind,
    /// Tokens per shard file (the last may hold fewer).
    pub shard_tokens: u64,
    /// Skip (and record) bad files and lines instead of stopping.
    pub skip_bad: bool,
    /// When set, only files with one of these extensions are taken from directories (files named
    /// explicitly are always taken).
    pub extensions: Option<Vec<String>>,
    /// Replace an existing prepared corpus in `out`.
    pub force: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Sixty-four million tokens: 128 MiB shards at u16, large enough to stream efficiently, small enough to
/// cache a few locally.
pub const DEFAULT_SHARD_TOKENS: u64 = 64 << 20;

/// The input files, in the order they will be read.
///
/// The output directory is never read, even when it lies inside an input directory.
fn collect_files(opts: &PrepareOptions) -> Result<Vec<PathBuf>, DataError> {
    let out = opts.out.canonicalize().ok();
    let mut files = vec![];
    for input in &opts.inputs {
        let meta = std::fs::metadata(input).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::MissingInput { path: input.clone() },
            _ => DataError::Io { path: input.clone(), source: e },
        })?;
        if meta.is_dir() {
            for entry in walkdir::WalkDir::new(input)
                .follow_links(true)
                .sort_by_file_name()
                .into_iter()
                .filter_entry(|e| out.is_none() || e.path().canonicalize().ok() != out)
            {
                let entry = entry.map_err(|e| DataError::Io {
                    path: e.path().map(Path::to_path_buf).unwrap_or_else(|| input.clone()),
                    source: e.into_io_error().unwrap_or_else(|| std::io::Error::other("directory loop")),
                })?;
                if !entry.file_type().is_file() {
                    continue;
                }
                let keep = match &opts.extensions {
                    None => true,
                    Some(exts) => entry
                        .path()
                        .extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| exts.iter().any(|x| x.trim_start_matches('.') == e)),
                };
                if keep {
                    files.push(entry.into_path());
                }
            }
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn is_jsonl(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("jsonl")
}

/// 1-based line of byte offset `at`.
fn line_of(bytes: &[u8], at: usize) -> u64 {
    bytes[..at.min(bytes.len())].iter().filter(|&&b| b == b'\n').count() as u64 + 1
}

/// Runs the preparation and returns the index it wrote.
///
/// # Errors
/// Every [`DataError`] input variant, naming the file (and line); I/O errors on the output; and
/// [`DataError::EmptyCorpus`] when no document had any tokens.
pub fn prepare(opts: &PrepareOptions) -> Result<ShardIndex, DataError> {
    let out = &opts.out;
    let index_path = out.join(INDEX_FILE);
    if index_path.exists() && !opts.force {
        return Err(DataError::OutputExists { dir: out.clone() });
    }
    std::fs::create_dir_all(out).map_err(|source| DataError::Io { path: out.clone(), source })?;
    let files = collect_files(opts)?;
    // Shards are written to a staging directory and only replace an existing corpus once every input has
    // been read, so a failed run (even with --force) leaves the previous corpus as it was.
    let staging = Staging::new(out.join(format!(".staging-{}", std::process::id())))?;

    let tok = Tokenizer::new(opts.tokenizer);
    let dtype = TokenDtype::for_vocab(tok.vocab_size());
    let mut sink = Sink {
        writer: ShardWriter::new(&staging.0, dtype, opts.shard_tokens),
        eot: tok.eot(),
        documents: 0,
        tokens: 0,
    };
    let mut skipped = vec![];

    let total_bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    let bar = if opts.progress { ProgressBar::new(total_bytes) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {bar:30} {msg} ({eta})").expect("valid template"),
    );

    for file in &files {
        let bytes = std::fs::read(file).map_err(|source| DataError::Io { path: file.clone(), source })?;
        bar.inc(bytes.len() as u64);
        bar.set_message(format!("{} docs", sink.documents));
        // A bad input either stops the run or is recorded and skipped.
        let reject = |err: DataError, skipped: &mut Vec<SkippedInput>| -> Result<(), DataError> {
            if !opts.skip_bad {
                return Err(err);
            }
            let line = match &err {
                DataError::InvalidUtf8 { line, .. }
                | DataError::MalformedJsonLine { line, .. }
                | DataError::NotText { line, .. } => Some(*line),
                _ => None,
            };
            skipped.push(SkippedInput { path: file.display().to_string(), line, reason: err.to_string() });
            Ok(())
        };
        if is_jsonl(file) {
            for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
                let line = i as u64 + 1;
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                if raw.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let text = match parse_json_line(file, line, raw) {
                    Ok(t) => t,
                    Err(e) => {
                        reject(e, &mut skipped)?;
                        continue;
                    }
                };
                match tok.encode(&text) {
                    Ok(t) => sink.document(&t)?,
                    Err(EncodeError::ContainsNul { .. }) => {
                        reject(DataError::NotText { path: file.clone(), line }, &mut skipped)?
                    }
                }
            }
        } else {
            let text = match std::str::from_utf8(&bytes) {
                Ok(t) => t,
                Err(e) => {
                    let line = line_of(&bytes, e.valid_up_to());
                    reject(DataError::InvalidUtf8 { path: file.clone(), line }, &mut skipped)?;
                    continue;
                }
            };
            match tok.encode(text) {
                Ok(t) => sink.document(&t)?,
                Err(EncodeError::ContainsNul { byte_offset }) => {
                    reject(DataError::NotText { path: file.clone(), line: line_of(&bytes, byte_offset) }, &mut skipped)?
                }
            }
        }
    }
    bar.finish_and_clear();
    let Sink { writer, documents, tokens: total, .. } = sink;
    let shards = writer.finish()?;
    if total == 0 {
        return Err(DataError::EmptyCorpus { inputs: opts.inputs.clone(), files: files.len(), skipped: skipped.len() });
    }
    let index = ShardIndex {
        format: FORMAT.into(),
        tokenizer: opts.tokenizer,
        vocab_size: tok.vocab_size(),
        eot_token: tok.eot(),
        dtype,
        total_tokens: total,
        documents,
        shards,
        skipped,
    };
    remove_prepared(out)?;
    for shard in &index.shards {
        let (from, to) = (staging.0.join(&shard.file), out.join(&shard.file));
        std::fs::rename(&from, &to).map_err(|source| DataError::Io { path: to, source })?;
    }
    write_index(out, &index)?;
    Ok(index)
}

/// A scratch directory removed when dropped (on success it is empty by then).
struct Staging(PathBuf);

impl Staging {
    fn new(dir: PathBuf) -> Result<Self, DataError> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| DataError::Io { path: dir.clone(), source })?;
        Ok(Staging(dir))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where tokenized documents go: each is followed by end-of-text.
struct Sink {
    writer: ShardWriter,
    eot: u32,
    documents: u64,
    tokens: u64,
}

impl Sink {
    fn document(&mut self, tokens: &[u32]) -> Result<(), DataError> {
        if tokens.is_empty() {
            return Ok(());
        }
        self.writer.write(tokens)?;
        self.writer.write(&[self.eot])?;
        self.documents += 1;
        self.tokens += tokens.len() as u64 + 1;
        Ok(())
    }
}

fn parse_json_line(path: &Path, line: u64, raw: &[u8]) -> Result<String, DataError> {
    let text = std::str::from_utf8(raw).map_err(|_| DataError::InvalidUtf8 { path: path.to_path_buf(), line })?;
    let bad = |reason: String| DataError::MalformedJsonLine { path: path.to_path_buf(), line, reason };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    match value.get("text") {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(bad(format!("field \"text\" is {}, expected a string", json_kind(other)))),
        None => Err(bad("no \"text\" field (each line must be an object like {\"text\": \"...\"})".into())),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Removes a previous corpus's index and shards (and nothing else) from `dir`.
fn remove_prepared(dir: &Path) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.to_path_buf(), source })?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == INDEX_FILE || (name.starts_with("shard-") && name.ends_with(".bin")) {
            std::fs::remove_file(e.path()).map_err(|source| DataError::Io { path: e.path(), source })?;
        }
    }
    Ok(())
}

/// Writes the index last and atomically (temp file, fsync, rename, fsync the directory), so a directory with
/// an `index.json` always holds a complete corpus.
fn write_index(dir: &Path, index: &ShardIndex) -> Result<(), DataError> {
    let tmp = dir.join(".index.json.tmp");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Io { path, source }
    };
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(serde_json::to_string_pretty(index).expect("index serializes").as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, dir.join(INDEX_FILE)).map_err(io(dir))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(())
}
