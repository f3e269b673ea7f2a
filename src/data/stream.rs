//! The data stream's position and history: which sample each global position holds, for any world size,
//! across epochs and rollbacks. Small, serializable, and evaluated in O(1) per position (O(layers) after
//! rollbacks), so resuming anywhere never replays the stream.
//!
//! **Global positions.** The stream is one sequence of sample positions counted from the start of training.
//! Optimizer step `s` with a global batch of `B` samples consumes positions `[s·B, (s+1)·B)`. Rank `r` of `W`
//! takes the contiguous slice `[s·B + r·B/W, s·B + (r+1)·B/W)` (so `W` must divide `B`), and cuts it into its
//! micro-batches in order. Changing `W` while keeping `B` therefore continues the identical global sequence:
//! only who computes which rows changes.
//!
//! **Epochs.** An epoch visits every sample of `[0, n)` once, in the [`SampleOrder`] of `(seed, epoch)`.
//!
//! **Rollback layers.** A rollback to a checkpoint at position `k` of the current epoch adds a [`Layer`]:
//! positions `≥ k` map through a fresh permutation (its own seed) of what the epoch had left, so the rest of
//! the epoch is visited in a new order and nothing is repeated or dropped. A layer may also *skip* `skip`
//! positions of the previous order, starting `skip_at` positions after `k` — the window where the offending
//! data was (a loss spike's onset is usually some steps after the clean checkpoint rolled back to) — so those
//! samples are not trained on this epoch. They are not lost silently: [`DataState::skipped`] lists them,
//! and trained plus skipped samples are exactly one permutation of `[0, n)` per epoch. Skipping shortens the
//! epoch by `skip` positions. Layers belong to one epoch; the next epoch starts clean.

use super::order::{mix64, Permutation, SampleOrder};
use serde::{Deserialize, Serialize};

/// One rollback's change to the rest of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Position within the epoch from which the layer applies.
    pub start: u64,
    /// Seed of the fresh permutation of the remaining positions.
    pub seed: u64,
    /// Positions (of the order before this layer) skipped, from `start + skip_at`.
    pub skip: u64,
    /// Where the skipped window begins, counted from `start` (0: right after it).
    #[serde(default)]
    pub skip_at: u64,
}

/// Why a rollback layer cannot be added. The rollback planner never asks for one (it cuts its skip to the
/// epoch); met in a checkpoint's data state, it makes that checkpoint unusable for the run
/// ([`crate::ckpt::store::CkptError::Incompatible`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    #[error("cannot roll back to position {position}: the stream's state starts at {earliest}")]
    BeforeState { position: u64, earliest: u64 },
    #[error("skipping {skip} samples at epoch position {start} would leave the epoch of {len} with none")]
    SkipTooLarge { start: u64, skip: u64, len: u64 },
    #[error("a skip window at epoch position {at} lies past the end of the epoch of {len} (shorten it)")]
    SkipPastEnd { at: u64, len: u64 },
}

/// Where the stream is, and what has changed its order. This is what checkpoints store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataState {
    /// Samples in one epoch (before skips).
    pub n: u64,
    pub seed: u64,
    /// Shard-locality block size of the base order (1 = plain shuffle).
    pub block: u64,
    /// The epoch that `layers` belong to.
    pub epoch: u64,
    /// Global position at which `epoch` begins.
    pub epoch_start: u64,
    /// Rollback layers of `epoch`, oldest first, with non-decreasing `start`.
    pub layers: Vec<Layer>,
    /// Global positions consumed so far (the next position to train on).
    pub position: u64,
}

/// Where a global position falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub epoch: u64,
    /// Position within the epoch.
    pub offset: u64,
    pub sample: u64,
}

