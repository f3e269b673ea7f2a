//! Actors (ractor on tokio): who runs what, and who supervises whom.
//!
//! ```text
//! launcher process                              worker process (one per rank)
//! ----------------                              -----------------------------
//! Supervisor (root: restart intensity, rollback) Rank (root of the worker; heartbeats every 200 ms)
//!  └─ Gang (one per attempt) ──────┐              ├─ training thread (tensor work, collectives)
//!      ├─ RankProcess 0            │ control      ├─ control reader thread (Abort, launcher gone)
//!      ├─ RankProcess 1            │<───────────> ├─ CkptWriter (every rank: writes, votes)
//!      └─ RankProcess N-1          │ channel      ├─ CkptCoordinator (rank 0: commits, retention)
//! MetricsExporter (GET /metrics)                  └─ SpikeDetector (rank 0: judges every step)
//!
//! launcher of node 1, 2, ... (--nnodes > 1)
//! NodeAgent (enlisted with node 0's Supervisor; starts, kills and watches its node's ranks on its word)
//!  └─ RankProcess k·N ... k·N+N-1 (their control channels go to node 0's Gang)
//! ```
//! The control channel carries postcard frames, HMAC-authenticated at the rendezvous.
//!
//! Failure meanings and policies:
//! - [`supervisor::Supervisor`]: the launch's root. When its gang fails recoverably (a rank crashed, was
//!   killed, or hung) it starts the next gang, which keeps the healthy ranks' processes (reset in place, they
//!   join its rendezvous, bound in advance) and replaces the culprits', and resumes from the newest committed
//!   checkpoint (the same data order); more than `launch.max_restarts` restarts within `launch.restart_window_s` stops the launch (exit
//!   code 3). Unrecoverable failures (a worker that cannot be started) stop it at once. Decisions are the
//!   pure functions of [`policy`].
//! - [`gang::Gang`]: serves the rendezvous, watches every rank's control channel, heartbeats and process; on
//!   a failure it kills the culprits at once, tells every other rank to reset in place (their in-flight
//!   collectives fail fast; unrecoverable failures abort everyone instead), kills ranks that do not
//!   acknowledge within 5 s, hands the survivors' processes to the supervisor, and reports the culprit: a process that died; a rank whose heartbeat stopped, or that never entered
//!   the collective the others wait in (after `launch.hang_timeout_s`); or a rank that reported an error (after
//!   0.5 s, unless a process died meanwhile, which is then blamed instead). Its own failure ends the launch.
//! - [`node_agent::NodeAgent`]: on nodes other than 0, the launcher: enlists with node 0's supervisor (the
//!   run's one root), reports how its processes end, and replaces the culprits when node 0 says a gang forms.
//!   It ends with node 0's outcome; if node 0's launcher goes away it kills its ranks and fails, and if it
//!   goes away itself node 0 stops the run.
//! - [`rank_process::RankProcess`]: starts one worker process and reports how it exited to the gang it
//!   currently belongs to (it outlives a gang when its rank is reset in place); stopping it kills the process.
//!   Failing to start fails its start, which the gang treats as a set-up error.
//! - [`ckpt_writer::CkptWriter`]: in every training process, writes the rank's share of a checkpoint off the
//!   training thread and votes in the two-phase commit. A failed write votes "no": that checkpoint is
//!   abandoned, training goes on.
//! - [`ckpt_coordinator::CkptCoordinator`]: beside rank 0, waits for every vote, commits, applies retention.
//!   A missing vote past its deadline abandons the checkpoint; a crash leaves the old or the new one.
//! - [`spike_detector::SpikeDetector`]: beside rank 0, judges every step's global and per-rank numbers; a
//!   spike or faulty rank stops the loop at that step, and rank 0 reports it (`WorkerMsg::Anomaly`); the
//!   supervisor rolls back ([`crate::spike::rollback`]): to the newest clean checkpoint, with a fresh data order
//!   for a spike, without for a faulty rank (whose process is replaced). Repeats escalate; past
//!   `spike.max_repeats` the launch stops (exit code 4). If the actor is gone, training goes on unjudged.
//! - [`metrics_exporter::MetricsExporter`]: serves the launcher's Prometheus metrics; if it cannot listen, the
//!   run goes on without an endpoint.
//! - [`rank::RankActor`]: inside a worker, one per gang the process belongs to: runs training on a dedicated
//!   thread, sends heartbeats (step, phase, collective number) and progress, and turns an `Abort` (or the
//!   launcher vanishing) into a communicator abort so the process exits promptly, or a `Reset` into one so
//!   the process joins the next gang. After a training error it waits (15 s at most) for the launcher to say
//!   which: the error is usually a peer's death seen through a collective.

pub mod ckpt_coordinator;
pub mod ckpt_writer;
pub mod gang;
pub mod metrics_exporter;
pub mod node_agent;
pub mod policy;
pub mod rank;
pub mod rank_process;
pub mod spike_detector;
pub mod supervisor;
