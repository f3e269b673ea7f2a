//! Where checkpoints live, and the storage half of the two-phase commit: a local directory, or a prefix in an
//! object store (`s3://`, `gs://`, `az://`), chosen by the location's form.
//!
//! | step of a save          | local directory                                   | object store                      |
//! |-------------------------|---------------------------------------------------|-----------------------------------|
//! | stage                   | `step-N.staging-<nonce>/`                         | `step-N/` (no rename exists)      |
//! | rank file               | written, fsynced                                  | uploaded (multipart when large)   |
//! | vote                    | `.ack-rank-R.json`, fsynced                       | `.ack-rank-R.json`, one put       |
//! | commit point            | rename of the stage to `step-N/` (manifest inside) | the put of `step-N/manifest.json` |
//! | pointer                 | `latest` replaced by rename                       | `latest`, one put                 |
//!
//! On both, a checkpoint is *committed* exactly when its manifest exists under its final name; everything
//! else (a staging directory, a prefix without a manifest) is a leftover of an interrupted save that
//! [`CkptStore::cleanup`] removes before a run writes anything.

use super::manifest::{self, FileEntry, Manifest, ManifestError, MANIFEST_FILE};
use crate::storage::{self, StorageError, Store};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Why a checkpoint could not be written, listed or read.
///
/// While saving, every variant is recoverable: the save is abandoned, training goes on, and the previous
/// checkpoint stays the one a restart resumes from. While loading, a corrupt checkpoint is skipped in favour
/// of an older one, and set aside ([`CkptStore::set_aside`]); a checkpoint the user named explicitly, or
/// none that verifies among committed ones, fails the run. [`CkptError::Incompatible`] (a checkpoint that
/// cannot serve this run: another model or corpus, none that verifies, a path that does not exist) is the
/// user's to fix: restarting cannot, and the launcher stops at once (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("checkpoint {path}: {source}")]
    Manifest { path: PathBuf, source: ManifestError },
    #[error("checkpoint {path}: {reason}")]
    Incompatible { path: PathBuf, reason: String },
    #[error("checkpoint {path}: libtorch: {source}")]
    Torch { path: PathBuf, source: tch::TchError },
    #[error("checkpoint after step {step}: {reason}")]
    Abandoned { step: u64, reason: String },
}

/// How many corrupt checkpoints set aside for inspection a local store keeps ([`CkptStore::set_aside`]).
pub const KEEP_SET_ASIDE: usize = 2;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CkptError + '_ {
    move |source| CkptError::Io { path: path.to_path_buf(), source }
}

/// libtorch's safetensors writer reports an OS error as text (`... IoError(Os { code: 28, kind: StorageFull,
/// message: "No space left on device" })`): the I/O error it stands for, so that a full disk reads as one.
fn os_error_in(e: &tch::TchError) -> Option<std::io::Error> {
    let text = e.to_string();
    let code = text.split("Os { code: ").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    Some(std::io::Error::from_raw_os_error(code))
}

/// The state file of rank `rank`.
pub fn rank_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

fn ack_file(rank: usize) -> String {
    format!(".ack-rank-{rank:05}.json")
}

/// A rank's vote in the two-phase commit: its file is durable (with its size and checksum), or it failed.
/// Rank 0's vote also carries the manifest's run-wide fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ack {
    pub rank: usize,
    /// `(name, bytes, xxh3)` of the rank's file; `None` when the rank holds nothing for this checkpoint.
    pub file: Option<(String, u64, String)>,
    /// Why the rank could not write its file: the coordinator abandons the save.
    pub error: Option<String>,
}

/// One checkpoint as a listing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub step: u64,
    /// Its manifest exists under the final name.
    pub committed: bool,
    /// Name of the directory or prefix (`step-N` or a staging name).
    pub name: String,
}

/// A committed checkpoint whose manifest parsed and whose files all verified.
pub struct Loaded {
    /// Where it lives, for messages (`…/checkpoints/step-000000010` or its URL).
    pub location: String,
    pub manifest: Manifest,
    /// A local directory holding the verified files (the checkpoint itself, or a download of it).
    dir: PathBuf,
    _download: Option<TempDir>,
}

