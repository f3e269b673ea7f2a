//! NCCL between CUDA ranks, through cudarc's raw NCCL bindings with libnccl loaded at run time.
//!
//! Built on every machine (cudarc's `dynamic-loading` needs no CUDA toolkit); at run time
//! [`NcclComm::init`] first checks that `libnccl.so` can be loaded (the `nvidia-nccl-cu13` wheel ships
//! `libnccl.so.2`: a `libnccl.so` symlink to it on `LD_LIBRARY_PATH` is needed) and reports a clear error
//! instead of cudarc's panic when it cannot.
//!
//! Collectives are enqueued on the CUDA legacy default stream, which is libtorch's current stream unless a
//! caller switched streams (Tessera does not), so they are ordered after the kernels that produced their
//! inputs. Each call then waits for the device under a watchdog: if the deadline passes (a peer never
//! entered the collective), the watchdog calls `ncclCommAbort`, which makes the stuck kernel return, and the
//! call fails with [`CommError::Timeout`]. Waiting after each collective gives up overlap with compute; it is
//! the price of deadlines without a CUDA-event API in tch, and the first lever to pull for throughput.

use super::{AbortHandle, CommError, Communicator, ReduceOp};
use cudarc::nccl::{result, sys};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// The raw communicator, shared with the abort handle and the watchdog.
struct Raw(sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from another thread as long as calls are not concurrent; all uses go
// through the mutex below, except ncclCommAbort, which NCCL documents as safe to call while another thread is
// blocked in the communicator.
unsafe impl Send for Raw {}

/// A 128-byte NCCL unique id: rank 0 creates it, every rank needs it to join.
pub type UniqueId = [u8; 128];

/// Whether libnccl can be loaded on this host.
pub fn available() -> bool {
    // SAFETY: probes for the shared library; no NCCL call is made.
    unsafe { sys::is_culib_present() }
}

/// A new unique id (rank 0 calls this and sends the bytes to the others).
///
/// # Errors
/// [`CommError::Setup`] when libnccl is missing or fails.
pub fn unique_id() -> Result<UniqueId, CommError> {
    if !available() {
        return Err(missing());
    }
    let id = result::get_uniqueid().map_err(|e| CommError::Setup(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.map(|c| c as u8))
}

fn missing() -> CommError {
    CommError::Setup(
        "libnccl.so cannot be loaded: install the nvidia-nccl-cu13 wheel and put a libnccl.so symlink to its \
         libnccl.so.2 on LD_LIBRARY_PATH"
            .into(),
    )
}

/// One rank's NCCL communicator.
pub struct NcclComm {
    raw: Arc<Mutex<Raw>>,
    rank: usize,
    world: usize,
    device: Device,
    seq: u64,
    timeout: Duration,
    aborted: Arc<AtomicBool>,
}

impl NcclComm {
    /// Joins the communicator `id` as `rank` of `world` on CUDA device `device` (the current device must be
    /// that one, as it is for a rank that only ever uses its own GPU).
    ///
    /// # Errors
    /// [`CommError::Setup`] when libnccl is missing or initialisation fails.
    pub fn init(
        rank: usize,
        world: usize,
        id: &UniqueId,
        device: Device,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        if !available() {
            return Err(missing());
        }
        // NCCL makes the communicator on the thread's current device, which is 0 unless set: every rank of a
        // node would land on GPU 0.
        let Device::Cuda(index) = device else {
            return Err(CommError::Setup(format!("NCCL needs a CUDA device, not {device:?}")));
        };
        crate::shim::cuda_set_device(index)
            .map_err(|e| CommError::Setup(format!("cannot make cuda:{index} current for NCCL: {e}")))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let id = sys::ncclUniqueId { internal: id.map(|b| b as ::core::ffi::c_char) };
        // SAFETY: `comm` is a valid out-pointer; id, rank and world are what every rank agreed on.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| CommError::Setup(format!("ncclCommInitRank (rank {rank} of {world}): {e:?}")))?;
        // SAFETY: a communicator just made.
        match unsafe { result::comm_cu_device(comm) } {
            Ok(d) if d as usize == index => {}
            other => {
                // SAFETY: the communicator is not used after this.
                let _ = unsafe { result::comm_abort(comm) };
                return Err(CommError::Setup(format!(
                    "NCCL made rank {rank}'s communicator on {other:?}, not on cuda:{index}"
                )));
            }
        }
        Ok(NcclComm {
            raw: Arc::new(Mutex::new(Raw(comm))),
            rank,
            world,
            device,
            seq: 0,
            timeout,
            aborted: Arc::new(AtomicBool::new(false)),
        })
    }

    fn dtype(op: &'static str, seq: u64, t: &Tensor) -> Result<sys::ncclDataType_t, CommError> {
        if !t.device().is_cuda() || !t.is_contiguous() {
            return Err(CommError::Invalid { op, seq, reason: "NCCL needs contiguous CUDA tensors".into() });
        }
        Ok(match t.kind() {
            Kind::Float => sys::ncclDataType_t::ncclFloat32,
            Kind::Double => sys::ncclDataType_t::ncclFloat64,
            Kind::Int64 => sys::ncclDataType_t::ncclInt64,
            Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
            Kind::Half => sys::ncclDataType_t::ncclFloat16,
            k => return Err(CommError::Invalid { op, seq, reason: format!("dtype {k:?} is not supported") }),
        })
    }

    fn red(op: ReduceOp) -> sys::ncclRedOp_t {
        match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
            ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        }
    }

    /// Enqueues `launch` and waits for the device under the deadline watchdog.
    fn run(
        &mut self,
        op: &'static str,
        launch: impl FnOnce(sys::ncclComm_t) -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<(), CommError> {
        let seq = self.seq;
        self.seq += 1;
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted { op, seq });
        }
        {
            let raw = self.raw.lock().expect("nccl lock");
            launch(raw.0).map_err(|e| CommError::Invalid { op, seq, reason: format!("{e:?}") })?;
        }
        let done = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (done, timed_out, raw, timeout) = (done.clone(), timed_out.clone(), self.raw.clone(), self.timeout);
            std::thread::spawn(move || {
                let step = Duration::from_millis(10);
                let mut waited = Duration::ZERO;
                while !done.load(Ordering::SeqCst) {
                    if waited >= timeout {
                        timed_out.store(true, Ordering::SeqCst);
                        // SAFETY: ncclCommAbort may be called while another thread waits on the communicator.
                        let comm = raw.lock().map(|r| r.0).unwrap_or(std::ptr::null_mut());
                        if !comm.is_null() {
                            let _ = unsafe { result::comm_abort(comm) };
                        }
                        return;
                    }
                    std::thread::sleep(step);
                    waited += step;
                }
            })
        };
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        done.store(true, Ordering::SeqCst);
        let _ = watchdog.join();
        if timed_out.load(Ordering::SeqCst) {
            self.aborted.store(true, Ordering::SeqCst);
            return Err(CommError::Timeout { op, seq, timeout: self.timeout });
        }
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted { op, seq });
        }
        Ok(())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
    fn abort_handle(&self) -> AbortHandle {
        let raw = self.raw.clone();
        AbortHandle::new(
            self.aborted.clone(),
            Arc::new(move || {
                if let Ok(r) = raw.try_lock() {
                    // SAFETY: aborting a live communicator; later calls see the aborted flag first.
                    let _ = unsafe { result::comm_abort(r.0) };
                }
            }),
        )
    }
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        let dt = Self::dtype("all_reduce", self.seq, t)?;
        let (ptr, n) = (t.data_ptr(), t.numel());
        // SAFETY: in-place all-reduce over a contiguous CUDA tensor of n elements of dtype dt.
        self.run("all_reduce", |c| unsafe {
            result::all_reduce(ptr, ptr, n, dt, Self::red(op), c, std::ptr::null_mut())
        })
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        let dt = Self::dtype("reduce_scatter", self.seq, input)?;
        Self::dtype("reduce_scatter", self.seq, output)?;
        if input.numel() != output.numel() * self.world {
            let reason =
                format!("input has {} elements, output {} x {} ranks", input.numel(), output.numel(), self.world);
            return Err(CommError::Invalid { op: "reduce_scatter", seq: self.seq, reason });
        }
        let (src, dst, n) = (input.data_ptr(), output.data_ptr(), output.numel());
        // SAFETY: shapes checked above; both tensors are contiguous CUDA tensors of dtype dt.
        self.run("reduce_scatter", |c| unsafe {
            result::reduce_scatter(src, dst, n, dt, Self::red(op), c, std::ptr::null_mut())
        })
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        let dt = Self::dtype("all_gather", self.seq, input)?;
        Self::dtype("all_gather", self.seq, output)?;
        if output.numel() != input.numel() * self.world {
            let reason =
                format!("output has {} elements, input {} x {} ranks", output.numel(), input.numel(), self.world);
            return Err(CommError::Invalid { op: "all_gather", seq: self.seq, reason });
        }
        let (src, dst, n) = (input.data_ptr(), output.data_ptr(), input.numel());
        // SAFETY: shapes checked above.
        self.run("all_gather", |c| unsafe { result::all_gather(src, dst, n, dt, c, std::ptr::null_mut()) })
    }
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        let dt = Self::dtype("broadcast", self.seq, t)?;
        let (ptr, n) = (t.data_ptr(), t.numel());
        // SAFETY: in-place broadcast over a contiguous CUDA tensor.
        self.run("broadcast", |c| unsafe { result::broadcast(ptr, ptr, n, dt, root as i32, c, std::ptr::null_mut()) })
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        let mut t = Tensor::zeros([1], (Kind::Float, self.device));
        self.all_reduce(&mut t, ReduceOp::Sum)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Ok(r) = self.raw.lock() {
            // SAFETY: the communicator is not used after this; abort (not destroy) so a peer that died cannot
            // make the drop hang.
            let _ = unsafe { result::comm_abort(r.0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_libnccl_gets_a_clear_error_not_a_panic() {
        if available() {
            return; // a CUDA host with NCCL: the GPU checks cover it
        }
        let err = unique_id().unwrap_err().to_string();
        assert!(err.contains("libnccl.so") && err.contains("nvidia-nccl-cu13"), "{err}");
        let err = NcclComm::init(0, 1, &[0; 128], Device::Cuda(0), Duration::from_secs(1)).err().unwrap().to_string();
        assert!(err.contains("libnccl.so"), "{err}");
    }
}
