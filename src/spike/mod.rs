//! Loss spikes: detecting them ([`detector`]) and deciding how to roll back ([`rollback`]). Both are pure;
//! the [`crate::actors::spike_detector`] actor feeds the detector every step, and the launcher's supervisor
//! (or `tessera train`) carries out the rollback plan.

pub mod detector;
pub mod rollback;

pub use detector::{Detector, DetectorConfig, DetectorState, StepStats, Tag, Verdict};
pub use rollback::{Anomaly, Directive, Plan, RollbackConfig};

use crate::ckpt::store::{CkptError, CkptStore};
use rollback::{Candidate, Entry};

/// The committed checkpoints as the rollback planner sees them: each one's step, and whether its detector
/// tag was clean ([`crate::ckpt::manifest::Manifest::is_clean`]: one without a tag is not; one whose manifest
/// does not read is left out).
///
/// # Errors
/// The store cannot be listed.
pub fn candidates(store: &CkptStore) -> Result<Vec<Candidate>, CkptError> {
    Ok(store
        .list()?
        .into_iter()
        .filter(|c| c.committed)
        .filter_map(|c| {
            let m = store.manifest(&c.name).ok()?;
            Some(Candidate { step: c.step, clean: m.is_clean() })
        })
        .collect())
}

/// What the supervisor (or `tessera train`) did about an anomaly.
#[derive(Debug, Clone)]
pub struct Response {
    pub plan: Plan,
    /// Committed checkpoints newer than the target, removed: they belong to the abandoned history, and a
    /// later crash must not resume from them.
    pub removed: Vec<u64>,
}

/// Plans the response to `anomaly` and, for a rollback, removes the checkpoints after its target.
///
/// # Errors
/// The store cannot be listed or a checkpoint cannot be removed.
pub fn respond(
    store: &CkptStore,
    cfg: &crate::config::RunConfig,
    history: &[Entry],
    anomaly: &Anomaly,
) -> Result<Response, CkptError> {
    let candidates = candidates(store)?;
    let plan = rollback::plan(&cfg.spike.rollback(), history, anomaly, &candidates, cfg.batch_size, cfg.seed);
    let mut removed = vec![];
    if let Plan::Rollback { directive, .. } = &plan {
        for c in candidates.iter().filter(|c| c.step > directive.target) {
            store.remove(c.step)?;
            removed.push(c.step);
        }
    }
    Ok(Response { plan, removed })
}
