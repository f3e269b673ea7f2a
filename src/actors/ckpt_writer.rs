//! The checkpoint writer: one per rank, so that saving never blocks the training loop.
//!
//! At a checkpoint step the training thread copies its state to host memory and hands the copy to this actor
//! ([`Checkpointer::submit`]); training goes on while the actor serializes the rank's file, makes it durable,
//! and votes in the two-phase commit by writing an ack beside it (see [`crate::ckpt::store`]). On the
//! leader the same call also hands the commit to the [`super::ckpt_coordinator`], which waits for every
//! rank's vote and publishes the checkpoint.
//!
//! Failure meaning: a write that fails is reported as [`CkptEvent::WriteFailed`] and voted as a failure, so
//! the coordinator abandons that checkpoint at once; training continues and the previous checkpoint stays the
//! one to resume from. The part-written file is removed, and on the leader the coordinator hears of the
//! failure in process ([`LocalVotes`]) as well as through the store: a full disk cannot take even the "no"
//! vote, and the coordinator must not wait out `checkpoint.timeout_s` for it (with training stalled behind
//! it). The actor itself only fails if its runtime goes away, which ends the process.
//!
//! At most one checkpoint per rank is in flight: submitting the next one first waits for the previous one
//! (that wait is part of the measured stall), which bounds host memory to one copy of the state. Where the
//! previous one is still in flight on any rank a while after the next is due (a slow or stalled store), the
//! training loop does not take the next one at all ([`Checkpointer::in_flight`]), unless it is a
//! preemption's or the run's last.

use super::ckpt_coordinator::{CkptCoordinator, CoordinatorArgs, CoordinatorMsg};
use crate::ckpt::manifest::Manifest;
use crate::ckpt::retention::RetentionPolicy;
use crate::ckpt::store::{Ack, CkptStore};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;

/// What happened to a checkpoint, as the training thread hears of it.
#[derive(Debug, Clone, PartialEq)]
pub enum CkptEvent {
    /// This rank's file is durable and voted for.
    Written { step: u64, secs: f64 },
    /// This rank could not write its file; the checkpoint will not commit.
    WriteFailed { step: u64, reason: String },
    /// (Leader) every rank voted and the checkpoint is published.
    Committed { step: u64, location: String, secs: f64, removed: Vec<u64>, bytes: u64 },
    /// (Leader) the checkpoint was given up: a rank failed or the votes did not arrive in time.
    Abandoned { step: u64, reason: String },
}

/// One rank's share of a checkpoint: host copies of its tensors and where they go.
pub struct SaveJob {
    pub step: u64,
    /// The stage every rank of this attempt writes into ([`CkptStore::stage_name`]).
    pub stage: String,
    pub rank: usize,
    /// Host copies, owned by the job: training may change the originals meanwhile.
    pub tensors: Vec<(String, Tensor)>,
}

/// The leader's commit of a checkpoint: the manifest without its file list, which the votes provide.
pub struct CommitJob {
    pub stage: String,
    pub manifest: Manifest,
    pub world: usize,
    /// How long to wait for every vote before abandoning the checkpoint.
    pub timeout: Duration,
}

pub enum WriterMsg {
    Save(SaveJob),
}

/// "No" votes of the leader's own writer, handed to the coordinator in process: `(stage, rank, reason)`.
/// The coordinator takes its stage's entry when it gives that checkpoint up.
pub type LocalVotes = Arc<std::sync::Mutex<Vec<(String, usize, String)>>>;

pub struct CkptWriter;

pub struct WriterState {
    store: Arc<CkptStore>,
    events: mpsc::Sender<CkptEvent>,
    /// On the leader: where its failed votes go for the coordinator.
    local_votes: Option<LocalVotes>,
}

impl Actor for CkptWriter {
    type Msg = WriterMsg;
    type State = WriterState;
    type Arguments = WriterState;

    async fn pre_start(
        &self,
        _myself: ActorRef<WriterMsg>,
        args: WriterState,
    ) -> Result<WriterState, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<WriterMsg>,
        msg: WriterMsg,
        state: &mut WriterState,
    ) -> Result<(), ActorProcessingErr> {
        let WriterMsg::Save(job) = msg;
        let store = state.store.clone();
        let t0 = Instant::now();
        let (step, stage, rank) = (job.step, job.stage.clone(), job.rank);
        // Blocking file and network I/O runs off the async workers.
        let result = tokio::task::spawn_blocking(move || write_and_vote(&store, job)).await;
        let event = match result {
            Ok(Ok(())) => CkptEvent::Written { step, secs: t0.elapsed().as_secs_f64() },
            Ok(Err(reason)) => {
                // Vote "no" so the coordinator gives up at once instead of waiting out its deadline.
                if let Some(votes) = &state.local_votes {
                    votes.lock().unwrap_or_else(|p| p.into_inner()).push((stage.clone(), rank, reason.clone()));
                }
                let ack = Ack { rank, file: None, error: Some(reason.clone()) };
                if crate::chaos::failpoint("ckpt.no_vote").is_ok() {
                    let _ = state.store.write_ack(&stage, &ack);
                }
                CkptEvent::WriteFailed { step, reason }
            }
            Err(e) => CkptEvent::WriteFailed { step, reason: format!("the writer task failed: {e}") },
        };
        let _ = state.events.send(event);
        Ok(())
    }
}