impl DataState {
    /// A stream at position 0 of epoch 0.
    ///
    /// # Panics
    /// If `n == 0` (callers check the corpus has samples first).
    pub fn new(n: u64, seed: u64, block: u64) -> Self {
        assert!(n > 0, "a data stream needs at least one sample");
        DataState { n, seed, block: block.max(1), epoch: 0, epoch_start: 0, layers: vec![], position: 0 }
    }

    /// Checks a state read from outside (a checkpoint) for what the stream's arithmetic relies on: at least
    /// one sample, the position within or after the current epoch, and layers that [`DataState::add_layer_skipping`]
    /// could have made (in order, each skip inside what was left of the epoch).
    ///
    /// # Errors
    /// What is inconsistent, in words.
    pub fn check(&self) -> Result<(), String> {
        if self.n == 0 || self.block == 0 {
            return Err(format!("an epoch of {} samples in blocks of {}", self.n, self.block));
        }
        if self.position < self.epoch_start {
            return Err(format!("position {} is before its epoch's start {}", self.position, self.epoch_start));
        }
        let mut replay = DataState { layers: vec![], position: self.epoch_start, ..self.clone() };
        for (i, l) in self.layers.iter().enumerate() {
            if i > 0 && l.start < self.layers[i - 1].start {
                return Err(format!("layer {i} starts at {}, before the layer it follows", l.start));
            }
            let at = self.epoch_start.checked_add(l.start).ok_or("a layer's start overflows")?;
            let before = replay.epoch;
            replay.add_layer_skipping(at, l.seed, l.skip_at, l.skip).map_err(|e| format!("layer {i}: {e}"))?;
            if replay.epoch != before || replay.layers.last() != Some(l) {
                return Err(format!("layer {i} ({l:?}) does not fit in what its epoch had left"));
            }
        }
        Ok(())
    }

    /// Length of the current epoch: `n` less the skipped positions.
    pub fn epoch_len(&self) -> u64 {
        self.n - self.layers.iter().map(|l| l.skip).sum::<u64>()
    }

    fn base(&self, epoch: u64) -> SampleOrder {
        SampleOrder::with_blocks(self.n, self.seed, epoch, self.block)
    }

    /// The sample at global position `g` (at or after the current epoch's start), in O(1 + layers).
    ///
    /// # Panics
    /// If `g` is before the current epoch's start: that history is no longer in the state (checkpoints and
    /// the consumption ledger hold it).
    pub fn locate(&self, g: u64) -> Located {
        assert!(g >= self.epoch_start, "position {g} precedes the state's epoch start {}", self.epoch_start);
        let p = g - self.epoch_start;
        let len = self.epoch_len();
        if p >= len {
            let q = p - len;
            let epoch = self.epoch + 1 + q / self.n;
            let offset = q % self.n;
            return Located { epoch, offset, sample: self.base(epoch).at(offset) };
        }
        Located { epoch: self.epoch, offset: p, sample: self.base(self.epoch).at(self.unlayer(p)) }
    }

    /// Maps a position of the layered epoch back to a position of the base order.
    fn unlayer(&self, mut p: u64) -> u64 {
        // Walk the layers newest first; each one's epoch length before it is the length after it plus its skip.
        let mut len_after = self.epoch_len();
        for l in self.layers.iter().rev() {
            let len_before = len_after + l.skip;
            if p >= l.start {
                // The layer permutes what is left of the previous order after `start`: the positions before
                // the skipped window, then those after it.
                let remaining = len_before - l.start - l.skip;
                let q = layer_perm(l, remaining).at(p - l.start);
                p = if q < l.skip_at { l.start + q } else { l.start + l.skip + q };
            }
            len_after = len_before;
        }
        p
    }

    /// Whether global `position` (at or after the epoch's start) lies past the end of this state's epoch.
    pub fn past_epoch(&self, position: u64) -> bool {
        position - self.epoch_start >= self.epoch_len()
    }

