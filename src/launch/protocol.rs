//! Control messages between the launcher and its workers, and their framing.
//!
//! Frames are a 4-byte little-endian length followed by a postcard-encoded message (postcard: a documented,
//! stable serde format). Frames above [`MAX_FRAME`] are refused: the control channel never carries tensors.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::SocketAddr;

/// Largest control frame accepted.
pub const MAX_FRAME: usize = 1 << 20;

/// Labels separating the uses of the run secret (see `comm::auth`).
pub const RDZV_LABEL: &[u8] = b"tessera-rendezvous-v1";

/// Worker to launcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMsg {
    /// First message after authentication.
    Join(Join),
    /// Progress of a logged step (rank 0 sends the global values). `mfu` is 0 on CPU.
    Progress {
        step: u64,
        loss: f64,
        tokens_per_s: f64,
        lr: f64,
        grad_norm: f64,
        mfu: f64,
        data_wait_ms: f64,
        /// Samples per forward/backward on each rank (it changes with `micro_batch = "auto"`).
        micro_batch: u64,
    },
    /// A checkpoint event (rank 0): `what` is `saved`, `committed`, `abandoned`, `write_failed` or `skipped`;
    /// `bytes` is the committed checkpoint's size (all ranks' files).
    Checkpoint { step: u64, what: String, stall_s: f64, commit_s: f64, bytes: u64 },
    /// Training finished; `final_loss` is the last global loss.
    Done { steps: u64, final_loss: f64 },
    /// Training stopped with an error (the message is for the user), and what a restart can do about it
    /// ([`crate::Error::recovery`]: nothing for bad data or config; wait first for unreachable storage).
    Failed { error: String, recovery: crate::error::Recovery },
    /// Sent every [`HEARTBEAT`] while the process lives: steps completed, collectives entered, and the
    /// training loop's phase (`train::Phase`).
    Heartbeat { step: u64, seq: u64, phase: u8 },
    /// (Rank 0) the spike detector stopped training: a gang-wide spike or a faulty rank. The launcher rolls
    /// back.
    Anomaly(crate::spike::Anomaly),
    /// First message of another node's launcher (instead of [`WorkerMsg::Join`]): it enlists as that node's
    /// agent. The connection then carries [`NodeMsg`] up and [`RootMsg`] down for the whole launch.
    Enlist(Enlist),
    /// (Rank 0) training starts at this step: 0, or the checkpoint every rank resumed from. It may be newer
    /// than the launcher expected, when a commit landed while the gang restarted.
    Resumed { step: u64 },
}

/// What another node's launcher tells node 0's when it enlists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enlist {
    pub node_rank: usize,
    pub nnodes: usize,
    /// Ranks on that node (every node runs the same number).
    pub nproc: usize,
    /// Hash of the resolved config, as the ranks compute it ([`crate::launch::worker::gang_hash`]).
    pub config_hash: String,
    pub host: String,
    /// A marker this launcher wrote into the checkpoint store (`checkpoint.dir`), for node 0 to look for:
    /// every rank's files and votes must land in one store. `Err`: why it could not be written.
    pub store_marker: Result<String, String>,
}

/// A node agent (the launcher of node 1, 2, ...) to the root (node 0's launcher).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeMsg {
    /// A rank process of that node ended. `attempt` is the gang it served, so that the exit of a process
    /// killed as a culprit is not taken for a failure of the next gang.
    Exited { rank: usize, attempt: u64, success: bool, how: String },
    /// SIGTERM or SIGINT reached that node's launcher: preempt the whole run.
    Preempt,
    /// Sent every [`NODE_HEARTBEAT`]: the node's launcher is alive and reachable.
    Alive,
}

/// How often a node agent and the root tell each other they are alive (when they have nothing else to say).
pub const NODE_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// The root to a node agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RootMsg {
    /// Gang `attempt` forms at the rendezvous on node 0's `port`: kill the local `culprits` (global ranks)
    /// and start a process for every local rank that has none. The others were told to reset in place and
    /// join it by themselves.
    Gang { attempt: u64, port: u16, culprits: Vec<usize> },
    /// The launch is over: stop every local process and exit with this outcome.
    Stop { outcome: Result<Finished, Failed> },
    /// The next gang is a while off (the launch waits for storage): stop every local process now, which
    /// would otherwise outlast its rendezvous; the next `Gang` starts them afresh.
    Release,
    /// Sent every [`NODE_HEARTBEAT`] when there is nothing else to send.
    Alive,
}

/// A launch that ended well (what node 0 prints).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub steps: u64,
    pub final_loss: f64,
    pub preempted: bool,
}

/// A launch that failed: node 0's exit code and message, which every node repeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub code: i32,
    pub message: String,
}

/// How often a worker sends a heartbeat.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(200);

/// What a rank tells the rendezvous about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    pub rank: usize,
    pub world: usize,
    /// Hash of the resolved config; all ranks must agree.
    pub config_hash: String,
    /// Where this rank's communicator listens.
    pub comm_addr: SocketAddr,
    pub host: String,
    pub pid: u32,
    /// The device this rank trains on (`cpu`, `cuda:N`), for reports that name a faulty one.
    pub device: String,
}

