//! Actors (ractor on tokio): who runs what, and who supervises whom.
//!
//! ```text
//! launcher process                          worker process (one per rank)
//! ----------------                          -----------------------------
//! Gang ───────────────┐                     Rank (root of the worker)
//!  ├─ RankProcess 0   │ control channel      ├─ training thread (tensor work, collectives)
//!  ├─ RankProcess 1   │<───────────────────> └─ control reader thread (Abort, launcher gone)
//!  └─ RankProcess N-1 │  (postcard frames,
//!                     │   HMAC-authenticated)
//! ```
//!
//! - [`gang::Gang`]: serves the rendezvous, watches every rank's control channel and process; on any failure
//!   aborts the gang and reports the culprit. Its own failure ends the launch.
//! - [`rank_process::RankProcess`]: starts one worker process and reports how it exited; stopping it kills the
//!   process. Failing to start fails it, which the gang treats as a set-up error.
//! - [`rank::RankActor`]: inside a worker, runs training on a dedicated thread, forwards progress, and turns
//!   an `Abort` (or the launcher vanishing) into a communicator abort so the process exits promptly.

pub mod gang;
pub mod rank;
pub mod rank_process;
