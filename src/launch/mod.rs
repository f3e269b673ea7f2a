//! Launching a gang of rank processes: the control protocol, the rendezvous, and the worker's side of a run.
//! The launcher's processes and supervision are actors (`crate::actors`): on node 0 (or a single node) the
//! supervisor, on every other node a node agent under node 0's supervisor.

pub mod events;
pub mod launcher;
pub mod protocol;
pub mod rendezvous;
pub mod worker;

use std::net::SocketAddr;

/// Why a gang could not form or run. `Rendezvous` and `Rejected` are set-up problems reported before
/// training (fix the addresses, secret or configs); `RankFailed` ends a run (supervision, a later layer,
/// decides whether to restart).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error("the gang was rejected: {0}")]
    Rejected(String),
    #[error("rank {rank} failed: {reason}")]
    RankFailed { rank: usize, reason: String },
    /// A rank failed in a way a restart would only repeat (bad data or config): the run stops at once, not
    /// after `launch.max_restarts` identical failures. Not recoverable: fix the input and rerun.
    #[error("rank {rank} failed: {reason} (not restarted: a restart would fail the same way; fix this and rerun)")]
    Unrecoverable { rank: usize, reason: String },
    /// A rank could not reach the storage holding the corpus or the checkpoints (no answer, or an overloaded
    /// or failing server): the supervisor waits for the storage to answer, then restarts the gang from the
    /// newest committed checkpoint, without counting a crash.
    #[error("rank {rank} could not reach the storage: {reason}")]
    StorageUnavailable { rank: usize, reason: String },
    /// The storage stayed unreachable for `launch.storage_wait_s` (exit code 3).
    #[error(
        "stopped after waiting {waited_s:.0} s for the storage to answer (launch.storage_wait_s); the last error: \
         {last}; rerun once it answers: the run resumes from its newest committed checkpoint"
    )]
    StorageGaveUp { waited_s: f64, last: String },
    /// A preemption came while the launch waited for unreachable storage: no gang ran, so nothing was
    /// checkpointed (exit code 1).
    #[error(
        "preempted while waiting {waited_s:.0} s for the storage to answer ({last}); no gang was training, so \
         the run resumes from its newest committed checkpoint"
    )]
    PreemptedWaiting { waited_s: f64, last: String },
    /// Ranks whose processes started but never joined (stuck or stopped at start-up, or unable to reach the
    /// rendezvous address): a hang, restartable like one.
    #[error("rank(s) {ranks:?} never joined the rendezvous at {addr} within {timeout_s:.0} s (launch.rdzv_timeout_s)")]
    NeverJoined { ranks: Vec<usize>, addr: String, timeout_s: f64 },
    #[error("cannot start rank {rank}: {reason}")]
    Spawn { rank: usize, reason: String },
    #[error("rank(s) {ranks:?} hung: {reason}")]
    Hung { ranks: Vec<usize>, reason: String },
    #[error(
        "stopped after {restarts} gang restart(s) within {window_s:.0} s (launch.max_restarts / launch.restart_window_s); \
         the last failure: {last}"
    )]
    GaveUp { restarts: usize, window_s: f64, last: Box<LaunchError> },
    #[error("{0}")]
    Setup(String),
    /// Rank 0's spike detector stopped the gang; the supervisor rolls back.
    #[error("{0}")]
    Anomaly(Box<crate::spike::Anomaly>),
    /// Rollbacks did not cure a recurring spike or faulty rank (exit code 4).
    #[error("gave up after repeated loss spikes or rank faults: {0}")]
    SpikeGaveUp(String),
    /// On nodes other than 0: node 0's launcher ended the run with this failure. Each node repeats its
    /// message and exit code; node 0's event log and output say more.
    #[error("node 0 stopped the run: {message}")]
    StoppedByNode0 { code: i32, message: String },
}

impl LaunchError {
    /// The process exit code this failure ends `tessera launch` with: 2 for set-up errors and input a
    /// restart cannot fix, 3 when restarts gave up, 4 when spike rollbacks gave up, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::Rendezvous(_) | LaunchError::Rejected(_) | LaunchError::Unrecoverable { .. } => 2,
            LaunchError::GaveUp { .. } | LaunchError::StorageGaveUp { .. } => 3,
            LaunchError::SpikeGaveUp(_) => 4,
            // Node 0's code, as it came over the wire: one a process can exit with, else a plain failure.
            LaunchError::StoppedByNode0 { code, .. } => Some(*code).filter(|c| (1..=255).contains(c)).unwrap_or(1),
            _ => 1,
        }
    }
}

/// How one worker process finds its gang. Passed from launcher to worker in environment variables so that
/// the secret never appears in a process listing.
#[derive(Debug, Clone)]
pub struct WorkerEnv {
    pub rdzv: SocketAddr,
    pub secret: String,
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// The launcher's pid: a worker whose parent is no longer this process has lost its launcher (where
    /// absent, as in a worker started by hand, nobody checks).
    pub launcher: Option<u32>,
}

impl WorkerEnv {
    pub const RDZV: &'static str = "TESSERA_RDZV";
    pub const SECRET: &'static str = "TESSERA_SECRET";
    pub const RANK: &'static str = "TESSERA_RANK";
    pub const WORLD: &'static str = "TESSERA_WORLD";
    pub const LOCAL_RANK: &'static str = "TESSERA_LOCAL_RANK";
    pub const LAUNCHER: &'static str = "TESSERA_LAUNCHER_PID";

    /// The environment variables that give a worker this.
    pub fn vars(&self) -> Vec<(String, String)> {
        vec![
            (Self::RDZV.to_string(), self.rdzv.to_string()),
            (Self::SECRET.to_string(), self.secret.clone()),
            (Self::RANK.to_string(), self.rank.to_string()),
            (Self::WORLD.to_string(), self.world.to_string()),
            (Self::LOCAL_RANK.to_string(), self.local_rank.to_string()),
        ]
        .into_iter()
        .chain(self.launcher.map(|pid| (Self::LAUNCHER.to_string(), pid.to_string())))
        .collect()
    }

    /// Reads the worker's environment.
    ///
    /// # Errors
    /// [`LaunchError::Setup`] naming the missing or malformed variable (a worker is started by
    /// `tessera launch`, not by hand).
    pub fn from_env() -> Result<Self, LaunchError> {
        fn var(name: &str) -> Result<String, LaunchError> {
            std::env::var(name).map_err(|_| {
                LaunchError::Setup(format!("{name} is not set: `tessera worker` is started by `tessera launch`"))
            })
        }
        fn parse<T: std::str::FromStr>(name: &str) -> Result<T, LaunchError> {
            let v = var(name)?;
            v.parse().map_err(|_| LaunchError::Setup(format!("{name}={v:?} is malformed")))
        }
        Ok(WorkerEnv {
            rdzv: parse(Self::RDZV)?,
            secret: var(Self::SECRET)?,
            rank: parse(Self::RANK)?,
            world: parse(Self::WORLD)?,
            local_rank: parse(Self::LOCAL_RANK)?,
            launcher: std::env::var(Self::LAUNCHER).ok().map(|_| parse(Self::LAUNCHER)).transpose()?,
        })
    }
}
