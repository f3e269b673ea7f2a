//! Saving and loading a run's state on the local filesystem, synchronously, by two-phase commit across ranks.
//!
//! At a checkpoint step every rank writes its state file into a staging directory shared by name
//! (`step-000001234.staging-<nonce>`, the nonce derived from the run's config hash so every rank computes the
//! same one) and fsyncs it; the ranks then exchange each file's size and checksum; the leader writes the
//! manifest last, fsyncs it, renames the staging directory to its final name, and replaces `latest`
//! atomically. A crash before the rename leaves only a staging directory, which the next save or load removes;
//! a crash after it leaves a complete checkpoint. Loading walks committed checkpoints newest first and takes
//! the first whose manifest and files verify, skipping (and reporting) any that do not.
//!
//! What each rank writes: rank 0 the flat parameters; every rank that owns optimizer state not held elsewhere
//! (rank 0 without ZeRO, each rank with it) its AdamW moments. The manifest carries the step (which is also
//! AdamW's step count and the learning-rate schedule's position), tokens seen, world size, ZeRO stage, config
//! hash and the data stream's state. Training uses no random numbers after initialisation, so there is no RNG
//! state to save.
//!
//! Still to come (issue 5): the asynchronous checkpoint-writer actor, object storage, retention, resharding.

use super::manifest::{self, FileEntry, Manifest, ManifestError, MANIFEST_FILE};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Why a checkpoint could not be written or read. Write errors fail the run (the previous checkpoint stays
/// valid); a corrupt checkpoint found while loading is skipped in favour of an older one.
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path}: {source}")]
    Manifest { path: PathBuf, source: ManifestError },
    #[error("checkpoint {path}: {reason}")]
    Incompatible { path: PathBuf, reason: String },
    #[error("checkpoint {path}: libtorch: {source}")]
    Torch { path: PathBuf, source: tch::TchError },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CkptError + '_ {
    move |source| CkptError::Io { path: path.to_path_buf(), source }
}

/// The state file of rank `rank`.
pub fn rank_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// The staging directory name for `step` of the run with `config_hash`.
pub fn staging_dir(root: &Path, step: u64, config_hash: &str) -> PathBuf {
    root.join(manifest::staging_name(step, xxhash_rust::xxh3::xxh3_64(config_hash.as_bytes())))
}

/// Removes staging directories left by saves that never committed.
///
/// # Errors
/// I/O errors listing or removing them.
pub fn remove_staging(root: &Path) -> Result<(), CkptError> {
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(()) };
    for e in entries.flatten() {
        if manifest::parse_staging_name(&e.file_name().to_string_lossy()).is_some() {
            std::fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
        }
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<(), CkptError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Writes this rank's tensors into the staging directory and fsyncs them. Returns the file's entry.
///
/// # Errors
/// I/O or libtorch errors naming the file.
pub fn write_rank_file(staging: &Path, rank: usize, tensors: &[(String, Tensor)]) -> Result<FileEntry, CkptError> {
    let name = rank_file(rank);
    let path = staging.join(&name);
    Tensor::write_safetensors(tensors, &path).map_err(|source| CkptError::Torch { path: path.clone(), source })?;
    let f = std::fs::File::open(&path).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    Ok(FileEntry::of(name, Some(rank), &bytes))
}

/// Leader: writes the manifest last, publishes the staging directory under its final name, points `latest` at
/// it. After this returns the checkpoint is durable.
///
/// # Errors
/// I/O errors; the previous checkpoint stays the latest.
pub fn commit(root: &Path, staging: &Path, m: &Manifest) -> Result<PathBuf, CkptError> {
    let path = staging.join(MANIFEST_FILE);
    let mut f = std::fs::File::create(&path).map_err(io(&path))?;
    f.write_all(m.to_json().as_bytes()).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    fsync_dir(staging)?;
    let final_dir = root.join(manifest::checkpoint_name(m.step));
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(staging, &final_dir).map_err(io(&final_dir))?;
    let tmp = root.join(".latest.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(manifest::format_latest(m.step).as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, root.join(manifest::LATEST)).map_err(io(root))?;
    fsync_dir(root)?;
    Ok(final_dir)
}

/// A committed checkpoint that verified.
pub struct Loaded {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// Reads and verifies one checkpoint directory: manifest and every file's size and checksum.
///
/// # Errors
/// [`CkptError`] naming what is missing or corrupt.
pub fn verify(dir: &Path) -> Result<Loaded, CkptError> {
    let mpath = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&mpath).map_err(io(&mpath))?;
    let manifest = Manifest::from_json(&text).map_err(|source| CkptError::Manifest { path: dir.into(), source })?;
    for f in &manifest.files {
        let p = dir.join(&f.name);
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        manifest.verify_file(&f.name, &bytes).map_err(|source| CkptError::Manifest { path: dir.into(), source })?;
    }
    Ok(Loaded { dir: dir.to_path_buf(), manifest })
}

/// The newest committed checkpoint under `root` that verifies; broken ones are reported through `skipped` and
/// passed over.
pub fn newest(root: &Path, mut skipped: impl FnMut(&CkptError)) -> Option<Loaded> {
    let mut steps: Vec<u64> = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|e| manifest::parse_checkpoint_name(&e.file_name().to_string_lossy()))
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    for step in steps {
        match verify(&root.join(manifest::checkpoint_name(step))) {
            Ok(l) => return Some(l),
            Err(e) => skipped(&e),
        }
    }
    None
}

/// The tensors of rank `rank`'s file of a verified checkpoint, by name.
///
/// # Errors
/// [`CkptError`] if the file is missing from the manifest or unreadable.
pub fn read_rank_file(l: &Loaded, rank: usize) -> Result<std::collections::HashMap<String, Tensor>, CkptError> {
    let name = rank_file(rank);
    if l.manifest.file(&name).is_none() {
        return Err(CkptError::Incompatible { path: l.dir.clone(), reason: format!("no state file for rank {rank}") });
    }
    let path = l.dir.join(&name);
    let t = Tensor::read_safetensors(&path).map_err(|source| CkptError::Torch { path, source })?;
    Ok(t.into_iter().collect())
}
