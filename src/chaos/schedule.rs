//! A chaos schedule: which faults to inject, when and where. Written as TOML (`[[fault]]` tables) or drawn at
//! random from a seed, and turned into failpoints ([`super`]) and timed signals.
//!
//! ```toml
//! [[fault]]
//! kind = "kill_rank"   # see `Kind`
//! step = 12            # at the start of this 0-based step...
//! rank = 1             # ...on this rank (left out: a random one, from `seed`)
//!
//! [[fault]]
//! kind = "hang_rank"
//! at_s = 4.5           # or this many seconds after the launch started (kill_rank, hang_rank, slow_rank,
//!                      # kill_launcher only)
//! ```

use crate::data::order::mix64;
use serde::{Deserialize, Serialize};

/// The faults the harness can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `kill -9` of a rank process.
    KillRank,
    /// A rank stops making progress (stuck before a collective at a step; `SIGSTOP` at a time).
    HangRank,
    /// A straggler: a rank slowed by 300 ms at five consecutive steps (or stopped for 1 s at a time). It must
    /// be tolerated, not restarted.
    SlowRank,
    /// A rank is killed at the step, then fails to start once.
    CrashAtStart,
    /// The learning rate of the step is multiplied by 300.
    LossSpike,
    /// The learning rate of the step is NaN.
    Nan,
    /// A rank's local gradient is multiplied by 1000 at the step.
    CorruptGradients,
    /// The first checkpoint committed after the step is truncated, and rank 0 (whose process commits) is
    /// killed at once, so the restart must find it corrupt and resume from the one before.
    CorruptCheckpoint,
    /// A rank's write of the first checkpoint after the step fails (as on a full disk).
    FailCheckpointWrite,
    /// `kill -9` of the launcher; the harness runs the same command again.
    KillLauncher,
    /// A rank drops its connections to its ring neighbours.
    BreakConnection,
    /// A rank is killed at the step, and at that moment the checkpoint store stops answering for
    /// [`OUTAGE_MS`] (every request of every process fails, as on a network outage): the restart has to wait
    /// for the store, without counting it as a restart.
    StorageOutage,
}

/// How long a `storage_outage` keeps the checkpoint store from answering.
pub const OUTAGE_MS: u64 = 5000;

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::KillRank,
        Kind::HangRank,
        Kind::SlowRank,
        Kind::CrashAtStart,
        Kind::LossSpike,
        Kind::Nan,
        Kind::CorruptGradients,
        Kind::CorruptCheckpoint,
        Kind::FailCheckpointWrite,
        Kind::KillLauncher,
        Kind::BreakConnection,
        Kind::StorageOutage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::KillRank => "kill_rank",
            Kind::HangRank => "hang_rank",
            Kind::SlowRank => "slow_rank",
            Kind::CrashAtStart => "crash_at_start",
            Kind::LossSpike => "loss_spike",
            Kind::Nan => "nan",
            Kind::CorruptGradients => "corrupt_gradients",
            Kind::CorruptCheckpoint => "corrupt_checkpoint",
            Kind::FailCheckpointWrite => "fail_checkpoint_write",
            Kind::KillLauncher => "kill_launcher",
            Kind::BreakConnection => "break_connection",
            Kind::StorageOutage => "storage_outage",
        }
    }

    /// Whether it can fire at a time (by a signal from the harness) rather than only at a step.
    pub fn timed(self) -> bool {
        matches!(self, Kind::KillRank | Kind::HangRank | Kind::SlowRank | Kind::KillLauncher)
    }

    /// Whether recovering from it changes the data order (so the final weights differ from a fault-free
    /// run's by design).
    pub fn reshuffles(self) -> bool {
        matches!(self, Kind::LossSpike | Kind::Nan)
    }

    /// Whether it needs the spike detector armed when it fires.
    fn needs_armed_detector(self) -> bool {
        matches!(self, Kind::LossSpike)
    }
}

/// One fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
}

/// A schedule file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Seeds the choice of rank where a fault names none. Default 0.
    #[serde(default)]
    pub seed: u64,
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
}

