//! `tessera ckpt list` and `tessera ckpt verify`: what a user can ask about a run's checkpoints, on disk or
//! in an object store, without starting a run.

use super::manifest::{self, Manifest};
use super::store::{self, CkptError, CkptStore};
use crate::storage;
use std::fmt::Write;

/// Why a location cannot be inspected: it does not exist or holds no checkpoints (the user's to fix).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{0} does not exist; give a run directory, its `checkpoints` directory, a checkpoint, or a URL")]
    Missing(String),
    #[error(transparent)]
    Ckpt(#[from] CkptError),
    #[error("{failed} of {total} checkpoint(s) under {location} did not verify (see above)")]
    SomeFailed { location: String, failed: usize, total: usize },
    /// `verify` found nothing to verify: a wrong directory, or a run that never committed a checkpoint.
    #[error("no committed checkpoints under {0}: nothing was verified (a run directory, its `checkpoints` directory, or a checkpoint?)")]
    Empty(String),
}

impl InspectError {
    /// 2 for a location that is not there (a bucket included) or holds no checkpoint, 1 for checkpoints that
    /// fail to verify or to be read (a store that does not answer included).
    pub fn exit_code(&self) -> i32 {
        use storage::StorageError as S;
        match self {
            InspectError::Missing(_) | InspectError::Empty(_) => 2,
            InspectError::Ckpt(CkptError::Storage(S::NotFound { .. } | S::Refused { .. })) => 2,
            _ => 1,
        }
    }
}

fn open(target: &str) -> Result<(CkptStore, Option<String>), InspectError> {
    if !storage::is_url(target) && !std::path::Path::new(target).exists() {
        return Err(InspectError::Missing(target.to_string()));
    }
    Ok(store::open_target(target, &[])?)
}

/// A table of every checkpoint and leftover at `target`, oldest first, with the one `resume = "auto"` would
/// pick marked.
///
/// # Errors
/// [`InspectError::Missing`] for a local path that does not exist; storage errors listing it.
pub fn list(target: &str) -> Result<String, InspectError> {
    let (store, _) = open(target)?;
    let listed = store.list()?;
    let mut out = String::new();
    let _ = writeln!(out, "{}", store.location);
    let _ = writeln!(
        out,
        "{:<40} {:>10} {:>14} {:>6} {:>5} {:>10}  status",
        "name", "step", "tokens", "ranks", "zero", "MB"
    );
    let newest = listed.iter().rev().find(|l| l.committed).map(|l| l.name.clone());
    for l in &listed {
        if !l.committed {
            let _ = writeln!(
                out,
                "{:<40} {:>10} {:>14} {:>6} {:>5} {:>10}  leftover of an interrupted save",
                l.name, l.step, "-", "-", "-", "-"
            );
            continue;
        }
        match store.manifest(&l.name) {
            Ok(m) => {
                let mb = m.files.iter().map(|f| f.bytes).sum::<u64>() as f64 / 1e6;
                let mut status = String::from("committed");
                // On a local disk the cheap half of verification: each file's size against the manifest's
                // (`verify` reads every byte).
                let wrong: Vec<&str> = store.local_root().map_or(vec![], |root| {
                    m.files
                        .iter()
                        .filter(|f| {
                            std::fs::metadata(root.join(&l.name).join(&f.name)).map(|md| md.len()).ok() != Some(f.bytes)
                        })
                        .map(|f| f.name.as_str())
                        .collect()
                });
                if !wrong.is_empty() {
                    status.push_str(&format!(", CORRUPT: {} missing or of the wrong size", wrong.join(", ")));
                }
                if m.is_clean() {
                    status.push_str(", spike-clean");
                }
                if newest.as_deref() == Some(l.name.as_str()) {
                    status.push_str(", newest");
                }
                let _ = writeln!(
                    out,
                    "{:<40} {:>10} {:>14} {:>6} {:>5} {:>10.1}  {status}",
                    l.name, m.step, m.tokens_seen, m.world_size, m.zero_stage, mb
                );
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "{:<40} {:>10} {:>14} {:>6} {:>5} {:>10}  unreadable: {e}",
                    l.name, l.step, "-", "-", "-", "-"
                );
            }
        }
    }
    if listed.is_empty() {
        let _ = writeln!(out, "(no checkpoints)");
    }
    Ok(out)
}

/// One line about a checkpoint that verified.
fn summary(m: &Manifest) -> String {
    let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
    format!(
        "ok: {} (step {}, {} file(s), {:.1} MB, written by {} rank(s) with ZeRO-{}), every checksum matches",
        manifest::checkpoint_name(m.step),
        m.step,
        m.files.len(),
        bytes as f64 / 1e6,
        m.world_size,
        m.zero_stage
    )
}

/// Verifies one checkpoint (`…/step-N`), or every committed checkpoint under a run directory or checkpoint
/// root. Returns one line per checkpoint; failures are printed through `report` and counted.
///
/// # Errors
/// The checkpoint's error when one was named; [`InspectError::SomeFailed`] when any under a root failed.
pub fn verify(target: &str, mut report: impl FnMut(&str)) -> Result<String, InspectError> {
    let (store, name) = open(target)?;
    if let Some(name) = name {
        return Ok(summary(&store.load(&name)?.manifest));
    }
    let committed: Vec<_> = store.list()?.into_iter().filter(|l| l.committed).collect();
    let mut out = String::new();
    let mut failed = 0;
    for l in &committed {
        match store.load(&l.name) {
            Ok(loaded) => {
                let _ = writeln!(out, "{}", summary(&loaded.manifest));
            }
            Err(e) => {
                failed += 1;
                report(&format!("FAILED: {e}"));
            }
        }
    }
    if failed > 0 {
        return Err(InspectError::SomeFailed { location: store.location, failed, total: committed.len() });
    }
    if committed.is_empty() {
        return Err(InspectError::Empty(store.location));
    }
    Ok(out.trim_end().to_string())
}
