//! One actor per rank process, in the launcher: it starts the worker process and reports its exit.
//!
//! It outlives the gang that started it: a process reset in place (its rank survived another's failure)
//! is handed to the next gang, which points the actor at itself ([`RankProcessMsg::SetGang`]). Failing to
//! start the process fails the actor's start (the gang stops the run: a worker that cannot start is a set-up
//! error). When the process exits, the actor tells the current gang how (exit code or signal) and stops.
//! Stopping the actor kills a process that is still running, so the launcher never leaves orphans behind.

use super::gang::GangMsg;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How to start one rank.
pub struct RankProcessArgs {
    pub rank: usize,
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub gang: ActorRef<GangMsg>,
}

pub struct RankProcess;

pub struct RankProcessState {
    pid: Option<u32>,
    /// Set by the waiter as soon as the process is reaped, so `post_stop` never signals a reused pid.
    reaped: Arc<AtomicBool>,
    /// The gang the process belongs to now (shared with the waiter, which reports the exit even after this
    /// actor was stopped, killing the process).
    gang: Arc<Mutex<ActorRef<GangMsg>>>,
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
        let gang = Arc::new(Mutex::new(a.gang));
        let (flag, owner, rank) = (reaped.clone(), gang.clone(), a.rank);
        tokio::spawn(async move {
            let status = child.wait().await;
            flag.store(true, Ordering::SeqCst);
            let (success, how) = match status {
                Ok(s) => (s.success(), describe(&s)),
                Err(e) => (false, format!("could not be waited for: {e}")),
            };
            if let Ok(g) = owner.lock() {
                let _ = g.cast(GangMsg::Exited { rank, success, how });
            }
            let _ = myself.cast(RankProcessMsg::Exited);
        });
        Ok(RankProcessState { pid, reaped, gang })
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
                if let Ok(mut g) = state.gang.lock() {
                    *g = gang;
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