fn write_and_vote(store: &CkptStore, job: SaveJob) -> Result<(), String> {
    crate::chaos::failpoint("ckpt.write").map_err(|e| e.to_string())?;
    if crate::chaos::any_armed() {
        crate::chaos::failpoint(&format!("ckpt.write.rank{}.step{}", job.rank, job.step)).map_err(|e| e.to_string())?;
    }
    let file = if job.tensors.is_empty() {
        None
    } else {
        let e = store.write_rank_file(&job.stage, job.rank, &job.tensors).map_err(|e| e.to_string())?;
        Some((e.name, e.bytes, e.xxh3))
    };
    crate::chaos::failpoint("ckpt.before_ack").map_err(|e| e.to_string())?;
    store.write_ack(&job.stage, &Ack { rank: job.rank, file, error: None }).map_err(|e| e.to_string())
}

/// The training thread's handle on its rank's writer (and, on the leader, the coordinator). It owns the
/// small runtime the actors run on, so it works the same in `tessera train` and inside a worker.
pub struct Checkpointer {
    writer: ActorRef<WriterMsg>,
    coordinator: Option<ActorRef<CoordinatorMsg>>,
    events: mpsc::Receiver<CkptEvent>,
    /// Events still expected for submitted jobs, and when the newest was submitted.
    outstanding: usize,
    submitted: Option<Instant>,
    /// The runtime the actors run on, owned so that it lives exactly as long as this handle.
    rt: Option<tokio::runtime::Runtime>,
    /// Tells a commit in progress that this handle is gone.
    cancel: Arc<std::sync::atomic::AtomicBool>,
    pub store: Arc<CkptStore>,
}

impl Checkpointer {
    /// Starts this rank's writer, and on the leader the coordinator applying `retention` after each commit.
    ///
    /// # Errors
    /// If the runtime or the actors cannot start (out of threads).
    pub fn start(store: Arc<CkptStore>, leader: bool, retention: RetentionPolicy) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tessera-ckpt")
            .enable_all()
            .build()?;
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, events) = mpsc::channel();
        let spawn_err = |e: ractor::SpawnErr| std::io::Error::other(e.to_string());
        let local_votes = leader.then(LocalVotes::default);
        let (writer, coordinator) = rt.block_on(async {
            let args = WriterState { store: store.clone(), events: tx.clone(), local_votes: local_votes.clone() };
            let (writer, _) = Actor::spawn(None, CkptWriter, args).await.map_err(spawn_err)?;
            let coordinator = if leader {
                let args = CoordinatorArgs {
                    store: store.clone(),
                    events: tx,
                    retention,
                    cancel: cancel.clone(),
                    local_votes: local_votes.unwrap_or_default(),
                };
                Some(Actor::spawn(None, CkptCoordinator, args).await.map_err(spawn_err)?.0)
            } else {
                None
            };
            Ok::<_, std::io::Error>((writer, coordinator))
        })?;
        Ok(Checkpointer { writer, coordinator, events, outstanding: 0, submitted: None, rt: Some(rt), cancel, store })
    }

    /// Hands a checkpoint to the actors and returns at once. Call [`Checkpointer::wait`] first to keep one
    /// checkpoint in flight.
    pub fn submit(&mut self, job: SaveJob, commit: Option<CommitJob>) {
        self.submitted = Some(Instant::now());
        if let (Some(c), Some(coordinator)) = (commit, &self.coordinator) {
            self.outstanding += 1;
            let _ = coordinator.cast(CoordinatorMsg::Commit(c));
        }
        self.outstanding += 1;
        let _ = self.writer.cast(WriterMsg::Save(job));
    }

    /// Whether a submitted job has not ended yet, as of the last [`Checkpointer::poll`] or wait.
    pub fn in_flight(&self) -> bool {
        self.outstanding > 0
    }

    /// How long the checkpoint in flight has been (`None` when none is).
    pub fn in_flight_for(&self) -> Option<Duration> {
        self.submitted.filter(|_| self.in_flight()).map(|t| t.elapsed())
    }

    /// Events so far, without waiting.
    pub fn poll(&mut self) -> Vec<CkptEvent> {
        let got: Vec<CkptEvent> = self.events.try_iter().collect();
        self.outstanding -= got.len().min(self.outstanding);
        got
    }

    /// Waits until every submitted job has ended (written or failed, committed or abandoned), returning the
    /// events.
    pub fn wait(&mut self) -> Vec<CkptEvent> {
        self.wait_until(None)
    }

    /// As [`Checkpointer::wait`], but for at most `limit`: what is still in flight then stays in flight.
    pub fn wait_for(&mut self, limit: Duration) -> Vec<CkptEvent> {
        self.wait_until(Some(Instant::now() + limit))
    }

    fn wait_until(&mut self, deadline: Option<Instant>) -> Vec<CkptEvent> {
        let mut got = vec![];
        while self.outstanding > 0 {
            let next = match deadline {
                None => self.events.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(d) => self.events.recv_timeout(d.saturating_duration_since(Instant::now())),
            };
            match next {
                Ok(e) => {
                    self.outstanding -= 1;
                    got.push(e);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                // The actors are gone: nothing more will come.
                Err(mpsc::RecvTimeoutError::Disconnected) => self.outstanding = 0,
            }
        }
        got
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.writer.stop(None);
        if let Some(c) = &self.coordinator {
            c.stop(None);
        }
        // A commit still waiting for votes (a rank died before voting) must not hold the process for
        // checkpoint.timeout_s: its stage is left for the next start to clean up, which the two-phase commit
        // is built for. After a normal run nothing is in flight (`wait` came first).
        self.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