impl Loaded {
    /// The local directory holding the verified files: the checkpoint itself on a local disk, a download of
    /// it otherwise (removed when this value is dropped).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tensors of rank `rank`'s file, by name.
    ///
    /// # Errors
    /// [`CkptError::Incompatible`] if the manifest lists no such file, [`CkptError::Torch`] if it does not load.
    pub fn rank_file(&self, rank: usize) -> Result<HashMap<String, Tensor>, CkptError> {
        let name = rank_file(rank);
        if self.manifest.file(&name).is_none() {
            return Err(CkptError::Incompatible {
                path: self.location.clone().into(),
                reason: format!("no state file for rank {rank}"),
            });
        }
        let path = self.dir.join(&name);
        let t = Tensor::read_safetensors(&path).map_err(|source| CkptError::Torch { path, source })?;
        Ok(t.into_iter().collect())
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

enum Backend {
    Local(PathBuf),
    Remote(Store),
}

/// The checkpoints of one run.
pub struct CkptStore {
    backend: Backend,
    /// How the location was given, for messages.
    pub location: String,
}

impl CkptStore {
    /// Opens `location`: a local directory (created when first written) or an object-store URL. `options`
    /// override the environment's object-store settings (see [`crate::storage::Store::open`]).
    ///
    /// # Errors
    /// [`CkptError::Storage`] for a URL that does not parse or names an unsupported scheme.
    pub fn open(location: &str, options: &[(String, String)]) -> Result<Self, CkptError> {
        let backend = if storage::is_url(location) && !location.starts_with("file://") {
            Backend::Remote(Store::open(location, options)?)
        } else {
            Backend::Local(PathBuf::from(location.strip_prefix("file://").unwrap_or(location)))
        };
        Ok(CkptStore { backend, location: location.trim_end_matches('/').to_string() })
    }

    /// The root directory, for a store on local disk.
    pub fn local_root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local(root) => Some(root),
            Backend::Remote(_) => None,
        }
    }

    /// The location of entry `name` (a checkpoint, or a file in one), for messages.
    pub fn describe(&self, name: &str) -> String {
        format!("{}/{name}", self.location)
    }

    /// The stage a save of `step` writes into. `nonce` tells attempts apart on local disks (every rank of
    /// one attempt must use the same one); object stores write the final prefix directly.
    pub fn stage_name(&self, step: u64, nonce: u64) -> String {
        match self.backend {
            Backend::Local(_) => manifest::staging_name(step, nonce),
            Backend::Remote(_) => manifest::checkpoint_name(step),
        }
    }

    /// Serializes `tensors` as rank `rank`'s file in `stage`, makes it durable, and returns its entry.
    ///
    /// # Errors
    /// I/O, storage or libtorch errors naming the file.
    pub fn write_rank_file(
        &self,
        stage: &str,
        rank: usize,
        tensors: &[(String, Tensor)],
    ) -> Result<FileEntry, CkptError> {
        let name = rank_file(rank);
        self.reachable(stage)?;
        let (path, _tmp) = match &self.backend {
            Backend::Local(root) => {
                let dir = root.join(stage);
                std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                (dir.join(&name), None)
            }
            Backend::Remote(_) => {
                let tmp = temp_dir("ckpt-upload")?;
                (tmp.0.join(&name), Some(tmp))
            }
        };
        let written = (|| {
            Tensor::write_safetensors(tensors, &path).map_err(|source| match os_error_in(&source) {
                Some(os) => io(&path)(os),
                None => CkptError::Torch { path: path.clone(), source },
            })?;
            let f = std::fs::File::open(&path).map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
            let (bytes, digest) = hash_file(&path)?;
            if let Backend::Remote(store) = &self.backend {
                store.upload(&path, &format!("{stage}/{name}"))?;
            }
            Ok(FileEntry::new(name, Some(rank), bytes, digest))
        })();
        if written.is_err() {
            // A part-written file (a full disk) would only keep the disk full: the vote that follows, and the
            // next checkpoint, need the room. (A remote upload's local copy goes with its temporary directory.)
            let _ = std::fs::remove_file(&path);
        }
        written
    }

