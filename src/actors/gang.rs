//! The gang actor: the launcher's supervisor of one run's rank processes.
//!
//! It starts one [`RankProcess`] actor per local rank (linked, so it hears if one cannot start), serves the
//! rendezvous, then listens to every rank's control channel. The run succeeds when every rank has reported
//! `Done` and exited cleanly. Any rank that fails, exits early or cannot start fails the run: the gang sends
//! every rank `Abort` (their in-flight collectives fail fast), kills what is still running after a grace
//! period, and reports which rank failed and how. (Restarting ranks and rolling back is the next layer's
//! job; this actor's policy today is "stop the gang cleanly and say why".)

use super::rank_process::{RankProcess, RankProcessArgs};
use crate::launch::protocol::{self, LauncherMsg, WorkerMsg};
use crate::launch::rendezvous::{self, Member};
use crate::launch::LaunchError;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;

/// What the launcher asks of the gang.
pub struct GangArgs {
    pub exe: PathBuf,
    /// Arguments for `tessera worker` (config and overrides).
    pub worker_args: Vec<OsString>,
    pub world: usize,
    /// Global rank of this node's first process.
    pub first_rank: usize,
    pub nproc: usize,
    pub secret: String,
    /// The rendezvous listener (node 0 only; `None` on other nodes).
    pub rdzv: Option<tokio::net::TcpListener>,
    pub rdzv_addr: std::net::SocketAddr,
    pub rdzv_timeout: Duration,
    /// Told the run's outcome once, when the gang stops.
    pub outcome: oneshot::Sender<Result<GangReport, LaunchError>>,
}

/// A finished run, as the gang saw it.
#[derive(Debug, Clone)]
pub struct GangReport {
    pub steps: u64,
    pub final_loss: f64,
}

pub enum GangMsg {
    /// The rendezvous finished (node 0).
    Formed(Result<Vec<Member>, LaunchError>),
    /// A message on rank `rank`'s control channel.
    FromRank(usize, WorkerMsg),
    /// Rank `rank`'s control channel closed.
    ChannelClosed(usize),
    /// Rank `rank`'s process ended.
    Exited { rank: usize, success: bool, how: String },
    /// The grace period after an abort is over: kill what still runs.
    KillStragglers,
}

pub struct Gang;

pub struct GangState {
    first_rank: usize,
    nproc: usize,
    writers: Vec<Option<OwnedWriteHalf>>,
    children: Vec<ActorCell>,
    done: Vec<Option<(u64, f64)>>,
    exited: Vec<bool>,
    failure: Option<LaunchError>,
    outcome: Option<oneshot::Sender<Result<GangReport, LaunchError>>>,
}

impl GangState {
    fn local(&self, rank: usize) -> Option<usize> {
        (rank >= self.first_rank && rank < self.first_rank + self.nproc).then(|| rank - self.first_rank)
    }
}

impl Actor for Gang {
    type Msg = GangMsg;
    type State = GangState;
    type Arguments = GangArgs;

