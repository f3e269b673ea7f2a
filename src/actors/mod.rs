//! Actors (ractor on tokio): who runs what, and who supervises whom.
//!
//! ```text
//! launcher process                          worker process (one per rank)
//! ----------------                          -----------------------------
//! Gang ───────────────┐                     Rank (root of the worker)
//!  ├─ RankProcess 0   │ control channel      ├─ training thread (tensor work, collectives)
//!  ├─ RankProcess 1   │<───────────────────> └─ control reader thread (Abort, launcher gone)
//!  └─ RankProcess N-1 │  (postcard frames,     ├─ CkptWriter (every rank: writes, votes)
//!                     │   HMAC-authenticated)  └─ CkptCoordinator (rank 0: commits, retention)
//! ```
//!
//! - [`gang::Gang`]: serves the rendezvous, watches every rank's control channel and process; on any failure
//!   aborts the gang and reports the culprit. Its own failure ends the launch.
//! - [`rank_process::RankProcess`]: starts one worker process and reports how it exited; stopping it kills the
//!   process. Failing to start fails it, which the gang treats as a set-up error.
//! - [`ckpt_writer::CkptWriter`]: in every training process, writes the rank's share of a checkpoint off the
//!   training thread and votes in the two-phase commit. A failed write votes "no": that checkpoint is
//!   abandoned, training goes on.
//! - [`ckpt_coordinator::CkptCoordinator`]: beside rank 0, waits for every vote, commits, applies retention.
//!   A missing vote past its deadline abandons the checkpoint; a crash leaves the old or the new one.
//! - [`rank::RankActor`]: inside a worker, runs training on a dedicated thread, forwards progress, and turns
//!   an `Abort` (or the launcher vanishing) into a communicator abort so the process exits promptly.

pub mod ckpt_coordinator;
pub mod ckpt_writer;
pub mod gang;
pub mod rank;
pub mod rank_process;
