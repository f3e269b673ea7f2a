//! Device tensors over a host-only transport: [`HostStaged`] copies each collective's tensors to the host,
//! runs the collective there, and copies the result back.
//!
//! Not for speed (every call waits for the device and crosses PCIe twice): for running several ranks on one
//! GPU, where NCCL refuses two ranks on a device. `tessera doctor` uses it to train two ranks of the TCP ring
//! on one GPU, the only way one GPU can check the multi-rank step.

use super::{AbortHandle, CommError, Communicator, ReduceOp};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};

/// `inner` (a transport of host tensors) for tensors on any device.
pub struct HostStaged<C> {
    inner: C,
}

impl<C: Communicator> HostStaged<C> {
    pub fn new(inner: C) -> Self {
        HostStaged { inner }
    }
}

/// `t` on the host (itself if it already is, else a contiguous copy).
fn host(t: &Tensor) -> Tensor {
    if t.device() == Device::Cpu {
        t.shallow_clone()
    } else {
        t.to_device(Device::Cpu).contiguous()
    }
}

/// Runs `f` on `t`'s host copy and writes the result back into `t` (unless the copy is `t` itself).
fn through_host(t: &mut Tensor, f: impl FnOnce(&mut Tensor) -> Result<(), CommError>) -> Result<(), CommError> {
    let mut h = host(t);
    f(&mut h)?;
    if t.device() != Device::Cpu {
        t.copy_(&h);
    }
    Ok(())
}

impl<C: Communicator> Communicator for HostStaged<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn seq(&self) -> u64 {
        self.inner.seq()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout);
    }
    fn abort_handle(&self) -> AbortHandle {
        self.inner.abort_handle()
    }
    fn watch(&mut self, entered: Arc<AtomicU64>) {
        self.inner.watch(entered);
    }
    fn sever(&mut self) {
        self.inner.sever();
    }
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        through_host(t, |h| self.inner.all_reduce(h, op))
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        through_host(output, |h| self.inner.reduce_scatter(&host(input), h, op))
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        through_host(output, |h| self.inner.all_gather(&host(input), h))
    }
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        through_host(t, |h| self.inner.broadcast(h, root))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.inner.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::tcp::TcpRing;
    use tch::Kind;

    #[test]
    fn host_tensors_pass_through_to_the_ring_and_come_back_reduced() {
        let rings = TcpRing::on_loopback(2, b"secret", Duration::from_secs(20)).unwrap();
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(rank, ring)| {
                    s.spawn(move || {
                        let mut comm = HostStaged::new(ring);
                        let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (rank as f64 + 1.0);
                        comm.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                        let mut gathered = Tensor::zeros([6], (Kind::Float, Device::Cpu));
                        comm.all_gather(&Tensor::from_slice(&[rank as f32; 3]), &mut gathered).unwrap();
                        let mut out = Tensor::zeros([3], (Kind::Float, Device::Cpu));
                        comm.reduce_scatter(&Tensor::ones([6], (Kind::Float, Device::Cpu)), &mut out, ReduceOp::Sum)
                            .unwrap();
                        assert_eq!(comm.seq(), 3);
                        [t, gathered, out].iter().flat_map(|x| Vec::<f32>::try_from(x).unwrap()).collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in &results {
            assert_eq!(r, &[3.0, 6.0, 9.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        }
    }
}