    async fn pre_start(&self, myself: ActorRef<GangMsg>, a: GangArgs) -> Result<GangState, ActorProcessingErr> {
        let mut children = vec![];
        for local in 0..a.nproc {
            let rank = a.first_rank + local;
            let env = vec![
                (crate::launch::WorkerEnv::RDZV.to_string(), a.rdzv_addr.to_string()),
                (crate::launch::WorkerEnv::SECRET.to_string(), a.secret.clone()),
                (crate::launch::WorkerEnv::RANK.to_string(), rank.to_string()),
                (crate::launch::WorkerEnv::WORLD.to_string(), a.world.to_string()),
                (crate::launch::WorkerEnv::LOCAL_RANK.to_string(), local.to_string()),
            ];
            let args =
                RankProcessArgs { rank, exe: a.exe.clone(), args: a.worker_args.clone(), env, gang: myself.clone() };
            let (child, _) = Actor::spawn_linked(None, RankProcess, args, myself.get_cell()).await?;
            children.push(child.get_cell());
        }
        if let Some(listener) = a.rdzv {
            let (secret, world, timeout, me) = (a.secret.clone(), a.world, a.rdzv_timeout, myself.clone());
            tokio::spawn(async move {
                let formed = rendezvous::serve(&listener, secret.as_bytes(), world, timeout, |peer, why| {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "tessera launch: refused a connection from {peer}: {why}");
                })
                .await;
                let _ = me.cast(GangMsg::Formed(formed));
            });
        }
        Ok(GangState {
            first_rank: a.first_rank,
            nproc: a.nproc,
            writers: (0..a.world).map(|_| None).collect(),
            children,
            done: vec![None; a.world],
            exited: vec![false; a.nproc],
            failure: None,
            outcome: Some(a.outcome),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<GangMsg>,
        msg: GangMsg,
        s: &mut GangState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GangMsg::Formed(Ok(members)) => {
                for m in members {
                    let rank = m.join.rank;
                    let (mut read, write) = m.stream.into_split();
                    s.writers[rank] = Some(write);
                    let me = myself.clone();
                    tokio::spawn(async move {
                        loop {
                            match protocol::recv_async::<WorkerMsg, _>(&mut read).await {
                                Ok(msg) => {
                                    let _ = me.cast(GangMsg::FromRank(rank, msg));
                                }
                                Err(_) => {
                                    let _ = me.cast(GangMsg::ChannelClosed(rank));
                                    return;
                                }
                            }
                        }
                    });
                }
            }
            GangMsg::Formed(Err(e)) => self.fail(&myself, s, e).await,
            GangMsg::FromRank(rank, WorkerMsg::Done { steps, final_loss }) => s.done[rank] = Some((steps, final_loss)),
            GangMsg::FromRank(rank, WorkerMsg::Failed { error }) => {
                self.fail(&myself, s, LaunchError::RankFailed { rank, reason: error }).await
            }
            GangMsg::FromRank(_, WorkerMsg::Progress { .. } | WorkerMsg::Join(_)) => {}
            GangMsg::ChannelClosed(_) => {}
            GangMsg::Exited { rank, success, how } => {
                if let Some(local) = s.local(rank) {
                    s.exited[local] = true;
                }
                if !(success && s.done[rank].is_some()) && s.failure.is_none() {
                    let reason = if success { format!("{how} before finishing") } else { how };
                    self.fail(&myself, s, LaunchError::RankFailed { rank, reason }).await;
                }
                if s.exited.iter().all(|&e| e) {
                    self.finish(&myself, s);
                }
            }
            GangMsg::KillStragglers => {
                for c in &s.children {
                    c.stop(Some("grace period over".into()));
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<GangMsg>,
        evt: SupervisionEvent,
        s: &mut GangState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            let local = s.children.iter().position(|c| c.get_id() == cell.get_id()).unwrap_or(0);
            let rank = s.first_rank + local;
            s.exited[local] = true;
            self.fail(&myself, s, LaunchError::Spawn { rank, reason: err.to_string() }).await;
            if s.exited.iter().all(|&e| e) {
                self.finish(&myself, s);
            }
        }
        Ok(())
    }
}

impl Gang {
    /// Records the first failure and stops the gang: abort every rank, kill stragglers after a grace period.
    async fn fail(&self, myself: &ActorRef<GangMsg>, s: &mut GangState, e: LaunchError) {
        if s.failure.is_some() {
            return;
        }
        let reason = e.to_string();
        s.failure = Some(e);
        for w in s.writers.iter_mut().flatten() {
            let _ = protocol::send_async(w, &LauncherMsg::Abort { reason: reason.clone() }).await;
        }
        myself.send_after(Duration::from_secs(5), || GangMsg::KillStragglers);
        // Without a control channel yet (rendezvous failed), nobody can be told: stop the processes now.
        if s.writers.iter().all(Option::is_none) {
            for c in &s.children {
                c.stop(Some("run failed".into()));
            }
        }
    }

    fn finish(&self, myself: &ActorRef<GangMsg>, s: &mut GangState) {
        let result = match s.failure.take() {
            Some(e) => Err(e),
            None => {
                let (steps, final_loss) = s.done.iter().flatten().next().copied().unwrap_or((0, f64::NAN));
                Ok(GangReport { steps, final_loss })
            }
        };
        if let Some(tx) = s.outcome.take() {
            let _ = tx.send(result);
        }
        myself.stop(None);
    }
}
