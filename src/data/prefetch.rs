//! Prefetch: a background thread prepares each step's micro-batches ahead of the training loop.
//!
//! The thread walks the steps in order, asks the [`DataState`] which samples this rank trains on, reads their
//! tokens (fetching remote shards as needed) and hands finished steps over a bounded channel `depth` steps
//! ahead. The training loop only waits when storage cannot keep up, and [`Prefetcher::next_step`] reports how long
//! it waited. Dropping the prefetcher stops the thread (after at most one step it was preparing); a rollback
//! drops it and starts a new one from the restored state.

use super::loader::{HostBatch, SampleSet};
use super::stream::{digest, DataState};
use super::DataError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How each optimizer step's samples are divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// Global batch in samples.
    pub batch: u64,
    /// Samples per micro-batch on this rank.
    pub micro_batch: u64,
    pub rank: u64,
    pub world: u64,
}

/// One optimizer step's data for this rank.
#[derive(Debug, Clone)]
pub struct StepData {
    pub step: u64,
    /// This rank's micro-batches, in order.
    pub micro: Vec<HostBatch>,
    /// Epoch of the step's first position.
    pub epoch: u64,
    /// Order-independent digest of this rank's sample ids ([`digest`]); summing (wrapping) over ranks gives
    /// the step's global digest, the same for any world size.
    pub digest: u64,
}

/// This rank's data for `step` under `state`.
///
/// # Errors
/// A shard that cannot be read.
pub fn step_data(set: &SampleSet, state: &DataState, shape: StepShape, step: u64) -> Result<StepData, DataError> {
    let positions = DataState::rank_positions(step, shape.batch, shape.rank, shape.world);
    let located: Vec<_> = positions.map(|g| state.locate(g)).collect();
    let epoch = located[0].epoch;
    let ids: Vec<u64> = located.iter().map(|l| l.sample).collect();
    let micro = ids.chunks(shape.micro_batch as usize).map(|c| set.host_batch(c)).collect::<Result<Vec<_>, _>>()?;
    let digest = digest(micro.iter().flat_map(|m| m.ids.iter().copied()));
    Ok(StepData { step, micro, epoch, digest })
}

/// The background producer of [`StepData`].
pub struct Prefetcher {
    /// `None` only while dropping: disconnecting wakes a producer blocked on a full channel.
    rx: Option<Receiver<Result<StepData, DataError>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts preparing steps `first..end` of `state`, at most `depth` ahead of the consumer.
    pub fn start(set: SampleSet, state: DataState, shape: StepShape, first: u64, end: u64, depth: usize) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("tessera-prefetch".into())
            .spawn(move || {
                for step in first..end {
                    if flag.load(Ordering::Relaxed) {
                        return;
                    }
                    let item = step_data(&set, &state, shape, step);
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawn prefetch thread");
        Prefetcher { rx: Some(rx), stop, handle: Some(handle) }
    }

    /// The next step's data and how long the caller waited for it.
    ///
    /// # Errors
    /// The data error the producer hit, or [`DataError::PrefetchEnded`] if asked past the last step.
    pub fn next_step(&mut self) -> Result<(StepData, Duration), DataError> {
        let t0 = Instant::now();
        let rx = self.rx.as_ref().expect("receiver lives until drop");
        let item = rx.recv().map_err(|_| DataError::PrefetchEnded)??;
        Ok((item, t0.elapsed()))
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Disconnect, which fails a producer's pending or next send, then wait for it.
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
