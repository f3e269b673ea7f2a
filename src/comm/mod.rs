//! Collectives between ranks: the [`Communicator`] trait and its transports.
//!
//! - [`tcp::TcpRing`]: CPU tensors over TCP, a bandwidth-optimal ring (reduce-scatter then all-gather),
//!   chunked and pipelined.
//! - [`nccl`]: CUDA tensors through NCCL (cudarc's bindings, libnccl loaded at run time).
//! - [`staged::HostStaged`]: device tensors over a host transport, copied to the host and back (several ranks
//!   on one GPU, for checks).
//!
//! Every call has a deadline ([`Communicator::set_timeout`]); a call that passes it fails with
//! [`CommError::Timeout`] instead of hanging. [`AbortHandle::abort`] (from any thread) makes this rank's
//! pending and later calls fail with [`CommError::Aborted`] and, by closing its connections, makes the
//! peers' pending calls fail fast too. Calls are numbered ([`Communicator::seq`]) so a hang can be pinned to
//! the collective a rank never entered.

pub mod auth;
pub mod nccl;
pub mod staged;
pub mod tcp;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tch::Tensor;

/// How values from different ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size.
    Avg,
    Max,
}

/// A collective's failure. Every variant is recoverable by the supervisor (abort the gang, rebuild the
/// communicator, roll back); none is recoverable inside the training step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    #[error("collective #{seq} ({op}) passed its {timeout:?} deadline")]
    Timeout { op: &'static str, seq: u64, timeout: Duration },
    #[error("collective #{seq} ({op}) aborted")]
    Aborted { op: &'static str, seq: u64 },
    #[error("collective #{seq} ({op}): connection to rank {peer} lost: {reason}")]
    PeerLost { op: &'static str, seq: u64, peer: usize, reason: String },
    #[error("collective #{seq} ({op}): {reason}")]
    Invalid { op: &'static str, seq: u64, reason: String },
    #[error("communicator set-up failed: {0}")]
    Setup(String),
}

/// Collectives over the ranks of one gang. Tensors are contiguous; results are written in place or into the
/// given output. All ranks must call the same collectives in the same order with matching shapes.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;

    /// Number of collectives this communicator has started (the next call gets this number).
    fn seq(&self) -> u64;

    /// The deadline applied to each later call.
    fn set_timeout(&mut self, timeout: Duration);

    /// A handle that aborts this communicator from another thread.
    fn abort_handle(&self) -> AbortHandle;

    /// From now on, store in `entered` how many collectives have been entered (the number of the call in
    /// progress plus one) as each starts, so a heartbeat can tell which collective a stuck rank never reached.
    /// Transports that cannot report it ignore this.
    fn watch(&mut self, entered: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let _ = entered;
    }

    /// Fault injection: drop this rank's connections to its peers, as a network partition would (without the
    /// abort flag, so the next collective fails as on a real broken link). Transports without connections of
    /// their own ignore it.
    fn sever(&mut self) {}

    /// Whether collectives can run on another thread while this rank computes (the gradient all-reduce
    /// overlapped with backward, `crate::train::overlap`). Transports whose calls wait for the whole device
    /// (NCCL here, whose deadline watchdog synchronises it) say no.
    fn overlaps_compute(&self) -> bool {
        false
    }

    /// Combines `t` across ranks, in place.
    ///
    /// # Errors
    /// [`CommError`] on deadline, abort, a lost peer, or a shape/dtype this transport cannot handle.
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError>;

    /// Reduces `input` (`W·k` elements) across ranks and leaves chunk `rank` (elements
    /// `[rank·k, (rank+1)·k)` of the reduction) in `output` (`k` elements).
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<(), CommError>;

    /// Concatenates every rank's `input` (`k` elements each) into `output` (`W·k` elements), rank order.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError>;

    /// Copies `t` from rank `root` to every rank, in place.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError>;

    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn barrier(&mut self) -> Result<(), CommError>;
}

/// Aborts a communicator from any thread. Cloneable; aborting twice is harmless.
#[derive(Clone)]
pub struct AbortHandle {
    flag: Arc<AtomicBool>,
    on_abort: Arc<dyn Fn() + Send + Sync>,
}

impl AbortHandle {
    /// A handle that sets `flag` and then runs `on_abort` (which should unblock pending calls, e.g. by
    /// shutting sockets down).
    pub fn new(flag: Arc<AtomicBool>, on_abort: Arc<dyn Fn() + Send + Sync>) -> Self {
        AbortHandle { flag, on_abort }
    }

    pub fn abort(&self) {
        if !self.flag.swap(true, Ordering::SeqCst) {
            (self.on_abort)();
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// A communicator for a gang of one: every collective is the identity (or a copy). Lets single-rank runs use
/// the same code path as multi-rank ones.
pub struct Solo {
    seq: u64,
    flag: Arc<AtomicBool>,
}

impl Default for Solo {
    fn default() -> Self {
        Solo { seq: 0, flag: Arc::new(AtomicBool::new(false)) }
    }
}

impl Solo {
    fn enter(&mut self, op: &'static str) -> Result<(), CommError> {
        let seq = self.seq;
        self.seq += 1;
        if self.flag.load(Ordering::SeqCst) {
            return Err(CommError::Aborted { op, seq });
        }
        Ok(())
    }
}

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn set_timeout(&mut self, _timeout: Duration) {}
    fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(self.flag.clone(), Arc::new(|| {}))
    }
    fn all_reduce(&mut self, _t: &mut Tensor, _op: ReduceOp) -> Result<(), CommError> {
        self.enter("all_reduce")
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, _op: ReduceOp) -> Result<(), CommError> {
        self.enter("reduce_scatter")?;
        output.copy_(input);
        Ok(())
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        self.enter("all_gather")?;
        output.copy_(input);
        Ok(())
    }
    fn broadcast(&mut self, _t: &mut Tensor, _root: usize) -> Result<(), CommError> {
        self.enter("broadcast")
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.enter("barrier")
    }
}
