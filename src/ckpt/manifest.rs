//! The checkpoint manifest and the names a checkpoint directory uses. Pure: no I/O.
//!
//! A manifest is `manifest.json` inside a checkpoint directory, written last by the coordinator once every
//! rank has acknowledged its shards (see [`super`] for the protocol). It says what the checkpoint is (step,
//! tokens seen, the world and ZeRO stage that wrote it, the config it belongs to), carries the state of the
//! layers above training (the data loader's, the spike detector's) as free-form JSON, and lists every other
//! file of the checkpoint with its size and xxh3-64, so a load can tell a whole checkpoint from a torn or
//! corrupted one before using a byte of it.
//!
//! Names: checkpoint directories are `step-000001234` ([`checkpoint_name`]), directories being written are
//! `step-000001234.staging-<nonce>` ([`staging_name`]), and the `latest` pointer file holds one checkpoint name
//! and a newline ([`format_latest`]). Every parser here accepts only the canonical form its formatter writes,
//! so a torn or hand-mangled name is rejected rather than read as a different step.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::fmt;

/// The manifest format this Tessera writes and reads. A change that older readers would misread gets a new
/// string; a reader refuses formats it does not know rather than guessing.
pub const FORMAT: &str = "tessera-ckpt-1";

/// The manifest's file name inside a checkpoint directory. It cannot list itself.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The pointer file, beside the checkpoint directories, naming the checkpoint to resume from.
pub const LATEST: &str = "latest";

/// Why a manifest, a checkpoint file or the `latest` pointer cannot be trusted.
///
/// Every variant means the checkpoint is corrupt (torn write, bit rot, a file overwritten) or incompatible
/// (written by another format version). None is fatal to a run: the loader recovers by falling back to the
/// previous committed checkpoint, and only when none verifies does the run fail (or start fresh, if asked to).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    /// The text is not JSON at all, typically a truncated write.
    #[error("the manifest is not valid JSON: {reason}")]
    Syntax { reason: String },
    /// A field is missing, has the wrong type, is out of range, or is not a manifest field. `field` is a path
    /// such as `step` or `files[3].xxh3`.
    #[error("manifest field `{field}`: {reason}")]
    Field { field: String, reason: String },
    /// Written by a format this Tessera does not read.
    #[error("the manifest's format is {found:?}; this Tessera reads {FORMAT:?}")]
    UnknownFormat { found: String },
    /// The world size is 0: no rank wrote this checkpoint.
    #[error("the manifest's world size is 0")]
    ZeroWorld,
    /// Two entries name the same file.
    #[error("the manifest lists the file `{name}` twice")]
    DuplicateFile { name: String },
    /// A file name that is not a plain name inside the checkpoint directory (a path, `..`, the manifest itself).
    #[error("the manifest lists the file {name:?}, which {reason}")]
    BadFileName { name: String, reason: &'static str },
    /// A file attributed to a rank the writing world did not have.
    #[error("the manifest gives `{name}` to rank {rank}, but the checkpoint was written by {world} rank(s)")]
    RankOutOfRange { name: String, rank: usize, world: usize },
    /// A checksum that is not 16 lowercase hex digits.
    #[error("the manifest's checksum for `{name}` is {xxh3:?}, not 16 lowercase hex digits")]
    BadChecksum { name: String, xxh3: String },
    /// A file the manifest does not list was offered for verification.
    #[error("`{name}` is not listed in the manifest")]
    UnlistedFile { name: String },
    /// The file's size differs from the manifest's: truncated, or overwritten after the commit.
    #[error("`{name}` is {actual} bytes, the manifest says {expected}: the file is truncated or was overwritten")]
    SizeMismatch { name: String, expected: u64, actual: u64 },
    /// The file's xxh3-64 differs from the manifest's: its bytes are corrupt.
    #[error("`{name}` has xxh3 {actual:016x}, the manifest says {expected:016x}: the file is corrupt")]
    ChecksumMismatch { name: String, expected: u64, actual: u64 },
    /// The manifest's own checksum (its `xxh3` field) does not match its content: edited or corrupted.
    #[error("the manifest's own checksum {claimed} does not match its content ({actual}): it was edited or corrupted")]
    SelfChecksum { claimed: String, actual: String },
    /// The `latest` pointer does not hold exactly one checkpoint name and a newline.
    #[error("the `latest` pointer holds {content:?}, not a checkpoint name such as \"step-000001234\\n\"")]
    BadLatest { content: String },
}

