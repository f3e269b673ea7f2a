//! The crate's error type. Each module has its own typed errors; this wraps them for callers that handle
//! any failure of a run the same way (report and exit).

use crate::config::ConfigError;
use crate::data::DataError;
use crate::device::DeviceError;
use crate::plan::PlanError;
use std::path::PathBuf;

/// Any failure of a Tessera command. Config, device and plan errors are the user's to fix and are reported
/// before training starts; so are most data errors, but a shard is verified when first read, so a corrupt
/// one, or a storage failure reaching it, can come mid-run ([`Error::recovery`] says what a restart can do
/// about it). `Torch` is a libtorch failure during training (for example out of memory); `Io` is a
/// failure writing the run directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Ckpt(#[from] crate::ckpt::store::CkptError),
    #[error(transparent)]
    Export(#[from] crate::ckpt::export::ExportError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    #[error(transparent)]
    Launch(#[from] crate::launch::LaunchError),
    /// Another process holds the run directory (the user's to resolve: exit code 2).
    #[error(transparent)]
    RunLock(#[from] crate::run_lock::LockError),
    #[error("after step {step}, rank(s) {ranks:?} hold weights that differ from rank 0's: the replicas diverged")]
    Diverged { step: u64, ranks: Vec<usize> },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The spike detector stopped the loop: recoverable by rolling back ([`crate::spike::rollback`]).
    #[error("{0}")]
    Anomaly(Box<crate::spike::Anomaly>),
    /// A preemption stopped the run, but the checkpoint of the step it stopped at did not commit (the store
    /// failed): the steps after `newest` are lost, and a rerun resumes there (exit code 1).
    #[error(
        "preempted: stopped after step {step}, but that step's checkpoint did not commit (see the warnings above); {}",
        match newest {
            Some(n) => format!("the newest committed checkpoint is step {n}, where a rerun resumes"),
            None => "no checkpoint is committed: a rerun starts over".to_string(),
        }
    )]
    PreemptedUncommitted { step: u64, newest: Option<u64> },
    /// Rollbacks did not cure a recurring spike or a faulty rank (exit code 4).
    #[error("gave up after repeated loss spikes or rank faults: {0}")]
    SpikeGaveUp(String),
}

impl From<crate::train::step::StepError> for Error {
    fn from(e: crate::train::step::StepError) -> Self {
        match e {
            crate::train::step::StepError::Torch(t) => Error::Torch(t),
            crate::train::step::StepError::Comm(c) => Error::Comm(c),
        }
    }
}

impl Error {
    /// What a restart can do about this error ([`Recovery`]).
    ///
    /// `Never` for input a restart would fail on the same way: the config, a corpus that is missing,
    /// malformed, corrupt or too small, a checkpoint that cannot serve this run (another model or corpus,
    /// none that verifies, a path that does not exist), a store that refuses the request (no such bucket,
    /// wrong credentials). `WaitForStorage` for a store that does not answer (the network, an overloaded or
    /// failing server) on the way to the corpus or a checkpoint. `Restart` for the rest.
    pub fn recovery(&self) -> Recovery {
        use crate::ckpt::store::CkptError as C;
        use crate::data::DataError as D;
        use crate::storage::StorageError as S;
        match self {
            Error::Data(D::Storage(S::Unavailable { .. })) | Error::Ckpt(C::Storage(S::Unavailable { .. })) => {
                Recovery::WaitForStorage
            }
            Error::Data(D::Storage(S::Refused { .. })) | Error::Ckpt(C::Storage(S::Refused { .. })) => Recovery::Never,
            Error::Config(_) => Recovery::Never,
            Error::RunLock(crate::run_lock::LockError::InUse { .. }) => Recovery::Never,
            Error::Data(
                D::MissingCorpus { .. }
                | D::BadIndex { .. }
                | D::MissingShard { .. }
                | D::CorruptShard { .. }
                | D::TooSmall { .. },
            ) => Recovery::Never,
            Error::Ckpt(C::Incompatible { .. }) => Recovery::Never,
            Error::Device(crate::device::DeviceError::TooLarge { .. }) => Recovery::Never,
            _ => Recovery::Restart,
        }
    }

    /// What to try next, where the message alone does not say it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::Data(e) if e.skippable() => {
                Some("rerun with --skip-bad to skip such files and lines (they are listed in the index)")
            }
            _ => None,
        }
    }

    /// Process exit code: 2 for problems with the user's input (everything a restart cannot fix,
    /// [`Recovery::Never`], and the rest of the config, data and the storage holding it,
    /// device, a checkpoint that cannot serve the run, a run directory another process holds), 3 when the
    /// supervisor gave up after too many restarts (a crash loop) or on storage that stayed unreachable, 4 when
    /// spike rollbacks did not help, 1 otherwise (a store that did not answer included: rerun when it does).
    pub fn exit_code(&self) -> i32 {
        match self.recovery() {
            Recovery::Never => return 2,
            Recovery::WaitForStorage => return 1,
            Recovery::Restart => {}
        }
        match self {
            Error::Config(_) | Error::Data(_) | Error::Device(_) | Error::Plan(_) => 2,
            Error::Launch(e) => e.exit_code(),
            Error::SpikeGaveUp(_) => 4,
            Error::Export(e) => e.exit_code(),
            Error::Torch(_)
            | Error::Io { .. }
            | Error::Ckpt(_)
            | Error::RunLock(_)
            | Error::Comm(_)
            | Error::Diverged { .. }
            | Error::PreemptedUncommitted { .. }
            | Error::Anomaly(_) => 1,
        }
    }
}

/// What a restart can do about a failure (see [`Error::recovery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Recovery {
    /// A restart may fix it: a crash, a libtorch failure, a lost peer. Counted against
    /// `launch.max_restarts`.
    Restart,
    /// The storage holding the corpus or the checkpoints does not answer: wait until it does, then restart
    /// from the newest committed checkpoint (not counted as a crash; bounded by `launch.storage_wait_s`).
    WaitForStorage,
    /// A restart would fail the same way: the input is the user's to fix.
    Never,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
