//! One actor per rank process, in the launcher: it starts the worker process and reports its exit.
//!
//! Supervised by the gang ([`super::gang`]). Failing to start the process fails this actor (the gang stops
//! the run: a worker that cannot start is a set-up error). When the process exits, the actor tells the gang
//! how (exit code or signal) and stops. Stopping the actor kills a process that is still running, so the
//! launcher never leaves orphans behind.

use super::gang::GangMsg;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

pub enum RankProcessMsg {
    /// The process ended (sent by the waiter task).
    Exited,
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
        let (rank, gang) = (a.rank, a.gang);
        let reaped = Arc::new(AtomicBool::new(false));
        let flag = reaped.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            flag.store(true, Ordering::SeqCst);
            let (success, how) = match status {
                Ok(s) => (s.success(), describe(&s)),
                Err(e) => (false, format!("could not be waited for: {e}")),
            };
            let _ = gang.cast(GangMsg::Exited { rank, success, how });
            let _ = myself.cast(RankProcessMsg::Exited);
        });
        Ok(RankProcessState { pid, reaped })
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
