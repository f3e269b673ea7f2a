//! One actor per rank process, in the launcher: it starts the worker process and reports its exit.
//!
//! It outlives the gang that started it: a process reset in place (its rank survived another's failure)
//! is handed to the next gang, which points the actor at itself ([`RankProcessMsg::SetGang`]). Failing to
//! start the process fails the actor's start (the gang stops the run: a worker that cannot start is a set-up
//! error). When the process exits, the actor tells the current gang how (exit code or signal) and stops.
//! Stopping the actor kills a process that is still running, so the launcher never leaves orphans behind.
//! On nodes other than 0 the node agent owns the processes instead of a gang ([`Owner::Agent`]).

use super::gang::GangMsg;
use super::node_agent::NodeAgentMsg;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How one node starts its rank processes, gang after gang: the same binary, arguments, world and secret.
#[derive(Clone)]
pub struct NodeRanks {
    pub exe: PathBuf,
    /// `worker --config … --set …`.
    pub worker_args: Vec<OsString>,
    pub world: usize,
    /// Global rank of this node's first process.
    pub first_rank: usize,
    pub nproc: usize,
    pub secret: String,
}

impl NodeRanks {
    /// `rank`'s index on this node, if it runs here.
    pub fn local(&self, rank: usize) -> Option<usize> {
        rank.checked_sub(self.first_rank).filter(|&l| l < self.nproc)
    }

    /// Starts local rank `local`'s process, to join the rendezvous at `rdzv`; `owner` hears how it ends. Not
    /// linked to the caller: a process that survives a gang must outlive it.
    ///
    /// # Errors
    /// The process cannot be started.
    pub async fn start(
        &self,
        local: usize,
        rdzv: std::net::SocketAddr,
        owner: Owner,
    ) -> Result<ActorRef<RankProcessMsg>, ractor::SpawnErr> {
        let rank = self.first_rank + local;
        let env = crate::launch::WorkerEnv {
            rdzv,
            secret: self.secret.clone(),
            rank,
            world: self.world,
            local_rank: local,
            launcher: Some(std::process::id()),
        }
        .vars();
        let args = RankProcessArgs { rank, exe: self.exe.clone(), args: self.worker_args.clone(), env, owner };
        Actor::spawn(None, RankProcess, args).await.map(|(p, _)| p)
    }
}

/// How to start one rank.
pub struct RankProcessArgs {
    pub rank: usize,
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub owner: Owner,
}

/// Who hears how the process ended.
#[derive(Clone)]
pub enum Owner {
    /// The gang it belongs to now (node 0, or a single node).
    Gang(ActorRef<GangMsg>),
    /// The node agent of another node, which tells node 0; it knows the process by its actor's id.
    Agent(ActorRef<NodeAgentMsg>),
}

impl Owner {
    fn exited(&self, rank: usize, process: ractor::ActorId, success: bool, how: String) {
        // Either may have stopped already: then nobody needs to hear it.
        match self {
            Owner::Gang(g) => drop(g.cast(GangMsg::Exited { rank, success, how })),
            Owner::Agent(a) => drop(a.cast(NodeAgentMsg::Exited { rank, process, success, how })),
        }
    }
}

pub struct RankProcess;

pub struct RankProcessState {
    pid: Option<u32>,
    /// Set by the waiter as soon as the process is reaped, so `post_stop` never signals a reused pid.
    reaped: Arc<AtomicBool>,
    /// Who the process belongs to now (shared with the waiter, which reports the exit even after this actor
    /// was stopped, killing the process).
    owner: Arc<Mutex<Owner>>,
}

pub enum RankProcessMsg {
    /// The process ended (sent by the waiter task).
    Exited,
    /// The process was reset in place and now belongs to this gang.
    SetGang(ActorRef<GangMsg>),
}

/// Describes how a process ended.
pub fn describe(status: &std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(9)) => "was killed (SIGKILL)".into(),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

impl Actor for RankProcess {
    type Msg = RankProcessMsg;
    type State = RankProcessState;
    type Arguments = RankProcessArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RankProcessMsg>,
        a: RankProcessArgs,
    ) -> Result<RankProcessState, ActorProcessingErr> {
        let mut cmd = tokio::process::Command::new(&a.exe);
        cmd.args(&a.args).envs(a.env.iter().map(|(k, v)| (k, v))).kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| format!("cannot start rank {} ({}): {e}", a.rank, a.exe.display()))?;
        let pid = child.id();
        let reaped = Arc::new(AtomicBool::new(false));
        let owner = Arc::new(Mutex::new(a.owner));
        let (flag, told, rank, id) = (reaped.clone(), owner.clone(), a.rank, myself.get_id());
        tokio::spawn(async move {
            let status = child.wait().await;
            flag.store(true, Ordering::SeqCst);
            let (success, how) = match status {
                Ok(s) => (s.success(), describe(&s)),
                Err(e) => (false, format!("could not be waited for: {e}")),
            };
            if let Ok(o) = told.lock() {
                o.exited(rank, id, success, how);
            }
            let _ = myself.cast(RankProcessMsg::Exited);
        });
        Ok(RankProcessState { pid, reaped, owner })
    }

    async fn handle(
        &self,
        myself: ActorRef<RankProcessMsg>,
        msg: RankProcessMsg,
        state: &mut RankProcessState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RankProcessMsg::Exited => {
                state.pid = None;
                myself.stop(None);
            }
            RankProcessMsg::SetGang(gang) => {
                if let Ok(mut o) = state.owner.lock() {
                    *o = Owner::Gang(gang);
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<RankProcessMsg>,
        state: &mut RankProcessState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(pid) = state.pid.take().filter(|_| !state.reaped.load(Ordering::SeqCst)) {
            // SAFETY: signalling our own child by pid; harmless if it has just exited.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        Ok(())
    }
}