/// One file of a checkpoint, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    /// Plain file name inside the checkpoint directory, such as `rank-00003.safetensors`.
    pub name: String,
    /// The rank that wrote it; `None` for files the coordinator writes for the whole world.
    pub rank: Option<usize>,
    /// Size in bytes.
    pub bytes: u64,
    /// xxh3-64 of the file's bytes, as 16 lowercase hex digits.
    pub xxh3: String,
}

impl FileEntry {
    /// The entry for a file of `len` bytes whose xxh3-64 is `digest` (for writers that hash as they stream).
    pub fn new(name: impl Into<String>, rank: Option<usize>, len: u64, digest: u64) -> Self {
        FileEntry { name: name.into(), rank, bytes: len, xxh3: format!("{digest:016x}") }
    }

    /// The entry for a file holding exactly `data`.
    pub fn of(name: impl Into<String>, rank: Option<usize>, data: &[u8]) -> Self {
        Self::new(name, rank, data.len() as u64, xxhash_rust::xxh3::xxh3_64(data))
    }

    /// The checksum as a number, if it is in the canonical form.
    fn digest(&self) -> Option<u64> {
        let canonical = self.xxh3.len() == 16 && self.xxh3.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        canonical.then(|| u64::from_str_radix(&self.xxh3, 16).ok()).flatten()
    }
}