/// What the schedule is checked against.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub steps: u64,
    pub world: usize,
    pub checkpoint_every: u64,
    /// First step the spike detector judges.
    pub armed_from: u64,
}

/// A schedule that cannot run; the message names the fault and the fix. Never recovered: `tessera chaos`
/// refuses the schedule before anything runs (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("cannot read the chaos schedule {path}: {source}")]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("chaos schedule {path}: {message}")]
    Parse { path: std::path::PathBuf, message: String },
    #[error("fault #{index} ({kind}): {reason}")]
    Invalid { index: usize, kind: &'static str, reason: String },
}

impl Schedule {
    /// Reads a schedule file.
    ///
    /// # Errors
    /// The file cannot be read or parsed (unknown kinds and keys are named).
    pub fn load(path: &std::path::Path) -> Result<Self, ScheduleError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScheduleError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ScheduleError::Parse { path: path.into(), message: e.to_string() })
    }

    /// `k` faults drawn from `seed`: kinds in turn through all twelve (so every kind appears once `k >= 12`),
    /// at steps spread over the run at least `spacing` apart, on random ranks.
    pub fn random(k: usize, seed: u64, shape: &RunShape) -> Self {
        // Apart enough that a checkpoint fault's checkpoint (up to `checkpoint_every` after its step) is
        // settled before the next fault fires.
        let spacing = (2 * shape.checkpoint_every + 2).max(6);
        // After the first checkpoint too, so that a corrupted one always has an older one to fall back on.
        let first = shape.armed_from.max(2).max(shape.checkpoint_every) + 1;
        let mut rng = mix64(seed ^ 0xC4A0_5EED);
        let mut next = || {
            rng = mix64(rng);
            rng
        };
        let mut kinds: Vec<Kind> = (0..k).map(|i| Kind::ALL[i % Kind::ALL.len()]).collect();
        // Shuffle the order of kinds (Fisher-Yates) so that runs differ by seed.
        for i in (1..kinds.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            kinds.swap(i, j);
        }
        let faults = kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| Fault {
                kind,
                step: Some(first + i as u64 * spacing + next() % 2),
                at_s: None,
                // (Drawn for every kind, so that the same seed gives the same steps as before.)
                rank: Some((next() % shape.world as u64) as usize)
                    .filter(|_| kind != Kind::CorruptCheckpoint)
                    .or(Some(0)),
            })
            .collect();
        Schedule { seed, faults }
    }

    /// The steps the run needs for this schedule to fire completely (the last fault's step plus room to
    /// recover).
    pub fn needs_steps(&self, shape: &RunShape) -> u64 {
        self.faults.iter().filter_map(|f| f.step).max().map_or(0, |s| s + 2 * shape.checkpoint_every + 4)
    }

    /// Fills in random ranks and checks every fault against the run.
    ///
    /// # Errors
    /// [`ScheduleError::Invalid`] naming the fault: no step or time, a time for a kind that needs a step, a
    /// step past the run, a rank past the world, a spike before the detector is armed.
    pub fn resolve(mut self, shape: &RunShape) -> Result<Self, ScheduleError> {
        let mut rng = mix64(self.seed ^ 0x0A11_0C47);
        for (index, f) in self.faults.iter_mut().enumerate() {
            let bad = |reason: String| ScheduleError::Invalid { index, kind: f.kind.name(), reason };
            match (f.step, f.at_s) {
                (None, None) => return Err(bad("give `step` or `at_s`".into())),
                (Some(_), Some(_)) => return Err(bad("give `step` or `at_s`, not both".into())),
                (None, Some(t)) if !f.kind.timed() => {
                    return Err(bad(format!("fires at a step, not at a time (at_s = {t}); give `step`")))
                }
                (None, Some(t)) if !(t.is_finite() && t >= 0.0) => {
                    return Err(bad(format!("at_s = {t} is not a time")))
                }
                (Some(s), None) if s >= shape.steps => {
                    return Err(bad(format!("step {s} is past the run's last step {}", shape.steps - 1)))
                }
                (Some(s), None) if f.kind.needs_armed_detector() && s < shape.armed_from => {
                    return Err(bad(format!(
                        "step {s} is before the spike detector judges anything (step {}; spike.warmup_steps)",
                        shape.armed_from
                    )))
                }
                _ => {}
            }
            if matches!(f.kind, Kind::CorruptCheckpoint | Kind::FailCheckpointWrite) && shape.checkpoint_every == 0 {
                return Err(bad("needs checkpoints: set train.checkpoint_every".into()));
            }
            // With the only checkpoint corrupt a restart has nothing to resume from, and stops (it never
            // starts a run over by itself).
            if let Some(s) = f.step.filter(|&s| f.kind == Kind::CorruptCheckpoint && s < shape.checkpoint_every) {
                return Err(bad(format!(
                    "step {s} corrupts the run's first checkpoint (after step {}), leaving none to recover from: \
                     give a step of at least train.checkpoint_every",
                    shape.checkpoint_every
                )));
            }
            match f.rank {
                Some(r) if r >= shape.world => {
                    return Err(bad(format!("rank {r} is past the world of {} ranks", shape.world)))
                }
                // Rank 0's coordinator truncates its own file and dies: no other rank can be the one.
                Some(r) if f.kind == Kind::CorruptCheckpoint && r != 0 => {
                    return Err(bad(format!(
                        "rank {r}: this fault truncates rank 0's file (rank 0 holds the weights and commits) and \
                         kills rank 0; leave `rank` out or write 0"
                    )))
                }
                None if f.kind == Kind::CorruptCheckpoint => f.rank = Some(0),
                None => {
                    rng = mix64(rng);
                    f.rank = Some((rng % shape.world as u64) as usize);
                }
                _ => {}
            }
        }
        Ok(self)
    }
}