/// How every rank of a gang starts: where to resume from, and a rollback to carry out. Sent with the peer
/// list, so that ranks that joined with the process they already had (reset in place) and freshly started
/// ones agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartSpec {
    /// The `resume` setting for this gang (`auto`, `never`, or a checkpoint).
    pub resume: String,
    pub rollback: Option<crate::spike::Directive>,
    /// The gang's attempt number: checkpoints it stages are named apart from an earlier attempt's, whose
    /// writers may still be finishing in a process that was reset in place.
    pub attempt: u64,
}

/// Launcher to worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LauncherMsg {
    /// Everyone has joined: the communicator address of every rank, by rank, and how to start.
    Peers { comm_addrs: Vec<SocketAddr>, start: StartSpec },
    /// The gang cannot form; the reason names the offending ranks.
    Reject { reason: String },
    /// Stop now: abort in-flight collectives and exit.
    Abort { reason: String },
    /// Preemption: stop at a step every rank agrees on, commit a checkpoint of it, and exit cleanly.
    Preempt,
    /// Another rank failed: abort this attempt, keep the process (libtorch, the CUDA context), and join the
    /// next gang's rendezvous on `port` of the rendezvous host (the host each node reaches node 0 at).
    Reset { port: u16 },
}

fn frame<T: Serialize>(msg: &T) -> std::io::Result<Vec<u8>> {
    let body = postcard::to_stdvec(msg).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> std::io::Result<T> {
    postcard::from_bytes(body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad control frame: {e}")))
}

fn check_len(len: usize) -> std::io::Result<()> {
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    Ok(())
}

/// Writes one message (blocking).
///
/// # Errors
/// I/O errors.
pub fn send<T: Serialize, W: Write>(w: &mut W, msg: &T) -> std::io::Result<()> {
    w.write_all(&frame(msg)?)?;
    w.flush()
}

/// Reads one message (blocking).
///
/// # Errors
/// I/O errors, an oversized frame, or a frame that does not decode.
pub fn recv<T: DeserializeOwned, R: Read>(r: &mut R) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    check_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode(&body)
}

/// Writes one message on an async stream.
///
/// # Errors
/// I/O errors.
pub async fn send_async<T: Serialize, W: tokio::io::AsyncWrite + Unpin>(w: &mut W, msg: &T) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&frame(msg)?).await?;
    w.flush().await
}

/// Reads one message from an async stream.
///
/// # Errors
/// As [`recv`].
pub async fn recv_async<T: DeserializeOwned, R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<T> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    check_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    decode(&body)
}

/// Reads messages from `r` and hands each to `on_msg` until the stream fails or closes, or nothing arrives
/// for `silence` (`first` for the first message); then tells `on_end` why. For the launchers' connections
/// between nodes, where each side sends a heartbeat every [`NODE_HEARTBEAT`], so that silence means a
/// frozen, dead or cut-off peer.
pub async fn read_until_silent<T: DeserializeOwned, R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    first: std::time::Duration,
    silence: std::time::Duration,
    mut on_msg: impl FnMut(T),
    on_end: impl FnOnce(String),
) {
    let mut limit = first;
    loop {
        match tokio::time::timeout(limit, recv_async::<T, _>(r)).await {
            Ok(Ok(msg)) => on_msg(msg),
            Ok(Err(e)) => return on_end(e.to_string()),
            Err(_) => return on_end(format!("no word from it for {:.0} s", limit.as_secs_f64())),
        }
        limit = silence;
    }
}

impl From<crate::train::LoopEvent<'_>> for WorkerMsg {
    /// What rank 0 reports of a logged step or a checkpoint event.
    fn from(event: crate::train::LoopEvent<'_>) -> Self {
        match event {
            crate::train::LoopEvent::Step(r) => WorkerMsg::Progress {
                step: r.step,
                loss: r.loss,
                tokens_per_s: r.tokens_per_s,
                lr: r.lr,
                grad_norm: r.grad_norm,
                mfu: r.mfu.unwrap_or(0.0),
                data_wait_ms: r.data_wait_ms,
                micro_batch: r.micro_batch,
            },
            crate::train::LoopEvent::Checkpoint(c) => WorkerMsg::Checkpoint {
                step: c.step,
                what: c.checkpoint.to_string(),
                stall_s: c.stall_ms.unwrap_or(0.0) / 1e3,
                commit_s: c.commit_s.unwrap_or(0.0),
                bytes: c.bytes.unwrap_or(0),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_oversized_frames_are_refused() {
        let msg = WorkerMsg::Progress {
            step: 7,
            loss: 2.5,
            tokens_per_s: 1e4,
            lr: 1e-3,
            grad_norm: 1.0,
            mfu: 0.0,
            data_wait_ms: 0.1,
            micro_batch: 4,
        };
        let mut buf = vec![];
        send(&mut buf, &msg).unwrap();
        assert_eq!(recv::<WorkerMsg, _>(&mut buf.as_slice()).unwrap(), msg);
        let mut huge = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        huge.extend(vec![0u8; 16]);
        assert_eq!(recv::<WorkerMsg, _>(&mut huge.as_slice()).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }
}
