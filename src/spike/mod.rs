//! Loss spikes: detecting them ([`detector`]) and deciding how to roll back ([`rollback`]). Both are pure;
//! the [`crate::actors::spike_detector`] actor feeds the detector every step, and the launcher's supervisor
//! (or `tessera train`) carries out the rollback plan.

pub mod detector;
pub mod rollback;

pub use detector::{Detector, DetectorConfig, DetectorState, StepStats, Tag, Verdict};
pub use rollback::{Anomaly, Directive, Plan, RollbackConfig};
