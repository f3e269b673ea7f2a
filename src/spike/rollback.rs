//! What to do about an anomaly, as a pure function: which checkpoint to roll back to, whether the rest of
//! the epoch is reshuffled and which data is skipped, whether the learning rate is lowered for a while, and
//! when to give up. The launcher's supervisor (and `tessera train`) carry the plan out.
//!
//! **Target.** The newest committed checkpoint whose detector tag is clean and that precedes the anomaly:
//! for a spike, a checkpoint before its onset (the weights the onset step ran with are suspect); for a rank
//! fault, a checkpoint at or before the faulty step (its gradients only reach the weights after it). With no
//! such checkpoint, the run starts over from step 0.
//!
//! **Gang-wide spike.** All ranks roll back; the rest of the epoch gets a fresh shuffle layer, and, with
//! `skip = true`, the batches from the step before the onset through the step of detection are skipped
//! (they are listed in the data state's skipped samples, never lost silently).
//!
//! **Rank fault.** All ranks roll back without reshuffling (the data was not at fault), and the faulty
//! rank's process is replaced. If the same rank faults again at the same step, replaying the same data gave
//! the same numbers: a faulty device does not do that, so the data is the likelier cause, and the rollback
//! reshuffles and skips that step's batch (doubling on further repeats) like a spike's.
//!
//! **Escalation.** A spike whose onset is within `same_place_steps` of an earlier one's is a repeat. Repeat
//! `r` skips `2^r` times the window (extended backwards, not past the target) and multiplies the learning
//! rate by `lr_factor^r` for `lr_steps` steps after the target. After `max_repeats` repeats the run stops
//! with a report. A rank faulting `max_repeats` times at the same place stops the run too, naming its host
//! and device.

use super::detector::{RankFault, Spike};
use crate::data::order::mix64;
use serde::{Deserialize, Serialize};

/// The rollback policy's settings (`[spike]` in the run config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RollbackConfig {
    pub skip: bool,
    pub same_place_steps: u64,
    pub max_repeats: usize,
    pub lr_factor: f64,
    pub lr_steps: u64,
}

impl Default for RollbackConfig {
    fn default() -> Self {
        RollbackConfig { skip: true, same_place_steps: 100, max_repeats: 3, lr_factor: 0.5, lr_steps: 100 }
    }
}

/// An anomaly, as rank 0 reports it to the launcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Anomaly {
    Spike(Spike),
    RankFault { fault: RankFault, host: String, device: String },
}

impl Anomaly {
    /// The step at which it was declared.
    pub fn step(&self) -> u64 {
        match self {
            Anomaly::Spike(s) => s.step,
            Anomaly::RankFault { fault, .. } => fault.step,
        }
    }
}

impl std::fmt::Display for Anomaly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Anomaly::Spike(s) => write!(f, "loss spike at step {} (onset {}): {}", s.step, s.onset, s.reason),
            Anomaly::RankFault { fault, host, device } => {
                write!(f, "rank {}", fault.rank)?;
                if !host.is_empty() {
                    write!(f, " on {host} ({device})")?;
                }
                write!(f, " produced outlier numbers at step {}: {}", fault.step, fault.reason)
            }
        }
    }
}

/// A committed checkpoint as the planner sees it: its step and its detector tag's verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub step: u64,
    pub clean: bool,
}

/// The fresh order for the rest of the epoch, and the skipped window, in samples from the target's position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    pub seed: u64,
    pub skip_at: u64,
    pub skip: u64,
}

/// What every rank of the restarted gang applies after loading the target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Directive {
    /// The checkpoint to load (its step); 0: start over from the initial weights.
    pub target: u64,
    pub layer: Option<LayerPlan>,
    /// Learning-rate multiplier for steps before `lr_until`.
    pub lr_scale: f64,
    pub lr_until: u64,
}

/// One line of the spike ledger: an anomaly and the rollback it caused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// `spike` or `rank_fault`.
    pub kind: String,
    pub rank: Option<usize>,
    pub onset: u64,
    pub step: u64,
    /// The global loss at detection (spikes only).
    pub loss: Option<f64>,
    pub target: u64,
    pub seed: Option<u64>,
    /// Samples skipped by the new layer, from `skip_at` samples after the target's position.
    pub skipped: u64,
    #[serde(default)]
    pub skip_at: u64,
    pub lr_scale: f64,
    /// Earlier anomalies at the same place.
    pub repeat: usize,
}

/// The decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Rollback { directive: Directive, entry: Entry },
    GiveUp { reason: String },
}

