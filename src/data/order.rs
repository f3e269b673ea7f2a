//! `SampleOrder`: a stateless, seeded permutation of `[0, n)`, evaluated one position at a time.
//!
//! A keyed Feistel network permutes the smallest domain of `4^h >= n` integers (two `h`-bit halves);
//! positions that land outside `[0, n)` are walked through the permutation again ("cycle walking") until they
//! land inside. Since the domain is less than `4n`, the expected walk is under four passes of the network, so
//! looking up position `p` costs O(1) time and memory, however large `n` is and wherever `p` is: resuming at
//! position 10^9 costs what resuming at 0 does. The network can be run backwards, so the inverse (which
//! position holds sample `i`) is O(1) as well.
//!
//! **Shard locality.** With `block > 1`, the order shuffles blocks of `block` neighbouring samples and then the
//! samples within each block: consecutive positions stay within one block, so a loader streaming shards from
//! object storage reads each region of the corpus in a burst instead of scattering reads across all shards.
//! The last block may be short; it is shuffled among the others like any block.

/// Feistel rounds. Four already give a pseudo-random permutation for a random round function (Luby–Rackoff);
/// six leave margin for our cheap round function.
const ROUNDS: u64 = 6;

/// SplitMix64's finalizer: a fast, well-mixed 64-bit hash.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A keyed permutation of `[0, n)`: the Feistel network with cycle walking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permutation {
    n: u64,
    key: u64,
    half_bits: u32,
}

impl Permutation {
    pub fn new(n: u64, key: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros(); // ceil(log2 n)
        Permutation { n, key: mix64(key), half_bits: bits.div_ceil(2).max(1) }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn round(&self, r: u64, round: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        mix64(r ^ self.key.rotate_left(round as u32 * 11) ^ round.wrapping_mul(0xA24B_AED4_963E_E407)) & mask
    }

    fn forward(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for round in 0..ROUNDS {
            (l, r) = (r, l ^ self.round(r, round));
        }
        (l << self.half_bits) | r
    }

    fn backward(&self, y: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (y >> self.half_bits, y & mask);
        for round in (0..ROUNDS).rev() {
            (l, r) = (r ^ self.round(l, round), l);
        }
        (l << self.half_bits) | r
    }

    /// The element at position `pos`.
    ///
    /// # Panics
    /// If `pos >= n`.
    pub fn at(&self, pos: u64) -> u64 {
        assert!(pos < self.n, "position {pos} outside [0, {})", self.n);
        let mut x = self.forward(pos);
        while x >= self.n {
            x = self.forward(x);
        }
        x
    }

    /// The position of element `x`: `at(position_of(x)) == x`.
    ///
    /// # Panics
    /// If `x >= n`.
    pub fn position_of(&self, x: u64) -> u64 {
        assert!(x < self.n, "element {x} outside [0, {})", self.n);
        let mut p = self.backward(x);
        while p >= self.n {
            p = self.backward(p);
        }
        p
    }
}

/// The order of one epoch: a permutation of `[0, n)` determined by `(seed, epoch)`, optionally shard-local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleOrder {
    n: u64,
    block: u64,
    key: u64,
    /// Permutation of the blocks (of the samples themselves when `block == 1`).
    blocks: Permutation,
}

impl SampleOrder {
    /// The order of epoch `epoch` under `seed` over `n` samples, shuffling plainly.
    pub fn new(n: u64, seed: u64, epoch: u64) -> Self {
        Self::with_blocks(n, seed, epoch, 1)
    }

    /// As [`SampleOrder::new`], shuffling blocks of `block` neighbouring samples, then within each block.
    pub fn with_blocks(n: u64, seed: u64, epoch: u64, block: u64) -> Self {
        let block = block.max(1);
        let key = mix64(mix64(seed) ^ epoch);
        SampleOrder { n, block, key, blocks: Permutation::new(n.div_ceil(block), key) }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The sample at position `pos`, in O(1).
    ///
    /// # Panics
    /// If `pos >= n`.
    pub fn at(&self, pos: u64) -> u64 {
        assert!(pos < self.n, "position {pos} outside [0, {})", self.n);
        if self.block == 1 {
            return self.blocks.at(pos);
        }
        let b = self.block;
        let m = self.blocks.len();
        let short = self.n - (m - 1) * b; // size of the last block, in 1..=b
                                          // The short block lands in some slot; slots after it start `b - short` earlier.
        let short_slot = self.blocks.position_of(m - 1);
        let (slot, offset) = if pos < short_slot * b {
            (pos / b, pos % b)
        } else if pos < short_slot * b + short {
            (short_slot, pos - short_slot * b)
        } else {
            let rest = pos - short_slot * b - short;
            (short_slot + 1 + rest / b, rest % b)
        };
        let block = self.blocks.at(slot);
        let size = if block == m - 1 { short } else { b };
        let within = Permutation::new(size, self.key ^ mix64(block.wrapping_add(1)));
        block * b + within.at(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(n: u64, f: impl Fn(u64) -> u64) -> bool {
        let mut seen: Vec<u64> = (0..n).map(f).collect();
        seen.sort_unstable();
        seen == (0..n).collect::<Vec<_>>()
    }

    #[test]
    fn every_small_order_is_a_permutation() {
        for n in [1u64, 2, 3, 5, 16, 17, 100, 1000] {
            for seed in 0..3 {
                assert!(is_permutation(n, |p| SampleOrder::new(n, seed, 0).at(p)), "n={n} seed={seed}");
                for block in [2, 7, 64] {
                    let o = SampleOrder::with_blocks(n, seed, 1, block);
                    assert!(is_permutation(n, |p| o.at(p)), "n={n} seed={seed} block={block}");
                }
            }
        }
    }

    #[test]
    fn position_of_inverts_at() {
        let p = Permutation::new(1000, 42);
        for x in 0..1000 {
            assert_eq!(p.at(p.position_of(x)), x);
        }
    }

    #[test]
    fn seeds_and_epochs_give_different_orders() {
        let a: Vec<u64> = (0..50).map(|p| SampleOrder::new(1000, 1, 0).at(p)).collect();
        let b: Vec<u64> = (0..50).map(|p| SampleOrder::new(1000, 2, 0).at(p)).collect();
        let c: Vec<u64> = (0..50).map(|p| SampleOrder::new(1000, 1, 1).at(p)).collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn blocked_order_keeps_consecutive_positions_in_one_block() {
        let o = SampleOrder::with_blocks(10_000, 3, 0, 100);
        // Positions 0..100 all come from one block of 100 neighbouring samples (the first slot is full unless
        // it holds the short last block, and 10_000 is a multiple of 100, so there is none).
        let first: Vec<u64> = (0..100).map(|p| o.at(p) / 100).collect();
        assert!(first.iter().all(|&b| b == first[0]));
        let ids: Vec<u64> = (0..100).map(|p| o.at(p)).collect();
        assert_ne!(ids, (first[0] * 100..first[0] * 100 + 100).collect::<Vec<_>>(), "shuffled within the block");
    }
}
