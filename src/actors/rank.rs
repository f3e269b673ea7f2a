//! The rank actor: one per gang a worker process belongs to. Supervised by nothing inside the worker (it is
//! the worker's root); the launcher's gang supervises the process from outside. Its failure means this rank's
//! attempt ended with an error, which it reports to the launcher; the launcher then either aborts it (the
//! process exits non-zero) or resets it in place ([`Outcome::Reset`]: the worker joins the next gang in the
//! same process).
//!
//! The training loop runs on a dedicated thread (tensor work must never block the async runtime) and talks
//! to the actor by messages: progress to forward, and its final result. A second thread reads the launcher's
//! control channel: an `Abort`, or the channel closing (the launcher died), aborts the communicator so the
//! training thread's current collective fails at once and the process exits instead of lingering as an
//! orphan.

use crate::comm::tcp::TcpRing;
use crate::comm::{nccl, AbortHandle, Communicator};
use crate::config::DeviceSpec;
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::launch::protocol::{self, LauncherMsg, WorkerMsg};
use crate::launch::{LaunchError, WorkerEnv};
use crate::train::{Beat, TrainOptions, Trainer};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Everything a rank needs once it has joined its gang.
pub struct RankArgs {
    pub cfg: RunConfig,
    pub env: WorkerEnv,
    /// Control channel to the launcher (after the rendezvous).
    pub control: TcpStream,
    /// This rank's communicator listener (its address was sent to the peers).
    pub listener: TcpListener,
    /// Every rank's communicator address.
    pub peers: Vec<SocketAddr>,
}

pub enum RankMsg {
    /// The communicator is up; keep its abort handle.
    Connected(AbortHandle),
    /// A logged step, to forward to the launcher.
    Send(WorkerMsg),
    /// The training thread ended: steps and final loss, or the error and what a restart can do about it
    /// ([`crate::Error::recovery`]).
    Finished(std::result::Result<(u64, f64), (String, crate::error::Recovery)>),
    /// The launcher asked to stop, or its channel closed.
    Abort(String),
    /// The launcher's control channel closed: abort, and exit after a grace period whatever training does.
    LauncherGone(String),
    /// The launcher is gone and training did not end by itself in time: exit the process.
    ForceExit,
    /// Time to tell the launcher this process lives, and where training is.
    Heartbeat,
    /// Preemption: checkpoint at a step all ranks agree on, and stop.
    Preempt,
    /// Another rank failed: end this attempt and rejoin the next gang at this address (reset in place).
    Reset(SocketAddr),
    /// No decision came from the launcher in time after this rank's failure: exit.
    Undecided,
}

/// How long a rank whose training failed waits for the launcher to reset or abort it before exiting.
const DECISION_WAIT: Duration = Duration::from_secs(15);

/// How a rank's attempt ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Training finished (or stopped for preemption).
    Done,
    /// Reset in place: join the next gang's rendezvous at this address.
    Reset(SocketAddr),
}

/// How long a worker whose launcher vanished waits for its training thread to notice before exiting anyway.
const ORPHAN_GRACE: Duration = Duration::from_secs(10);

pub struct RankActor;

pub struct RankState {
    control: TcpStream,
    beat: Arc<Beat>,
    abort: Option<AbortHandle>,
    aborted: Option<String>,
    /// Where to rejoin after a reset.
    reset: Option<SocketAddr>,
    /// Training failed (reported); waiting for the launcher to reset or abort this rank.
    failed: Option<String>,
    outcome: Option<oneshot::Sender<Result<Outcome>>>,
}

pub struct Start {
    args: RankArgs,
    outcome: oneshot::Sender<Result<Outcome>>,
}

impl Actor for RankActor {
    type Msg = RankMsg;
    type State = RankState;
    type Arguments = Start;