    /// Records rank `ack.rank`'s vote for `stage`, durably.
    ///
    /// # Errors
    /// I/O or storage errors.
    pub fn write_ack(&self, stage: &str, ack: &Ack) -> Result<(), CkptError> {
        let text = serde_json::to_vec(ack).expect("an ack serializes");
        let name = ack_file(ack.rank);
        self.reachable(stage)?;
        match &self.backend {
            Backend::Local(root) => {
                // The rank file's directory entry is made durable first; the vote then appears atomically (a
                // rename), and nothing here touches the stage afterwards, because the coordinator may rename
                // it the moment the vote is visible.
                let dir = root.join(stage);
                std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                fsync_dir(&dir)?;
                let tmp = dir.join(format!("{name}.tmp"));
                let voted =
                    write_durably(&tmp, &text).and_then(|()| std::fs::rename(&tmp, dir.join(&name)).map_err(io(&dir)));
                if voted.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                voted
            }
            Backend::Remote(store) => Ok(store.put(&format!("{stage}/{name}"), text.into())?),
        }
    }

    /// The votes in `stage` so far, one slot per rank of `world`.
    ///
    /// # Errors
    /// I/O or storage errors other than a vote not being there yet; a vote that does not parse.
    pub fn read_acks(&self, stage: &str, world: usize) -> Result<Vec<Option<Ack>>, CkptError> {
        self.reachable(stage)?;
        (0..world)
            .map(|r| {
                let name = format!("{stage}/{}", ack_file(r));
                let bytes = match &self.backend {
                    Backend::Local(root) => match std::fs::read(root.join(&name)) {
                        Ok(b) => b,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                        Err(e) => return Err(io(&root.join(&name))(e)),
                    },
                    Backend::Remote(store) => match store.get(&name) {
                        Ok(b) => b.to_vec(),
                        Err(StorageError::NotFound { .. }) => return Ok(None),
                        Err(e) => return Err(e.into()),
                    },
                };
                serde_json::from_slice(&bytes).map(Some).map_err(|e| CkptError::Incompatible {
                    path: self.describe(&name).into(),
                    reason: format!("the vote does not parse: {e}"),
                })
            })
            .collect()
    }

    /// Phase two: removes the votes, writes the manifest last and publishes the checkpoint, then points
    /// `latest` at it. Returns the checkpoint's location. After this returns the checkpoint is durable.
    ///
    /// # Errors
    /// I/O or storage errors; the previous checkpoint stays the latest.
    pub fn commit(&self, stage: &str, m: &Manifest, world: usize) -> Result<String, CkptError> {
        m.validate().map_err(|source| CkptError::Manifest { path: self.describe(stage).into(), source })?;
        self.reachable(stage)?;
        let final_name = manifest::checkpoint_name(m.step);
        match &self.backend {
            Backend::Local(root) => {
                let staging = root.join(stage);
                for r in 0..world {
                    let _ = std::fs::remove_file(staging.join(ack_file(r)));
                    let _ = std::fs::remove_file(staging.join(format!("{}.tmp", ack_file(r))));
                }
                write_durably(&staging.join(MANIFEST_FILE), m.to_json().as_bytes())?;
                fsync_dir(&staging)?;
                let final_dir = root.join(&final_name);
                if final_dir.exists() {
                    // A checkpoint of the same step from an abandoned history (before a rollback).
                    std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
                }
                std::fs::rename(&staging, &final_dir).map_err(io(&final_dir))?;
                fsync_dir(root)?;
                crate::chaos::failpoint("ckpt.commit.before_latest").map_err(io(root))?;
                let tmp = root.join(".latest.tmp");
                write_durably(&tmp, manifest::format_latest(m.step).as_bytes())?;
                std::fs::rename(&tmp, root.join(manifest::LATEST)).map_err(io(root))?;
                fsync_dir(root)?;
            }
            Backend::Remote(store) => {
                for r in 0..world {
                    store.delete(&format!("{stage}/{}", ack_file(r)))?;
                }
                store.put(&format!("{final_name}/{MANIFEST_FILE}"), m.to_json().into_bytes().into())?;
                crate::chaos::failpoint("ckpt.commit.before_latest").map_err(|e| StorageError::Backend {
                    url: self.describe(manifest::LATEST),
                    message: e.to_string(),
                })?;
                store.put(manifest::LATEST, manifest::format_latest(m.step).into_bytes().into())?;
            }
        }
        Ok(self.describe(&final_name))
    }