/// Plans the response to `anomaly`, given the ledger so far, the committed checkpoints, the global batch in
/// samples, and the run's seed.
pub fn plan(
    cfg: &RollbackConfig,
    history: &[Entry],
    anomaly: &Anomaly,
    checkpoints: &[Candidate],
    batch: u64,
    seed: u64,
) -> Plan {
    let near = |e: &Entry, onset: u64| e.onset.abs_diff(onset) <= cfg.same_place_steps;
    let newest_clean = |ok: &dyn Fn(u64) -> bool| {
        checkpoints.iter().filter(|c| c.clean && ok(c.step)).map(|c| c.step).max().unwrap_or(0)
    };
    match anomaly {
        Anomaly::Spike(s) => {
            let repeat = history.iter().filter(|e| e.kind == "spike" && near(e, s.onset)).count();
            if repeat >= cfg.max_repeats {
                let reason = match repeat {
                    // Only with spike.max_repeats = 0: the first spike already stops the run.
                    0 => format!(
                        "a loss spike at step {} (onset {}), and spike.max_repeats = 0 allows no rollback: the run \
                         stops here (inspect the data near step {}, or raise spike.max_repeats to roll back)",
                        s.step, s.onset, s.onset
                    ),
                    _ => format!(
                        "a loss spike at step {} (onset {}) came back after {repeat} rollbacks at the same place, \
                         with up to {}x the skipped data and the learning rate down to {}x; the run stops here \
                         (inspect the data near step {}, lower train.lr, or raise spike.max_repeats)",
                        s.step,
                        s.onset,
                        1u64 << (repeat - 1).min(62),
                        cfg.lr_factor.powi(repeat as i32 - 1),
                        s.onset
                    ),
                };
                return Plan::GiveUp { reason };
            }
            let target = newest_clean(&|step| step < s.onset);
            let layer_seed = mix64(seed ^ mix64(history.len() as u64 + 1) ^ s.onset.wrapping_mul(0x9E37));
            let (skip_at, skip) = if cfg.skip {
                // From the step before the onset (its update may be the culprit) through detection, widened
                // backwards on repeats, never before the target.
                let last = s.step + 1;
                let first = s.onset.saturating_sub(1).max(target);
                let width = (last - first) << repeat.min(20);
                let first = last.saturating_sub(width).max(target);
                ((first - target) * batch, (last - first) * batch)
            } else {
                (0, 0)
            };
            let lr_scale = cfg.lr_factor.powi(repeat as i32);
            Plan::Rollback {
                directive: Directive {
                    target,
                    layer: Some(LayerPlan { seed: layer_seed, skip_at, skip }),
                    lr_scale,
                    lr_until: if repeat > 0 { target + cfg.lr_steps } else { 0 },
                },
                entry: Entry {
                    kind: "spike".into(),
                    rank: None,
                    onset: s.onset,
                    step: s.step,
                    loss: s.loss.is_finite().then_some(s.loss),
                    target,
                    seed: Some(layer_seed),
                    skipped: skip,
                    skip_at,
                    lr_scale,
                    repeat,
                },
            }
        }
        Anomaly::RankFault { fault, host, device } => {
            let repeat = history
                .iter()
                .filter(|e| e.kind == "rank_fault" && e.rank == Some(fault.rank) && near(e, fault.step))
                .count();
            if repeat >= cfg.max_repeats {
                return Plan::GiveUp {
                    reason: format!(
                        "rank {} on {host} ({device}) produced outlier numbers {} times near step {}: its device is \
                         likely faulty; replace it (or exclude the host) and rerun, which resumes from the last \
                         clean checkpoint",
                        fault.rank,
                        repeat + 1,
                        fault.step
                    ),
                };
            }
            let target = newest_clean(&|step| step <= fault.step);
            let layer = (repeat > 0).then(|| LayerPlan {
                seed: mix64(seed ^ mix64(history.len() as u64 + 1) ^ fault.step.wrapping_mul(0x9E37)),
                skip_at: (fault.step - target) * batch,
                skip: batch << (repeat - 1).min(20),
            });
            Plan::Rollback {
                directive: Directive { target, layer, lr_scale: 1.0, lr_until: 0 },
                entry: Entry {
                    kind: "rank_fault".into(),
                    rank: Some(fault.rank),
                    onset: fault.step,
                    step: fault.step,
                    loss: None,
                    target,
                    seed: layer.map(|l| l.seed),
                    skipped: layer.map_or(0, |l| l.skip),
                    skip_at: layer.map_or(0, |l| l.skip_at),
                    lr_scale: 1.0,
                    repeat,
                },
            }
        }
    }
}

