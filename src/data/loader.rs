//! Samples and batches.
//!
//! A sample is a window of `seq_len + 1` consecutive tokens of the concatenated corpus: sample `i` starts at
//! token `i·seq_len`, so consecutive samples share one token (the last target of one is the first input of the
//! next) and every token is predicted exactly once per epoch. The corpus is split by sample id: the last
//! `eval_fraction` of samples are held out for evaluation, which, since documents are laid down in input
//! order, holds out whole documents apart from the one straddling the split.

use super::order::SampleOrder;
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

/// One micro-batch on its device.
pub struct Batch {
    /// `(B, T)` int64 token ids.
    pub inputs: Tensor,
    /// `(B, T)` int64: `inputs` shifted by one.
    pub targets: Tensor,
    /// The sample ids (within the corpus) of each row, for exactly-once accounting.
    pub ids: Vec<u64>,
}

impl SampleSet {
    /// The train and held-out sets of a corpus for windows of `seq_len`.
    ///
    /// # Errors
    /// [`DataError::TooSmall`] when either split would be empty.
    pub fn split(
        shards: Arc<TokenShards>,
        seq_len: i64,
        eval_fraction: f64,
    ) -> Result<(Self, Self), DataError> {
        let total = shards.total_tokens();
        let n = total.saturating_sub(1) / seq_len as u64;
        let n_eval = if eval_fraction > 0.0 {
            ((n as f64 * eval_fraction).ceil() as u64).max(1)
        } else {
            0
        };
        if n < n_eval + 1 {
            let hint = if n_eval > 0 {
                format!(" and {n_eval} held-out samples (data.eval_fraction)")
            } else {
                String::new()
            };
            return Err(DataError::TooSmall {
                tokens: total,
                seq_len,
                hint,
            });
        }
        let train = SampleSet {
            shards: shards.clone(),
            seq_len,
            first: 0,
            len: n - n_eval,
        };
        let eval = SampleSet {
            shards,
            seq_len,
            first: n - n_eval,
            len: n_eval,
        };
        Ok((train, eval))
    }

    /// Tokens of the sample with id `first + i` (relative index `i`) into `out` (`seq_len + 1` long).
    fn read(&self, i: u64, out: &mut [i64]) {
        self.shards
            .read((self.first + i) * self.seq_len as u64, out);
    }

    /// A batch of the samples with these relative indices, on `device`.
    pub fn batch(&self, indices: &[u64], device: Device) -> Batch {
        let t = self.seq_len as usize;
        let mut buf = vec![0i64; indices.len() * (t + 1)];
        for (row, &i) in buf.chunks_mut(t + 1).zip(indices) {
            self.read(i, row);
        }
        let all = Tensor::from_slice(&buf).view([indices.len() as i64, self.seq_len + 1]);
        Batch {
            inputs: all
                .narrow(1, 0, self.seq_len)
                .contiguous()
                .to_device(device),
            targets: all
                .narrow(1, 1, self.seq_len)
                .contiguous()
                .to_device(device),
            ids: indices.iter().map(|&i| self.first + i).collect(),
        }
    }
}

/// Maps global sample positions (counting across epochs) to samples of a [`SampleSet`] in a seeded, shuffled
/// order: global position `g` is position `g mod n` of epoch `g div n`.
pub struct ShuffledPositions {
    n: u64,
    seed: u64,
    cached: Option<(u64, SampleOrder)>,
}

impl ShuffledPositions {
    pub fn new(n: u64, seed: u64) -> Self {
        ShuffledPositions {
            n,
            seed,
            cached: None,
        }
    }

    /// The relative sample index at global position `g`.
    pub fn sample_at(&mut self, g: u64) -> u64 {
        let epoch = g / self.n;
        let order = match self.cached {
            Some((e, o)) if e == epoch => o,
            _ => {
                let o = SampleOrder::new(self.n, self.seed, epoch);
                self.cached = Some((epoch, o));
                o
            }
        };
        order.at(g % self.n)
    }

    /// The epoch global position `g` falls in.
    pub fn epoch_of(&self, g: u64) -> u64 {
        g / self.n
    }
}
