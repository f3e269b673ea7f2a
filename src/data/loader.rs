//! Samples and batches.
//!
//! A sample is a window of `seq_len + 1` consecutive tokens of the concatenated corpus: sample `i` starts at
//! token `i·seq_len`, so consecutive samples share one token (the last target of one is the first input of the
//! next) and every token is predicted exactly once per epoch. Finding a sample's shard is a binary search over
//! shard offsets, O(log shards). The corpus is split by sample id: the last `eval_fraction` of samples are held
//! out for evaluation, which, since documents are laid down in input order, holds out whole documents apart
//! from the one straddling the split.

use super::shards::TokenShards;
use super::DataError;
use std::sync::Arc;
use tch::{Device, Tensor};

/// A contiguous range of sample ids over a corpus.
#[derive(Clone)]
pub struct SampleSet {
    shards: Arc<TokenShards>,
    pub seq_len: i64,
    /// First sample id of the range.
    pub first: u64,
    /// Number of samples in the range.
    pub len: u64,
}

/// The tokens of some samples, in host memory, ready to become a [`Batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// `rows × (seq_len + 1)` token ids, row-major.
    pub tokens: Vec<i64>,
    pub seq_len: i64,
    /// The corpus sample id of each row, for exactly-once accounting.
    pub ids: Vec<u64>,
}

/// One micro-batch on its device.
pub struct Batch {
    /// `(B, T)` int64 token ids.
    pub inputs: Tensor,
    /// `(B, T)` int64: `inputs` shifted by one.
    pub targets: Tensor,
    /// The corpus sample id of each row.
    pub ids: Vec<u64>,
}

impl HostBatch {
    /// Copies the batch to `device` as inputs and targets.
    ///
    /// On CUDA the windows go over in one copy from pinned (page-locked) memory that does not block the
    /// host: the loop goes on queueing the step's kernels while the tokens travel, and libtorch's pinned
    /// allocator keeps the host buffer alive until the copy has finished.
    pub fn to_device(&self, device: Device) -> Batch {
        let rows = self.ids.len() as i64;
        let all = Tensor::from_slice(&self.tokens).view([rows, self.seq_len + 1]); // (B, T+1)
        let all = match device {
            // Pinning cannot fail on a working CUDA host; if it does, the plain (blocking) copy still works.
            Device::Cuda(_) => match crate::shim::pin_memory(&all) {
                Ok(pinned) => pinned.to_device_(device, pinned.kind(), true, false),
                Err(_) => all.to_device(device),
            },
            _ => all,
        };
        Batch {
            inputs: all.narrow(1, 0, self.seq_len).contiguous(),  // (B, T)
            targets: all.narrow(1, 1, self.seq_len).contiguous(), // (B, T)
            ids: self.ids.clone(),
        }
    }
}

impl SampleSet {
    /// The train and held-out sets of a corpus for windows of `seq_len`.
    ///
    /// # Errors
    /// [`DataError::TooSmall`] when either split would be empty.
    pub fn split(shards: Arc<TokenShards>, seq_len: i64, eval_fraction: f64) -> Result<(Self, Self), DataError> {
        let total = shards.total_tokens();
        let n = total.saturating_sub(1) / seq_len as u64;
        let n_eval = if eval_fraction > 0.0 { ((n as f64 * eval_fraction).ceil() as u64).max(1) } else { 0 };
        if n < n_eval + 1 {
            let hint =
                if n_eval > 0 { format!(" and {n_eval} held-out samples (data.eval_fraction)") } else { String::new() };
            return Err(DataError::TooSmall { tokens: total, seq_len, hint });
        }
        let train = SampleSet { shards: shards.clone(), seq_len, first: 0, len: n - n_eval };
        let eval = SampleSet { shards, seq_len, first: n - n_eval, len: n_eval };
        Ok((train, eval))
    }

    /// The samples with these indices (relative to the set) in host memory.
    ///
    /// # Errors
    /// A shard that cannot be fetched or fails verification.
    pub fn host_batch(&self, indices: &[u64]) -> Result<HostBatch, DataError> {
        let t = self.seq_len as usize;
        let mut tokens = vec![0i64; indices.len() * (t + 1)];
        for (row, &i) in tokens.chunks_mut(t + 1).zip(indices) {
            assert!(i < self.len, "sample {i} outside a set of {}", self.len);
            self.shards.read((self.first + i) * self.seq_len as u64, row)?;
        }
        Ok(HostBatch { tokens, seq_len: self.seq_len, ids: indices.iter().map(|&i| self.first + i).collect() })
    }

    /// [`SampleSet::host_batch`] copied to `device`.
    ///
    /// # Errors
    /// As [`SampleSet::host_batch`].
    pub fn batch(&self, indices: &[u64], device: Device) -> Result<Batch, DataError> {
        Ok(self.host_batch(indices)?.to_device(device))
    }
}