    /// Moves the state's epoch forward to the one holding `position`, dropping finished epochs' layers.
    pub fn seek(&mut self, position: u64) {
        assert!(position >= self.epoch_start, "cannot seek before the state's epoch start");
        if self.past_epoch(position) {
            let len = self.epoch_len();
            let q = position - self.epoch_start - len;
            self.epoch += 1 + q / self.n;
            self.epoch_start += len + (q / self.n) * self.n;
            self.layers.clear();
        }
        self.position = position;
    }

    /// Records a rollback to global position `position` (a checkpoint's): the rest of that epoch is visited
    /// in a fresh order drawn from `seed`, skipping the next `skip` samples of the current order.
    ///
    /// # Errors
    /// [`LayerError`] if the position is before this state's epoch, or the skip would empty the epoch.
    pub fn add_layer(&mut self, position: u64, seed: u64, skip: u64) -> Result<(), LayerError> {
        self.add_layer_skipping(position, seed, 0, skip)
    }

    /// [`DataState::add_layer`], skipping the `skip` positions that start `skip_at` positions after
    /// `position` (a rollback to a checkpoint some steps before the data that caused a spike). A window that
    /// reaches past the epoch's end is cut at it (the epoch then ends early; the next one is complete).
    ///
    /// # Errors
    /// [`LayerError::BeforeState`] as for [`DataState::add_layer`]; [`LayerError::SkipPastEnd`] if the window
    /// starts past the epoch; [`LayerError::SkipTooLarge`] if it would leave the epoch with no sample at all.
    pub fn add_layer_skipping(&mut self, position: u64, seed: u64, skip_at: u64, skip: u64) -> Result<(), LayerError> {
        if position < self.epoch_start {
            return Err(LayerError::BeforeState { position, earliest: self.epoch_start });
        }
        self.seek(position);
        let start = position - self.epoch_start;
        let len = self.epoch_len();
        if skip > 0 && start + skip_at >= len {
            return Err(LayerError::SkipPastEnd { at: start + skip_at, len });
        }
        let skip = skip.min(len - start - skip_at.min(len - start));
        if skip > 0 && skip == len {
            return Err(LayerError::SkipTooLarge { start, skip, len });
        }
        let skip_at = if skip == 0 { 0 } else { skip_at };
        self.layers.push(Layer { start, seed, skip, skip_at });
        Ok(())
    }

    /// The samples skipped by the current epoch's layers, in skip order.
    pub fn skipped(&self) -> Vec<u64> {
        let mut out = vec![];
        for i in 0..self.layers.len() {
            let before = DataState { layers: self.layers[..i].to_vec(), ..self.clone() };
            let l = self.layers[i];
            for p in l.start + l.skip_at..l.start + l.skip_at + l.skip {
                out.push(before.locate(self.epoch_start + p).sample);
            }
        }
        out
    }

    /// The global positions rank `rank` of `world` trains on at optimizer step `step` with global batch
    /// `batch` (see the module doc).
    ///
    /// # Panics
    /// If `world` does not divide `batch` or `rank >= world` (config validation rules these out).
    pub fn rank_positions(step: u64, batch: u64, rank: u64, world: u64) -> std::ops::Range<u64> {
        assert!(rank < world && batch % world == 0, "rank {rank} of {world} with batch {batch}");
        let per_rank = batch / world;
        let start = step * batch + rank * per_rank;
        start..start + per_rank
    }
}

/// The permutation a layer applies to the `remaining` positions after its start and skip.
fn layer_perm(l: &Layer, remaining: u64) -> Permutation {
    Permutation::new(remaining, mix64(l.seed ^ 0x5EED_1A7E_u64.wrapping_mul(l.start + 1)))
}

/// An order-independent digest of a multiset of sample ids: equal for the same samples however they were
/// split across ranks or micro-batches, different (with overwhelming probability) otherwise.
pub fn digest(ids: impl IntoIterator<Item = u64>) -> u64 {
    ids.into_iter().fold(0u64, |acc, id| acc.wrapping_add(mix64(id ^ 0x00D1_6E57)))
}