    /// Deletes an uncommitted stage (an abandoned save).
    ///
    /// # Errors
    /// I/O or storage errors.
    pub fn abandon(&self, stage: &str) -> Result<(), CkptError> {
        match &self.backend {
            Backend::Local(root) => match std::fs::remove_dir_all(root.join(stage)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&root.join(stage))(e)),
                _ => Ok(()),
            },
            Backend::Remote(store) => {
                if store.exists(&format!("{stage}/{MANIFEST_FILE}"))? {
                    return Ok(()); // committed meanwhile: never delete a committed checkpoint here
                }
                Ok(store.delete_prefix(stage)?)
            }
        }
    }

    /// Writes a small marker `name` at the store's root, outside every checkpoint (listing ignores it): what
    /// one node's launcher leaves for node 0's to find, proving that they see one store.
    ///
    /// # Errors
    /// I/O or storage errors.
    pub fn put_marker(&self, name: &str) -> Result<(), CkptError> {
        match &self.backend {
            Backend::Local(root) => {
                std::fs::create_dir_all(root).map_err(io(root))?;
                write_durably(&root.join(name), b"tessera launch marker\n")
            }
            Backend::Remote(store) => Ok(store.put(name, bytes::Bytes::from_static(b"tessera launch marker\n"))?),
        }
    }

    /// Whether marker `name` is there.
    ///
    /// # Errors
    /// I/O or storage errors other than its absence.
    pub fn has_marker(&self, name: &str) -> Result<bool, CkptError> {
        match &self.backend {
            Backend::Local(root) => Ok(root.join(name).is_file()),
            Backend::Remote(store) => Ok(store.exists(name)?),
        }
    }

    /// Removes marker `name` (gone already is fine).
    ///
    /// # Errors
    /// I/O or storage errors.
    pub fn remove_marker(&self, name: &str) -> Result<(), CkptError> {
        match &self.backend {
            Backend::Local(root) => match std::fs::remove_file(root.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&root.join(name))(e)),
                _ => Ok(()),
            },
            Backend::Remote(store) => Ok(store.delete(name)?),
        }
    }

    /// The step of the newest committed checkpoint, if any (without verifying it).
    ///
    /// # Errors
    /// As [`CkptStore::list`].
    /// The chaos harness's storage outage (failpoint `ckpt.store`, armed with `outage(MS)`): this store does
    /// not answer, as on a network outage.
    fn reachable(&self, name: &str) -> Result<(), CkptError> {
        crate::chaos::failpoint("ckpt.store").map_err(|e| {
            CkptError::Storage(StorageError::Unavailable { url: self.describe(name), message: e.to_string() })
        })
    }

    pub fn newest_committed_step(&self) -> Result<Option<u64>, CkptError> {
        Ok(self.list()?.into_iter().rev().find(|c| c.committed).map(|c| c.step))
    }

    /// Every checkpoint and leftover, in ascending step order.
    ///
    /// # Errors
    /// I/O or storage errors listing the location (a location that does not exist yet lists as empty).
    pub fn list(&self) -> Result<Vec<Listed>, CkptError> {
        self.reachable("")?;
        let names: Vec<String> = match &self.backend {
            Backend::Local(root) => match std::fs::read_dir(root) {
                Ok(entries) => entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
                Err(e) => return Err(io(root)(e)),
            },
            Backend::Remote(store) => store.list_dirs()?,
        };
        let mut out = vec![];
        for name in names {
            if let Some(step) = manifest::parse_checkpoint_name(&name) {
                let committed = match &self.backend {
                    Backend::Local(root) => root.join(&name).join(MANIFEST_FILE).is_file(),
                    Backend::Remote(store) => store.exists(&format!("{name}/{MANIFEST_FILE}"))?,
                };
                out.push(Listed { step, committed, name });
            } else if let Some(s) = manifest::parse_staging_name(&name) {
                out.push(Listed { step: s.step, committed: false, name });
            }
        }
        out.sort_by(|a, b| (a.step, &a.name).cmp(&(b.step, &b.name)));
        Ok(out)
    }

    /// Removes every leftover of an interrupted save. Call it only while no save is in flight (at start).
    /// Returns what was removed.
    ///
    /// # Errors
    /// I/O or storage errors.
    pub fn cleanup(&self) -> Result<Vec<String>, CkptError> {
        let mut removed = vec![];
        for l in self.list()?.into_iter().filter(|l| !l.committed) {
            self.abandon(&l.name)?;
            removed.push(l.name);
        }
        if let Backend::Local(root) = &self.backend {
            let _ = std::fs::remove_file(root.join(".latest.tmp"));
        }
        Ok(removed)
    }

    /// Deletes the committed checkpoint at `step`: the manifest first, so that an interrupted delete leaves a
    /// leftover, never a committed checkpoint with missing files.
    ///
    /// # Errors
    /// I/O or storage errors.
    pub fn remove(&self, step: u64) -> Result<(), CkptError> {
        let name = manifest::checkpoint_name(step);
        match &self.backend {
            Backend::Local(root) => {
                let dir = root.join(&name);
                match std::fs::remove_file(dir.join(MANIFEST_FILE)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&dir)(e)),
                    _ => {}
                }
                fsync_dir(&dir)?;
                std::fs::remove_dir_all(&dir).map_err(io(&dir))
            }
            Backend::Remote(store) => {
                store.delete(&format!("{name}/{MANIFEST_FILE}"))?;
                Ok(store.delete_prefix(&name)?)
            }
        }
    }

    /// Takes the committed checkpoint at `step`, found corrupt, out of the run: on a local disk it is renamed to
    /// `corrupt-step-N-<unix seconds>` beside the others (kept for inspection; listings ignore it), in an object
    /// store, where a rename is a full copy, it is removed ([`CkptStore::remove`]). Only the newest
    /// [`KEEP_SET_ASIDE`] set-aside checkpoints are kept: each is as large as a checkpoint, and a run that
    /// keeps meeting corrupt ones must not fill its disk with them. Returns where it was kept and the older
    /// ones removed.
    ///
    /// # Errors
    /// I/O or storage errors.
    pub fn set_aside(&self, step: u64) -> Result<Option<(String, Vec<String>)>, CkptError> {
        let name = manifest::checkpoint_name(step);
        match &self.backend {
            Backend::Local(root) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let kept = root.join(format!("corrupt-{name}-{now}"));
                std::fs::rename(root.join(&name), &kept).map_err(io(&kept))?;
                fsync_dir(root)?;
                // Oldest first by the time they were set aside (the name's last field).
                let mut aside: Vec<(u64, String)> = std::fs::read_dir(root)
                    .map_err(io(root))?
                    .flatten()
                    .filter_map(|e| {
                        let n = e.file_name().into_string().ok()?;
                        let time = n.strip_prefix("corrupt-step-")?.rsplit('-').next()?.parse().ok()?;
                        Some((time, n))
                    })
                    .collect();
                aside.sort();
                let excess = aside.len().saturating_sub(KEEP_SET_ASIDE);
                let mut pruned = vec![];
                for (_, n) in aside.into_iter().take(excess) {
                    let p = root.join(&n);
                    std::fs::remove_dir_all(&p).map_err(io(&p))?;
                    pruned.push(p.display().to_string());
                }
                Ok(Some((kept.display().to_string(), pruned)))
            }
            Backend::Remote(_) => self.remove(step).map(|()| None),
        }
    }

    /// The manifest of checkpoint `name`, parsed and validated (its files are not checked).
    ///
    /// # Errors
    /// I/O or storage errors, or a manifest that does not parse.
    pub fn manifest(&self, name: &str) -> Result<Manifest, CkptError> {
        self.reachable(name)?;
        let text = match &self.backend {
            Backend::Local(root) => {
                let p = root.join(name).join(MANIFEST_FILE);
                std::fs::read_to_string(&p).map_err(io(&p))?
            }
            Backend::Remote(store) => {
                String::from_utf8_lossy(&store.get(&format!("{name}/{MANIFEST_FILE}"))?).into_owned()
            }
        };
        Manifest::from_json(&text).map_err(|source| CkptError::Manifest { path: self.describe(name).into(), source })
    }

    /// Reads checkpoint `name` (`step-N`), checking the manifest and every file's size and checksum.
    ///
    /// # Errors
    /// [`CkptError`] naming what is missing or corrupt.
    pub fn load(&self, name: &str) -> Result<Loaded, CkptError> {
        let location = self.describe(name);
        let bad = |source| CkptError::Manifest { path: location.clone().into(), source };
        let (dir, download) = match &self.backend {
            Backend::Local(root) => (root.join(name), None),
            Backend::Remote(_) => {
                let tmp = temp_dir("ckpt-download")?;
                (tmp.0.clone(), Some(tmp))
            }
        };
        let manifest = self.manifest(name)?;
        for f in &manifest.files {
            let p = dir.join(&f.name);
            if let Backend::Remote(store) = &self.backend {
                store.download(&format!("{name}/{}", f.name), &p)?;
            }
            let (bytes, digest) = hash_file(&p)?;
            manifest.verify_digest(&f.name, bytes, digest).map_err(bad)?;
        }
        Ok(Loaded { location, manifest, dir, _download: download })
    }

    /// The newest committed checkpoint that verifies; broken ones are reported through `skipped` and passed
    /// over.
    ///
    /// # Errors
    /// Only a failure to list the location; a checkpoint that fails to load is skipped.
    pub fn newest(&self, mut skipped: impl FnMut(&CkptError)) -> Result<Option<Loaded>, CkptError> {
        for l in self.list()?.into_iter().rev().filter(|l| l.committed) {
            match self.load(&l.name) {
                Ok(loaded) => return Ok(Some(loaded)),
                Err(e) => skipped(&e),
            }
        }
        Ok(None)
    }
}