    async fn pre_start(
        &self,
        myself: ActorRef<RankMsg>,
        start: Start,
    ) -> std::result::Result<RankState, ActorProcessingErr> {
        let Start { args, outcome } = start;
        let RankArgs { cfg, env, control, listener, peers } = args;
        // Control reader: abort on request or when the launcher goes away.
        let mut reader = control.try_clone()?;
        let me = myself.clone();
        let rdzv_host = env.rdzv.ip();
        std::thread::Builder::new().name("tessera-control".into()).spawn(move || loop {
            match protocol::recv::<LauncherMsg, _>(&mut reader) {
                Ok(LauncherMsg::Abort { reason }) => {
                    let _ = me.cast(RankMsg::Abort(reason));
                    return;
                }
                Ok(LauncherMsg::Preempt) => {
                    let _ = me.cast(RankMsg::Preempt);
                }
                Ok(LauncherMsg::Reset { port }) => {
                    let _ = me.cast(RankMsg::Reset(SocketAddr::new(rdzv_host, port)));
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = me.cast(RankMsg::LauncherGone(format!("the launcher's control channel closed ({e})")));
                    return;
                }
            }
        })?;
        // Heartbeats come from this actor, not the training thread: a rank stuck in a collective still beats
        // (and its collective number tells where it is stuck); a stopped or dead process does not.
        let beat = Arc::new(Beat::default());
        let _ = myself.cast(RankMsg::Heartbeat);
        myself.send_interval(protocol::HEARTBEAT, || RankMsg::Heartbeat);
        // Training thread.
        let me = myself.clone();
        let shared = beat.clone();
        std::thread::Builder::new().name(format!("tessera-rank-{}", env.rank)).spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| train(cfg, &env, listener, &peers, &me, shared));
            let result = match std::panic::catch_unwind(run) {
                Ok(Err(Error::Anomaly(a))) => {
                    // Said first, so the launcher rolls back instead of treating it as a crash.
                    let error = a.to_string();
                    let _ = me.cast(RankMsg::Send(WorkerMsg::Anomaly(*a)));
                    Err((error, crate::error::Recovery::Restart))
                }
                Ok(r) => r.map_err(|e| (e.to_string(), e.recovery())),
                Err(p) => Err((
                    format!(
                        "the training thread panicked: {}",
                        crate::train::step::panic_text(p.as_ref()).unwrap_or_default()
                    ),
                    crate::error::Recovery::Restart,
                )),
            };
            let _ = me.cast(RankMsg::Finished(result));
        })?;
        Ok(RankState { control, beat, abort: None, aborted: None, reset: None, failed: None, outcome: Some(outcome) })
    }

    async fn handle(
        &self,
        myself: ActorRef<RankMsg>,
        msg: RankMsg,
        state: &mut RankState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match msg {
            RankMsg::Connected(handle) => {
                if state.aborted.is_some() {
                    handle.abort();
                }
                state.abort = Some(handle);
            }
            RankMsg::Send(msg) => {
                let _ = protocol::send(&mut state.control, &msg);
            }
            RankMsg::Heartbeat => {
                let b = &state.beat;
                let msg = WorkerMsg::Heartbeat {
                    step: b.step.load(Ordering::Relaxed),
                    seq: b.seq.load(Ordering::Relaxed),
                    phase: b.phase.load(Ordering::Relaxed),
                };
                let _ = protocol::send(&mut state.control, &msg);
            }
            RankMsg::Preempt => state.beat.stop.store(true, Ordering::Relaxed),
            RankMsg::Reset(next) if state.failed.is_some() => {
                // Its failure was a symptom (a peer died under its collective): keep the process.
                let _ = state.control.shutdown(std::net::Shutdown::Both);
                if let Some(tx) = state.outcome.take() {
                    let _ = tx.send(Ok(Outcome::Reset(next)));
                }
                myself.stop(None);
            }
            RankMsg::Abort(_) | RankMsg::LauncherGone(_) | RankMsg::Undecided if state.failed.is_some() => {
                let error = state.failed.take().unwrap_or_default();
                if let Some(tx) = state.outcome.take() {
                    let _ = tx.send(Err(LaunchError::Setup(error).into()));
                }
                myself.stop(None);
            }
            RankMsg::Undecided => {}
            RankMsg::Reset(next) => {
                state.reset = Some(next);
                state.aborted.get_or_insert_with(|| "reset in place: another rank failed".into());
                if let Some(h) = &state.abort {
                    h.abort();
                }
            }
            RankMsg::Abort(reason) => {
                if let Some(h) = &state.abort {
                    h.abort();
                }
                state.aborted.get_or_insert(reason);
            }
            RankMsg::LauncherGone(reason) => {
                // Whatever the training thread is doing, a worker without a launcher must not linger. (The
                // timer lives on the actor's runtime, not on the reader thread, which has none.)
                myself.send_after(ORPHAN_GRACE, || RankMsg::ForceExit);
                let _ = myself.cast(RankMsg::Abort(reason));
            }
            RankMsg::ForceExit => {
                let reason = state.aborted.clone().unwrap_or_default();
                let _ = writeln!(std::io::stderr(), "tessera worker: exiting: {reason}");
                crate::exit_now(3);
            }
            RankMsg::Finished(_) if state.reset.is_some() => {
                // Whatever the attempt's end, the launcher has moved on: close the channel (that is the
                // acknowledgement it waits for) and rejoin.
                let _ = state.control.shutdown(std::net::Shutdown::Both);
                if let (Some(tx), Some(next)) = (state.outcome.take(), state.reset) {
                    let _ = tx.send(Ok(Outcome::Reset(next)));
                }
                myself.stop(None);
            }
            RankMsg::Finished(result) => {
                let (msg, outcome) = match result {
                    Ok((steps, final_loss)) => (WorkerMsg::Done { steps, final_loss }, Ok(Outcome::Done)),
                    Err((error, recovery)) => {
                        let error = match &state.aborted {
                            Some(reason) => format!("{error} (aborted: {reason})"),
                            None => error,
                        };
                        (WorkerMsg::Failed { error: error.clone(), recovery }, Err(LaunchError::Setup(error).into()))
                    }
                };
                let _ = protocol::send(&mut state.control, &msg);
                if let (WorkerMsg::Failed { error, .. }, Some(_), None) = (&msg, &state.outcome, &state.aborted) {
                    // Unless it already said (an abort, or it is gone), the launcher decides: a reset (another
                    // rank is to blame) keeps this process.
                    state.failed = Some(error.clone());
                    myself.send_after(DECISION_WAIT, || RankMsg::Undecided);
                    return Ok(());
                }
                if let Some(tx) = state.outcome.take() {
                    let _ = tx.send(outcome);
                }
                myself.stop(None);
            }
        }
        Ok(())
    }
}

