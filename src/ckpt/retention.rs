//! Which checkpoints to keep: a pure policy over a listing, returning actions an executor carries out.
//!
//! The rules, for committed checkpoints (ordered by step):
//! - the last `keep_last` are kept (so the newest committed one always is: `keep_last` is at least 1);
//! - with `keep_every = Some(m)`, every checkpoint whose step is a multiple of `m` is kept (milestones for
//!   evaluation and bisection; step 0 is a multiple of every `m`);
//! - the newest *clean* one (the spike detector vouched for it) is kept wherever it is: it is the rollback
//!   target after a loss spike, and the last `keep_last` may all have been taken while the loss was going bad;
//! - every other committed checkpoint is deleted.
//!
//! Uncommitted checkpoints (a directory without a manifest) are never touched here: one may be a save in
//! flight. For the same reason staging directories are not this policy's business; leftovers of crashed
//! saves are removed once at start-up, before any writer runs, which is a different decision.
//!
//! [`plan`] returns one action per committed checkpoint, `Keep` with the reason or `Delete`, in ascending
//! step order: executors act on the deletes, logs show why the rest stay. Applying a plan and planning again
//! deletes nothing more.

use std::collections::BTreeMap;

/// How many checkpoints to keep. Lives in the run's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep this many of the newest committed checkpoints; at least 1, the one a restart resumes from.
    pub keep_last: usize,
    /// Also keep every checkpoint whose step is a multiple of this (at least 1); `None` keeps no milestones.
    pub keep_every: Option<u64>,
}

/// A policy that cannot be applied. The user's to fix in the config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error("keep_last is 0, which would delete the checkpoint a restart resumes from; keep at least 1")]
    KeepLastZero,
    #[error("keep_every is 0; every step is a multiple of nothing, so give a positive step count or leave it unset")]
    KeepEveryZero,
}

impl RetentionPolicy {
    /// Checks the policy's bounds.
    ///
    /// # Errors
    /// [`RetentionError`] for `keep_last == 0` or `keep_every == Some(0)`.
    pub fn validate(&self) -> Result<(), RetentionError> {
        if self.keep_last == 0 {
            return Err(RetentionError::KeepLastZero);
        }
        if self.keep_every == Some(0) {
            return Err(RetentionError::KeepEveryZero);
        }
        Ok(())
    }
}

/// What the listing knows about one checkpoint directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub step: u64,
    /// The spike detector vouched for it (`Manifest::is_clean`).
    pub clean: bool,
    /// Its manifest exists: the coordinator committed it.
    pub committed: bool,
}

/// Why a checkpoint stays. When several reasons hold, the first in this order is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeepReason {
    /// One of the last `keep_last`.
    Recent,
    /// Its step is a multiple of `keep_every`.
    Milestone,
    /// The newest clean checkpoint, kept as the rollback target.
    RollbackTarget,
}

/// The decision for one committed checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionAction {
    Keep { step: u64, reason: KeepReason },
    Delete { step: u64 },
}

/// The retention decision for every committed checkpoint in `checkpoints`, in ascending step order (see the
/// module doc). Uncommitted checkpoints get no action. Input order does not matter; a step listed twice gets
/// one action, and is clean if any listing says so. An unvalidated policy is applied safely: `keep_last` 0
/// acts as 1 and `keep_every` 0 as `None`.
pub fn plan(policy: &RetentionPolicy, checkpoints: &[CheckpointInfo]) -> Vec<RetentionAction> {
    let mut committed: BTreeMap<u64, bool> = BTreeMap::new();
    for c in checkpoints.iter().filter(|c| c.committed) {
        *committed.entry(c.step).or_default() |= c.clean;
    }
    let keep_last = policy.keep_last.max(1);
    let recent_from = committed.keys().rev().nth(keep_last - 1).copied().unwrap_or(0);
    let rollback_target = committed.iter().rev().find(|&(_, &clean)| clean).map(|(&step, _)| step);
    committed
        .keys()
        .map(|&step| {
            let reason = if step >= recent_from {
                Some(KeepReason::Recent)
            } else if policy.keep_every.is_some_and(|m| m > 0 && step % m == 0) {
                Some(KeepReason::Milestone)
            } else if Some(step) == rollback_target {
                Some(KeepReason::RollbackTarget)
            } else {
                None
            };
            match reason {
                Some(reason) => RetentionAction::Keep { step, reason },
                None => RetentionAction::Delete { step },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(steps: &[u64]) -> Vec<CheckpointInfo> {
        steps.iter().map(|&step| CheckpointInfo { step, clean: false, committed: true }).collect()
    }

    #[test]
    fn validate_rejects_zero_counts() {
        assert_eq!(RetentionPolicy { keep_last: 0, keep_every: None }.validate(), Err(RetentionError::KeepLastZero));
        assert_eq!(
            RetentionPolicy { keep_last: 1, keep_every: Some(0) }.validate(),
            Err(RetentionError::KeepEveryZero)
        );
        RetentionPolicy { keep_last: 1, keep_every: Some(1) }.validate().unwrap();
    }

    #[test]
    fn an_unvalidated_zero_policy_still_keeps_the_newest() {
        let actions = plan(&RetentionPolicy { keep_last: 0, keep_every: Some(0) }, &committed(&[10, 20]));
        assert_eq!(
            actions,
            vec![RetentionAction::Delete { step: 10 }, RetentionAction::Keep { step: 20, reason: KeepReason::Recent }]
        );
    }

    #[test]
    fn reasons_follow_their_priority() {
        let mut cps = committed(&[100, 200, 300, 400]);
        cps[1].clean = true;
        cps[3].clean = true;
        let actions = plan(&RetentionPolicy { keep_last: 1, keep_every: Some(200) }, &cps);
        assert_eq!(
            actions,
            vec![
                RetentionAction::Delete { step: 100 },
                RetentionAction::Keep { step: 200, reason: KeepReason::Milestone },
                RetentionAction::Delete { step: 300 },
                RetentionAction::Keep { step: 400, reason: KeepReason::Recent },
            ],
            "400 is recent, a milestone and clean: recent wins; 200 is not the newest clean"
        );
    }
}