/// Opens what a user points at: a checkpoint (`…/step-N`, holding `manifest.json`), or a run directory or
/// checkpoint root (meaning its newest committed checkpoint). Returns the store and the checkpoint's name,
/// or `None` for a root to search.
///
/// # Errors
/// [`CkptError::Storage`] for a bad URL.
pub fn open_target(target: &str, options: &[(String, String)]) -> Result<(CkptStore, Option<String>), CkptError> {
    let trimmed = target.trim_end_matches('/');
    let (parent, last) = trimmed.rsplit_once('/').unwrap_or((".", trimmed));
    if manifest::parse_checkpoint_name(last).is_some() {
        return Ok((CkptStore::open(parent, options)?, Some(last.to_string())));
    }
    if !storage::is_url(trimmed) && Path::new(trimmed).join("checkpoints").is_dir() {
        return Ok((CkptStore::open(&format!("{trimmed}/checkpoints"), options)?, None));
    }
    Ok((CkptStore::open(trimmed, options)?, None))
}

fn temp_dir(what: &str) -> Result<TempDir, CkptError> {
    let nonce: u64 = rand_u64();
    let dir = storage::default_cache_dir().join(format!("{what}-{}-{nonce:016x}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    Ok(TempDir(dir))
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    u64::from_le_bytes(b)
}

fn hash_file(path: &Path) -> Result<(u64, u64), CkptError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io(path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.digest()))
}

fn write_durably(path: &Path, data: &[u8]) -> Result<(), CkptError> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn fsync_dir(dir: &Path) -> Result<(), CkptError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_a_corrupt_checkpoint_aside_keeps_only_the_newest_set_aside_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CkptStore::open(tmp.path().to_str().unwrap(), &[]).unwrap();
        for old in ["corrupt-step-000000005-100", "corrupt-step-000000015-300", "corrupt-step-000000010-200"] {
            std::fs::create_dir(tmp.path().join(old)).unwrap();
        }
        std::fs::create_dir(tmp.path().join(manifest::checkpoint_name(20))).unwrap();
        let (kept, pruned) = store.set_aside(20).unwrap().expect("a local store keeps it");
        assert!(kept.contains("corrupt-step-000000020-"), "{kept}");
        let names = |paths: &[String]| -> Vec<String> {
            paths.iter().map(|p| Path::new(p).file_name().unwrap().to_string_lossy().into_owned()).collect()
        };
        assert_eq!(names(&pruned), ["corrupt-step-000000005-100", "corrupt-step-000000010-200"]);
        let mut left: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["corrupt-step-000000015-300".to_string(), names(&[kept])[0].clone()]);
    }
}