/// `manifest.json`: what a committed checkpoint holds. Field order is the JSON's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest {
    /// [`FORMAT`] for manifests this Tessera writes.
    pub format: String,
    /// Optimizer steps completed when the checkpoint was taken; training resumes at this step.
    pub step: u64,
    /// Training tokens consumed by those steps.
    pub tokens_seen: u64,
    /// Ranks that wrote the checkpoint (at least 1). Every per-rank file's rank is below it.
    pub world_size: usize,
    /// ZeRO stage of the writing run, which decides how the optimizer state is split across the rank files.
    pub zero_stage: u8,
    /// The model's shape, so a checkpoint can be loaded or exported without the config that wrote it.
    pub model: crate::model::GptConfig,
    /// How steps were cut: `batch_size`, `micro_batch`, `accum_steps`, and the learning-rate schedule (whose
    /// position is `step`), as the trainer serializes them.
    pub train: Value,
    /// Hash of the resolved config, so a resume can tell whether the model or optimizer settings changed.
    pub config_hash: String,
    /// When the coordinator committed the checkpoint, in seconds since the Unix epoch.
    pub created_unix_s: f64,
    /// The data loader's state (its `DataState`), as the data layer serializes it.
    pub data_state: Value,
    /// The loss-spike detector's statistics, with a boolean `clean` tag ([`Manifest::is_clean`]).
    pub detector: Value,
    /// Every file of the checkpoint except the manifest.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// The manifest as pretty-printed JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        // Plain structs, strings, numbers and `Value`s always serialize (a non-finite time becomes `null`,
        // which `validate` rejects before a manifest is written and `from_json` rejects when read).
        let body = serde_json::to_string_pretty(self).expect("a manifest always serializes to JSON");
        // Its own checksum first: xxh3-64 of the text of the fields that follow, byte for byte, so that a
        // manifest edited or corrupted into other valid JSON does not verify.
        let fields = body.strip_prefix('{').expect("a JSON object");
        format!("{{\n  \"xxh3\": \"{:016x}\",{fields}\n", xxhash_rust::xxh3::xxh3_64(body.as_bytes()))
    }

    /// The checksum of the fields' text as [`Manifest::to_json`] laid it out, or `None` for text not in that
    /// layout (rewritten by something else).
    fn digest_of_written(text: &str) -> Option<String> {
        let rest = text.strip_prefix("{\n  \"xxh3\": \"")?;
        let fields = rest.get(16..)?.strip_prefix("\",")?;
        let body = format!("{{{}", fields.strip_suffix('\n').unwrap_or(fields));
        Some(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body.as_bytes())))
    }

    /// Parses manifest text and [validates](Manifest::validate) it. The format is checked before the other
    /// fields, so a manifest of an unknown format is reported as such, not as a missing or unexpected field.
    ///
    /// # Errors
    /// [`ManifestError::Syntax`] for text that is not JSON, [`ManifestError::Field`] naming the first field
    /// that is missing, mistyped or unknown, and any error of [`Manifest::validate`].
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ManifestError::Syntax { reason: e.to_string() })?;
        let Value::Object(mut obj) = value else {
            return Err(ManifestError::Syntax { reason: "the top level is not a JSON object".into() });
        };
        let format: String = take(&mut obj, "", "format")?;
        if format != FORMAT {
            return Err(ManifestError::UnknownFormat { found: format });
        }
        // Manifests written before it carried its own checksum have none.
        let claimed: Option<String> = match obj.contains_key("xxh3") {
            true => Some(take(&mut obj, "", "xxh3")?),
            false => None,
        };
        let manifest = Manifest {
            format,
            step: take(&mut obj, "", "step")?,
            tokens_seen: take(&mut obj, "", "tokens_seen")?,
            world_size: take(&mut obj, "", "world_size")?,
            zero_stage: take(&mut obj, "", "zero_stage")?,
            model: take(&mut obj, "", "model")?,
            train: take(&mut obj, "", "train")?,
            config_hash: take(&mut obj, "", "config_hash")?,
            created_unix_s: take(&mut obj, "", "created_unix_s")?,
            data_state: take(&mut obj, "", "data_state")?,
            detector: take(&mut obj, "", "detector")?,
            files: take::<Vec<Value>>(&mut obj, "", "files")?
                .into_iter()
                .enumerate()
                .map(|(i, v)| file_entry(v, &format!("files[{i}]")))
                .collect::<Result<_, _>>()?,
        };
        no_unknown_fields(&obj, "")?;
        manifest.validate()?;
        if let Some(claimed) = claimed {
            let actual = Self::digest_of_written(text).unwrap_or_else(|| "its text rewritten".into());
            if claimed != actual {
                return Err(ManifestError::SelfChecksum { claimed, actual });
            }
        }
        Ok(manifest)
    }

    /// Checks the manifest's internal consistency: a known format, at least one rank, a finite non-negative
    /// creation time, and files with plain, unique names, ranks below the world size and canonical checksums.
    /// The writer calls it before committing; [`Manifest::from_json`] calls it on every load.
    ///
    /// # Errors
    /// The first inconsistency found, as a [`ManifestError`].
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT {
            return Err(ManifestError::UnknownFormat { found: self.format.clone() });
        }
        if self.world_size == 0 {
            return Err(ManifestError::ZeroWorld);
        }
        if !(self.created_unix_s.is_finite() && self.created_unix_s >= 0.0) {
            return Err(ManifestError::Field {
                field: "created_unix_s".into(),
                reason: format!("{} is not a time since the Unix epoch", self.created_unix_s),
            });
        }
        let mut seen = BTreeSet::new();
        let mut total = 0u64;
        for f in &self.files {
            total = total.checked_add(f.bytes).ok_or_else(|| ManifestError::Field {
                field: "files".into(),
                reason: format!("{}'s size takes the total past 2^64 bytes", f.name),
            })?;
            if let Err(reason) = check_file_name(&f.name) {
                return Err(ManifestError::BadFileName { name: f.name.clone(), reason });
            }
            if !seen.insert(f.name.as_str()) {
                return Err(ManifestError::DuplicateFile { name: f.name.clone() });
            }
            if let Some(rank) = f.rank.filter(|&r| r >= self.world_size) {
                return Err(ManifestError::RankOutOfRange { name: f.name.clone(), rank, world: self.world_size });
            }
            if f.digest().is_none() {
                return Err(ManifestError::BadChecksum { name: f.name.clone(), xxh3: f.xxh3.clone() });
            }
        }
        Ok(())
    }

    /// The entry for file `name`, if listed.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Whether the spike detector vouched for this checkpoint: its `detector.clean` is `true`. A missing or
    /// non-boolean tag counts as not clean, so only checkpoints known to be clean become rollback targets.
    pub fn is_clean(&self) -> bool {
        self.detector.get("clean") == Some(&Value::Bool(true))
    }

    /// This checkpoint's directory name.
    pub fn checkpoint_name(&self) -> String {
        checkpoint_name(self.step)
    }

    /// Checks that `data`, the content of file `name`, is what the manifest recorded.
    ///
    /// # Errors
    /// [`ManifestError::UnlistedFile`], [`ManifestError::SizeMismatch`] (truncation),
    /// [`ManifestError::ChecksumMismatch`] (corruption), or [`ManifestError::BadChecksum`] for an unvalidated
    /// manifest whose entry is malformed.
    pub fn verify_file(&self, name: &str, data: &[u8]) -> Result<(), ManifestError> {
        self.verify_digest(name, data.len() as u64, xxhash_rust::xxh3::xxh3_64(data))
    }

    /// As [`Manifest::verify_file`], for a reader that measured the file's length and xxh3-64 as it streamed
    /// it (checkpoint shards can be larger than one wants to hold twice in memory).
    ///
    /// # Errors
    /// As [`Manifest::verify_file`].
    pub fn verify_digest(&self, name: &str, len: u64, digest: u64) -> Result<(), ManifestError> {
        let entry = self.file(name).ok_or_else(|| ManifestError::UnlistedFile { name: name.into() })?;
        let expected =
            entry.digest().ok_or_else(|| ManifestError::BadChecksum { name: name.into(), xxh3: entry.xxh3.clone() })?;
        if len != entry.bytes {
            return Err(ManifestError::SizeMismatch { name: name.into(), expected: entry.bytes, actual: len });
        }
        if digest != expected {
            return Err(ManifestError::ChecksumMismatch { name: name.into(), expected, actual: digest });
        }
        Ok(())
    }
}

