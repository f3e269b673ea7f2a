//! The spike-detector actor: beside rank 0 (in `tessera train` and in the leader of a launched gang), fed
//! every step's global loss and gradient norm and each rank's local ones (which every rank has after the
//! gather at each reading, `train.read_every`), in step order, judging them with [`crate::spike::Detector`].
//!
//! The training loop asks it about each step read and stops at the reading where an anomaly is declared;
//! the anomaly names its step, which is as deterministic as the losses; the launcher's supervisor (or `tessera train`) then plans and
//! carries out the rollback ([`crate::spike::rollback`]). A checkpoint asks it for its view ([`Tag`]) and
//! state, which go into the manifest: the rollback target must be clean, and a resumed run judges as the
//! original would have.
//!
//! Failure meaning: the actor only does arithmetic; if it is gone (its runtime ended), the loop treats the
//! step as not judged and training goes on without detection, with a warning.

use crate::spike::{Detector, DetectorConfig, DetectorState, StepStats, Tag, Verdict};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

pub enum DetectorMsg {
    /// Judge a step and learn from it.
    Observe(StepStats, RpcReplyPort<Verdict>),
    /// The view and state a checkpoint taken now records.
    Snapshot(RpcReplyPort<(Tag, DetectorState)>),
}

pub struct SpikeDetector;

impl Actor for SpikeDetector {
    type Msg = DetectorMsg;
    type State = Detector;
    type Arguments = Detector;

    async fn pre_start(&self, _myself: ActorRef<DetectorMsg>, d: Detector) -> Result<Detector, ActorProcessingErr> {
        Ok(d)
    }

    async fn handle(
        &self,
        _myself: ActorRef<DetectorMsg>,
        msg: DetectorMsg,
        d: &mut Detector,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DetectorMsg::Observe(stats, reply) => {
                let _ = reply.send(d.observe(&stats));
            }
            DetectorMsg::Snapshot(reply) => {
                let _ = reply.send((d.tag(), d.state.clone()));
            }
        }
        Ok(())
    }
}

/// The training thread's handle on the detector. It owns the small runtime the actor runs on.
pub struct SpikeHandle {
    actor: ActorRef<DetectorMsg>,
    rt: tokio::runtime::Runtime,
}

impl SpikeHandle {
    /// Starts the detector, resuming `state` when a checkpoint had one.
    ///
    /// # Errors
    /// If the runtime or the actor cannot start (out of threads).
    pub fn start(config: DetectorConfig, state: Option<DetectorState>) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tessera-spike")
            .enable_all()
            .build()?;
        let detector = Detector::with_state(config, state.unwrap_or_default());
        let (actor, _) = rt
            .block_on(Actor::spawn(None, SpikeDetector, detector))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(SpikeHandle { actor, rt })
    }

    /// Judges one step (`None` if the actor is gone).
    pub fn observe(&self, stats: StepStats) -> Option<Verdict> {
        let actor = self.actor.clone();
        self.rt.block_on(async move { success(actor.call(|r| DetectorMsg::Observe(stats, r), None).await.ok()?) })
    }

    /// The view and state to record in a checkpoint taken now.
    pub fn snapshot(&self) -> Option<(Tag, DetectorState)> {
        let actor = self.actor.clone();
        self.rt.block_on(async move { success(actor.call(DetectorMsg::Snapshot, None).await.ok()?) })
    }
}

impl Drop for SpikeHandle {
    fn drop(&mut self) {
        self.actor.stop(None);
    }
}

/// A call's answer, if it was answered.
fn success<T>(r: ractor::rpc::CallResult<T>) -> Option<T> {
    match r {
        ractor::rpc::CallResult::Success(v) => Some(v),
        _ => None,
    }
}