/// One line for the user about a rollback.
pub fn describe(e: &Entry) -> String {
    let from = if e.target > 0 { format!("the checkpoint after step {}", e.target) } else { "the start".into() };
    match e.kind.as_str() {
        "spike" => format!(
            "rolling back to {from} (spike onset at step {}, detected at step {}); the rest of the epoch gets a \
             fresh order (seed {:#x}), {} sample(s) skipped{}",
            e.onset,
            e.step,
            e.seed.unwrap_or(0),
            e.skipped,
            if e.lr_scale < 1.0 { format!(", learning rate x{} for a while", e.lr_scale) } else { String::new() }
        ),
        _ if e.seed.is_some() => format!(
            "rank {} faulted again at step {} on the same data: taking the data for the cause; rolling back to \
             {from} with a fresh order (seed {:#x}), {} sample(s) skipped",
            e.rank.unwrap_or(0),
            e.step,
            e.seed.unwrap_or(0),
            e.skipped
        ),
        _ => format!(
            "rank {} is faulty (outlier numbers at step {}): restarting it and rolling the gang back to {from}, \
             same data order",
            e.rank.unwrap_or(0),
            e.step
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spike(onset: u64, step: u64) -> Anomaly {
        Anomaly::Spike(Spike { onset, step, loss: 9.0, grad_norm: 1.0, reason: "test".into() })
    }

    fn ckpts(steps: &[(u64, bool)]) -> Vec<Candidate> {
        steps.iter().map(|&(step, clean)| Candidate { step, clean }).collect()
    }

    #[test]
    fn a_spike_rolls_back_to_the_newest_clean_checkpoint_before_its_onset() {
        let cfg = RollbackConfig::default();
        let c = ckpts(&[(10, true), (20, true), (25, false), (30, true)]);
        let Plan::Rollback { directive, entry } = plan(&cfg, &[], &spike(26, 29), &c, 8, 0) else { panic!() };
        assert_eq!(directive.target, 20, "25 is not clean; 30 is after the onset");
        let layer = directive.layer.unwrap();
        // Skips steps 25..=29 (from the step before the onset through detection): 5 batches of 8, starting 5
        // batches after the target.
        assert_eq!((layer.skip_at, layer.skip), (5 * 8, 5 * 8));
        assert_eq!((directive.lr_scale, directive.lr_until), (1.0, 0));
        assert_eq!((entry.onset, entry.target, entry.repeat), (26, 20, 0));
        // No checkpoint before the onset: start over.
        let Plan::Rollback { directive, .. } = plan(&cfg, &[], &spike(5, 8), &c, 8, 0) else { panic!() };
        assert_eq!(directive.target, 0);
    }

    #[test]
    fn repeats_at_the_same_place_widen_the_skip_lower_the_learning_rate_then_give_up() {
        let cfg = RollbackConfig { max_repeats: 2, ..RollbackConfig::default() };
        let c = ckpts(&[(10, true), (20, true)]);
        let mut history = vec![];
        let mut skips = vec![];
        for _ in 0..2 {
            match plan(&cfg, &history, &spike(30, 33), &c, 4, 7) {
                Plan::Rollback { directive, entry } => {
                    skips.push((directive.layer.unwrap().skip, directive.lr_scale, directive.lr_until));
                    history.push(entry);
                }
                p => panic!("{p:?}"),
            }
        }
        assert_eq!(skips, [(5 * 4, 1.0, 0), (10 * 4, 0.5, 20 + cfg.lr_steps)]);
        assert_ne!(history[0].seed, history[1].seed, "each rollback draws a fresh order");
        assert!(
            matches!(plan(&cfg, &history, &spike(31, 34), &c, 4, 7), Plan::GiveUp { reason } if reason.contains("came back"))
        );
        // A spike elsewhere is a first occurrence.
        assert!(
            matches!(plan(&cfg, &history, &spike(500, 503), &c, 4, 7), Plan::Rollback { entry, .. } if entry.repeat == 0)
        );
    }

    #[test]
    fn with_no_repeats_allowed_the_first_spike_stops_the_run_and_says_why() {
        let cfg = RollbackConfig { max_repeats: 0, ..RollbackConfig::default() };
        match plan(&cfg, &[], &spike(30, 33), &ckpts(&[(10, true), (20, true)]), 4, 7) {
            Plan::GiveUp { reason } => assert!(reason.contains("spike.max_repeats = 0 allows no rollback"), "{reason}"),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn a_rank_fault_rolls_back_without_reshuffling_and_a_repeating_rank_stops_the_run() {
        let cfg = RollbackConfig { max_repeats: 1, ..RollbackConfig::default() };
        let fault = Anomaly::RankFault {
            fault: RankFault { rank: 1, step: 20, reason: "x".into() },
            host: "node7".into(),
            device: "cuda:1".into(),
        };
        let c = ckpts(&[(10, true), (20, true), (25, true)]);
        let Plan::Rollback { directive, entry } = plan(&cfg, &[], &fault, &c, 4, 0) else { panic!() };
        assert_eq!((directive.target, directive.layer), (20, None));
        // Again at the same step, on the same data: the data is taken for the cause.
        let wider = RollbackConfig { max_repeats: 3, ..cfg };
        let Plan::Rollback { directive: again, .. } = plan(&wider, std::slice::from_ref(&entry), &fault, &c, 4, 0)
        else {
            panic!()
        };
        let layer = again.layer.expect("a reshuffle this time");
        assert_eq!((layer.skip_at, layer.skip), (0, 4), "the faulty step's batch is skipped");
        match plan(&cfg, &[entry], &fault, &c, 4, 0) {
            Plan::GiveUp { reason } => assert!(reason.contains("node7") && reason.contains("cuda:1"), "{reason}"),
            p => panic!("{p:?}"),
        }
    }
}