/// Removes and deserializes field `key` of the object at path `at`.
fn take<T: DeserializeOwned>(obj: &mut Map<String, Value>, at: &str, key: &str) -> Result<T, ManifestError> {
    let field = if at.is_empty() { key.to_string() } else { format!("{at}.{key}") };
    let value =
        obj.remove(key).ok_or_else(|| ManifestError::Field { field: field.clone(), reason: "missing".into() })?;
    serde_json::from_value(value).map_err(|e| ManifestError::Field { field, reason: e.to_string() })
}

/// Fails on the first field left in `obj` after the known ones were taken.
fn no_unknown_fields(obj: &Map<String, Value>, at: &str) -> Result<(), ManifestError> {
    match obj.keys().next() {
        None => Ok(()),
        Some(key) => Err(ManifestError::Field {
            field: if at.is_empty() { key.clone() } else { format!("{at}.{key}") },
            reason: "not a field of this manifest format".into(),
        }),
    }
}

fn file_entry(value: Value, at: &str) -> Result<FileEntry, ManifestError> {
    let Value::Object(mut obj) = value else {
        return Err(ManifestError::Field { field: at.into(), reason: "not a JSON object".into() });
    };
    let entry = FileEntry {
        name: take(&mut obj, at, "name")?,
        rank: take(&mut obj, at, "rank")?,
        bytes: take(&mut obj, at, "bytes")?,
        xxh3: take(&mut obj, at, "xxh3")?,
    };
    no_unknown_fields(&obj, at)?;
    Ok(entry)
}

/// Why `name` is not a plain file name inside a checkpoint directory. Names are limited to ASCII letters,
/// digits, `-`, `_` and `.`, so they mean the same on every filesystem and object store.
fn check_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.contains(['/', '\\']) {
        return Err("contains a path separator; checkpoint files sit beside the manifest");
    }
    if name.contains("..") {
        return Err("contains `..`");
    }
    if name.starts_with('.') {
        return Err("starts with `.`");
    }
    if name == MANIFEST_FILE {
        return Err("is the manifest itself");
    }
    if name.len() > 255 {
        return Err("is longer than 255 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err("has characters other than ASCII letters, digits, `-`, `_` and `.`");
    }
    Ok(())
}

/// The directory name of the checkpoint at `step`: `step-` and the step zero-padded to 9 digits (more digits
/// past step 999,999,999), so names sort by step up to there.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:09}")
}

/// The step of checkpoint directory `name`, if it is exactly what [`checkpoint_name`] writes.
pub fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step = digits.parse().ok()?;
    (checkpoint_name(step) == name).then_some(step)
}

/// A staging directory's name, parsed: the checkpoint it will become and the nonce of the attempt writing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StagingName {
    pub step: u64,
    /// Random per save attempt, so a retried or duplicated save of the same step never writes into another
    /// attempt's files.
    pub nonce: u64,
}

impl fmt::Display for StagingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.staging-{:016x}", checkpoint_name(self.step), self.nonce)
    }
}

/// The directory a save attempt writes before it commits: `step-000001234.staging-<16 hex digits>`.
pub fn staging_name(step: u64, nonce: u64) -> String {
    StagingName { step, nonce }.to_string()
}