/// Connects the communicator and trains (on the training thread).
fn train(
    cfg: RunConfig,
    env: &WorkerEnv,
    listener: TcpListener,
    peers: &[SocketAddr],
    me: &ActorRef<RankMsg>,
    beat: Arc<Beat>,
) -> Result<(u64, f64)> {
    let timeout = Duration::from_secs_f64(cfg.launch.comm_timeout_s);
    let mut ring = TcpRing::connect(env.rank, env.world, listener, peers, env.secret.as_bytes(), timeout)?;
    let comm: Box<dyn Communicator> = match cfg.device {
        // On CUDA the TCP ring only carries NCCL's unique id from rank 0 to the others.
        DeviceSpec::Cuda(i) => {
            let id = if env.rank == 0 { nccl::unique_id()? } else { [0u8; 128] };
            let mut t = tch::Tensor::from_slice(&id.map(i64::from));
            ring.broadcast(&mut t, 0)?;
            let bytes: Vec<i64> = Vec::<i64>::try_from(&t).map_err(Error::Torch)?;
            let id: nccl::UniqueId = std::array::from_fn(|k| bytes[k] as u8);
            crate::device::resolve(DeviceSpec::Cuda(i))?;
            Box::new(nccl::NcclComm::init(env.rank, env.world, &id, tch::Device::Cuda(i), timeout)?)
        }
        _ => Box::new(ring),
    };
    let _ = me.cast(RankMsg::Connected(comm.abort_handle()));
    let mut trainer = Trainer::with_comm(cfg, comm)?;
    if env.rank == 0 {
        let step = trainer.resumed_from.as_ref().map_or(0, |(step, _)| *step);
        let _ = me.cast(RankMsg::Send(WorkerMsg::Resumed { step }));
    }
    trainer.set_beat(beat);
    let progress = me.clone();
    let summary = trainer.run_with(TrainOptions::default(), &mut |event| {
        let msg = WorkerMsg::from(event);
        let _ = progress.cast(RankMsg::Send(msg));
    })?;
    Ok((summary.steps, summary.final_loss))
}

/// Runs the rank actor until training ends or the launcher resets this rank.
///
/// # Errors
/// The training error, or the abort that ended it.
pub async fn run(args: RankArgs) -> Result<Outcome> {
    let (tx, rx) = oneshot::channel();
    let (_actor, handle) = Actor::spawn(None, RankActor, Start { args, outcome: tx })
        .await
        .map_err(|e| Error::Launch(LaunchError::Setup(format!("cannot start the rank actor: {e}"))))?;
    let outcome =
        rx.await.unwrap_or_else(|_| Err(LaunchError::Setup("the rank actor stopped without a result".into()).into()));
    let _ = handle.await;
    outcome
}