/// The checkpoint step a fault at `step` acts on: the first one committed after it.
pub fn next_checkpoint(step: u64, every: u64) -> u64 {
    (step / every + 1) * every
}

/// The failpoints (for `TESSERA_FAILPOINTS`) that carry out the step-triggered faults. All fire once per
/// run (`@once`, markers in `TESSERA_CHAOS_STATE`). Returns the spec and, per fault, the marker name whose
/// creation time is the moment it fired (`None` for timed faults, which the harness fires itself).
pub fn failpoints(s: &Schedule, checkpoint_every: u64) -> (String, Vec<Option<String>>) {
    let mut spec = vec![];
    let mut markers = vec![];
    for f in &s.faults {
        let (Some(step), Some(r)) = (f.step, f.rank) else {
            markers.push(None);
            continue;
        };
        let mut arm = |name: String, action: &str| {
            spec.push(format!("{name}={action}@once"));
            name
        };
        let marker = match f.kind {
            Kind::KillRank => arm(format!("train.step.rank{r}.step{step}"), "kill"),
            Kind::HangRank => arm(format!("train.step.rank{r}.step{step}"), "sleep(3600000)"),
            Kind::SlowRank => {
                let first = arm(format!("train.step.rank{r}.step{step}"), "sleep(300)");
                for k in 1..5 {
                    arm(format!("train.step.rank{r}.step{}", step + k), "sleep(300)");
                }
                first
            }
            Kind::CrashAtStart => {
                let kill = arm(format!("train.step.rank{r}.step{step}"), "kill");
                spec.push(format!("worker.start.rank{r}=error@after({kill})"));
                kill
            }
            Kind::LossSpike => arm(format!("train.lr.step{step}"), "scale(300)"),
            Kind::Nan => arm(format!("train.lr.step{step}"), "nan"),
            Kind::CorruptGradients => arm(format!("train.grad.rank{r}.step{step}"), "scale(1000)"),
            Kind::CorruptCheckpoint => {
                arm(format!("ckpt.corrupt.step{}", next_checkpoint(step, checkpoint_every)), "kill")
            }
            Kind::FailCheckpointWrite => {
                arm(format!("ckpt.write.rank{r}.step{}", next_checkpoint(step, checkpoint_every)), "error")
            }
            Kind::KillLauncher => arm(format!("train.kill_launcher.step{step}"), "kill"),
            Kind::BreakConnection => arm(format!("train.break.rank{r}.step{step}"), "error"),
            Kind::StorageOutage => {
                let kill = arm(format!("train.step.rank{r}.step{step}"), "kill");
                spec.push(format!("ckpt.store=outage({OUTAGE_MS})@after({kill})"));
                kill
            }
        };
        markers.push(Some(marker));
    }
    (spec.join(";"), markers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: RunShape = RunShape { steps: 200, world: 3, checkpoint_every: 5, armed_from: 10 };

    #[test]
    fn a_schedule_file_parses_and_bad_faults_are_named() {
        let s: Schedule = toml::from_str(
            "seed = 3\n[[fault]]\nkind = \"kill_rank\"\nstep = 12\nrank = 1\n[[fault]]\nkind = \"hang_rank\"\nat_s = 2.5\n",
        )
        .unwrap();
        let s = s.resolve(&SHAPE).unwrap();
        assert_eq!(s.faults[0], Fault { kind: Kind::KillRank, step: Some(12), at_s: None, rank: Some(1) });
        assert!(s.faults[1].rank.unwrap() < 3, "a random rank is drawn");
        let bad = |text: &str| Schedule { seed: 0, faults: vec![toml::from_str(text).unwrap()] }.resolve(&SHAPE);
        assert!(bad("kind = \"nan\"\nat_s = 1.0").unwrap_err().to_string().contains("give `step`"));
        assert!(bad("kind = \"kill_rank\"\nstep = 500").unwrap_err().to_string().contains("past the run"));
        assert!(bad("kind = \"kill_rank\"\nstep = 5\nrank = 3").unwrap_err().to_string().contains("past the world"));
        assert!(bad("kind = \"loss_spike\"\nstep = 5").unwrap_err().to_string().contains("spike detector"));
        // A corrupt checkpoint is always rank 0's file and rank 0's death.
        assert!(bad("kind = \"corrupt_checkpoint\"\nstep = 12\nrank = 1").unwrap_err().to_string().contains("rank 0"));
        assert_eq!(bad("kind = \"corrupt_checkpoint\"\nstep = 12").unwrap().faults[0].rank, Some(0));
        assert!(bad("kind = \"corrupt_checkpoint\"\nstep = 3").unwrap_err().to_string().contains("first checkpoint"));
        assert!(toml::from_str::<Schedule>("[[fault]]\nkind = \"explode\"\nstep = 1").is_err());
    }

    #[test]
    fn a_random_schedule_has_every_kind_spaced_out_and_depends_on_the_seed() {
        let a = Schedule::random(12, 1, &SHAPE);
        let mut kinds: Vec<&str> = a.faults.iter().map(|f| f.kind.name()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), 12, "every kind once");
        let mut steps: Vec<u64> = a.faults.iter().map(|f| f.step.unwrap()).collect();
        steps.sort_unstable();
        assert!(steps.windows(2).all(|w| w[1] - w[0] >= 11), "{steps:?}"); // 12 apart, give or take one
        assert_eq!(a, Schedule::random(12, 1, &SHAPE));
        assert_ne!(a, Schedule::random(12, 2, &SHAPE));
        assert!(a.clone().resolve(&SHAPE).is_ok());
    }

    #[test]
    fn faults_become_once_only_failpoints() {
        let s = Schedule {
            seed: 0,
            faults: vec![
                Fault { kind: Kind::CrashAtStart, step: Some(12), at_s: None, rank: Some(1) },
                Fault { kind: Kind::CorruptCheckpoint, step: Some(21), at_s: None, rank: Some(0) },
                Fault { kind: Kind::KillRank, step: None, at_s: Some(1.0), rank: Some(0) },
            ],
        };
        let (spec, markers) = failpoints(&s, 5);
        assert!(spec.contains("train.step.rank1.step12=kill@once"), "{spec}");
        assert!(spec.contains("worker.start.rank1=error@after(train.step.rank1.step12)"), "{spec}");
        assert!(spec.contains("ckpt.corrupt.step25=kill@once"), "{spec}");
        assert_eq!(markers[2], None, "timed faults are the harness's own");
        assert!(crate::chaos::parse(&spec).is_ok());
    }
}