/// The parts of staging directory `name`, if it is exactly what [`staging_name`] writes.
pub fn parse_staging_name(name: &str) -> Option<StagingName> {
    let (checkpoint, nonce) = name.split_once(".staging-")?;
    let step = parse_checkpoint_name(checkpoint)?;
    if nonce.len() != 16 || !nonce.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    Some(StagingName { step, nonce: u64::from_str_radix(nonce, 16).ok()? })
}

/// The content of the `latest` pointer for the checkpoint at `step`: its name and a newline.
pub fn format_latest(step: u64) -> String {
    format!("{}\n", checkpoint_name(step))
}

/// The step the `latest` pointer names. The trailing newline is required: without it a torn write of
/// `step-1000000000` could read as the valid, different `step-100000000`.
///
/// # Errors
/// [`ManifestError::BadLatest`] for anything but exactly one checkpoint name and a newline.
pub fn parse_latest(content: &str) -> Result<u64, ManifestError> {
    content
        .strip_suffix('\n')
        .and_then(parse_checkpoint_name)
        .ok_or_else(|| ManifestError::BadLatest { content: content.chars().take(80).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            step: 1234,
            tokens_seen: 1234 * 8192,
            world_size: 2,
            zero_stage: 1,
            model: crate::model::preset("tiny").unwrap(),
            train: json!({"batch_size": 8}),
            config_hash: "c0ffee".into(),
            created_unix_s: 1.7e9,
            data_state: json!({"position": 9872}),
            detector: json!({"clean": true}),
            files: vec![
                FileEntry::of("rank-00000.safetensors", Some(0), b"zero"),
                FileEntry::of("rank-00001.safetensors", Some(1), b"one"),
            ],
        }
    }

    #[test]
    fn a_valid_manifest_validates() {
        manifest().validate().unwrap();
    }

    #[test]
    fn from_json_names_the_missing_field() {
        let mut v: Value = serde_json::from_str(&manifest().to_json()).unwrap();
        v.as_object_mut().unwrap().remove("tokens_seen");
        let err = Manifest::from_json(&v.to_string()).unwrap_err();
        assert_eq!(err, ManifestError::Field { field: "tokens_seen".into(), reason: "missing".into() });
    }

    #[test]
    fn from_json_names_a_mistyped_field_inside_the_file_list() {
        let mut v: Value = serde_json::from_str(&manifest().to_json()).unwrap();
        v["files"][1]["bytes"] = json!("three");
        match Manifest::from_json(&v.to_string()).unwrap_err() {
            ManifestError::Field { field, .. } => assert_eq!(field, "files[1].bytes"),
            e => panic!("expected a field error, got {e}"),
        }
    }

    #[test]
    fn from_json_rejects_unknown_fields() {
        let mut v: Value = serde_json::from_str(&manifest().to_json()).unwrap();
        v["files"][0]["sha"] = json!("x");
        let err = Manifest::from_json(&v.to_string()).unwrap_err();
        assert!(matches!(&err, ManifestError::Field { field, .. } if field == "files[0].sha"), "{err}");
    }

    #[test]
    fn from_json_reports_an_unknown_format_before_its_other_fields() {
        let text = json!({"format": "tessera-ckpt-2", "shards": []}).to_string();
        assert_eq!(
            Manifest::from_json(&text).unwrap_err(),
            ManifestError::UnknownFormat { found: "tessera-ckpt-2".into() }
        );
    }

    #[test]
    fn a_manifest_edited_into_other_valid_json_fails_its_own_checksum_and_one_without_a_checksum_still_loads() {
        let text = manifest().to_json();
        assert!(text.starts_with("{\n  \"xxh3\": \""), "{text}");
        assert_eq!(Manifest::from_json(&text).unwrap(), manifest(), "read back as written");
        let step = format!("\"step\": {},", manifest().step);
        let edited = text.replace(&step, &format!("\"step\": {},", manifest().step + 1));
        assert_ne!(edited, text);
        assert!(matches!(Manifest::from_json(&edited), Err(ManifestError::SelfChecksum { .. })), "an edited step");
        let mut v: Value = serde_json::from_str(&text).unwrap();
        assert!(matches!(Manifest::from_json(&v.to_string()), Err(ManifestError::SelfChecksum { .. })), "rewritten");
        v.as_object_mut().unwrap().remove("xxh3");
        assert!(Manifest::from_json(&v.to_string()).is_ok(), "an older manifest, without its own checksum");
    }

    #[test]
    fn from_json_rejects_truncated_text() {
        let text = manifest().to_json();
        let err = Manifest::from_json(&text[..text.len() / 2]).unwrap_err();
        assert!(matches!(err, ManifestError::Syntax { .. }), "{err}");
    }

    #[test]
    fn validate_rejects_a_zero_world_and_a_non_finite_time() {
        let m = Manifest { world_size: 0, files: vec![], ..manifest() };
        assert_eq!(m.validate(), Err(ManifestError::ZeroWorld));
        let m = Manifest { created_unix_s: f64::INFINITY, ..manifest() };
        assert!(matches!(m.validate(), Err(ManifestError::Field { field, .. }) if field == "created_unix_s"));
    }

    #[test]
    fn validate_rejects_file_sizes_that_cannot_add_up() {
        let mut m = manifest();
        let mut second = m.files[0].clone();
        second.name = "rank-00001.safetensors".into();
        m.files.push(second);
        m.files[0].bytes = u64::MAX;
        assert!(matches!(m.validate(), Err(ManifestError::Field { field, .. }) if field == "files"));
    }

    #[test]
    fn validate_rejects_names_that_escape_or_shadow_the_directory() {
        for bad in ["", "a/b", "a\\b", "..", "x..y", ".hidden", "manifest.json", "sp ace", "ü.bin"] {
            let mut m = manifest();
            m.files[0].name = bad.into();
            assert!(matches!(m.validate(), Err(ManifestError::BadFileName { .. })), "{bad:?} was accepted");
        }
    }

    #[test]
    fn validate_rejects_non_canonical_checksums() {
        for bad in ["", "0123", "0123456789ABCDEF", "0123456789abcdeg", "00123456789abcdef"] {
            let mut m = manifest();
            m.files[1].xxh3 = bad.into();
            assert!(matches!(m.validate(), Err(ManifestError::BadChecksum { .. })), "{bad:?} was accepted");
        }
    }

    #[test]
    fn verify_digest_accepts_the_recorded_file_and_rejects_unlisted_ones() {
        let m = manifest();
        m.verify_file("rank-00001.safetensors", b"one").unwrap();
        assert_eq!(
            m.verify_file("rank-00002.safetensors", b"one"),
            Err(ManifestError::UnlistedFile { name: "rank-00002.safetensors".into() })
        );
    }

    #[test]
    fn is_clean_needs_an_explicit_true_tag() {
        assert!(manifest().is_clean());
        for detector in [json!({"clean": false}), json!({}), json!({"clean": "yes"}), Value::Null] {
            assert!(!Manifest { detector: detector.clone(), ..manifest() }.is_clean(), "{detector}");
        }
    }

    #[test]
    fn staging_names_round_trip_and_are_not_checkpoint_names() {
        let name = staging_name(1234, 0x9f3c);
        assert_eq!(name, "step-000001234.staging-0000000000009f3c");
        assert_eq!(parse_staging_name(&name), Some(StagingName { step: 1234, nonce: 0x9f3c }));
        assert_eq!(parse_checkpoint_name(&name), None);
        for bad in [
            "step-000001234",
            "step-000001234.staging-9f3c",
            "step-12.staging-0000000000009f3c",
            "step-000001234.staging-0000000000009F3C",
        ] {
            assert_eq!(parse_staging_name(bad), None, "{bad:?} was accepted");
        }
    }

    #[test]
    fn checkpoint_names_past_nine_digits_stay_canonical() {
        assert_eq!(checkpoint_name(1_000_000_000), "step-1000000000");
        assert_eq!(parse_checkpoint_name("step-1000000000"), Some(1_000_000_000));
        assert_eq!(parse_checkpoint_name("step-0100000000"), None, "a zero pad past 9 digits is not canonical");
        assert_eq!(parse_checkpoint_name("step-+00000012"), None);
        assert_eq!(parse_checkpoint_name("step-99999999999999999999"), None, "overflows u64");
    }

    #[test]
    fn latest_needs_its_newline() {
        assert_eq!(parse_latest(&format_latest(77)), Ok(77));
        for bad in ["step-000000077", "step-000000077\n\n", " step-000000077\n", "step-000000077\r\n", ""] {
            assert!(matches!(parse_latest(bad), Err(ManifestError::BadLatest { .. })), "{bad:?} was accepted");
        }
    }
}
