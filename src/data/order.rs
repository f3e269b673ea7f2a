//! `SampleOrder`: a stateless, seeded permutation of `[0, n)`, evaluated one position at a time.
//!
//! A keyed Feistel network permutes the smallest domain of `4^h >= n` integers (two `h`-bit halves);
//! positions that land outside `[0, n)` are walked through the permutation again ("cycle walking") until they
//! land inside. Since the domain is less than `4n`, the expected walk is under four rounds of the network, so
//! looking up position `p` costs O(1) time and memory, however large `n` is and wherever `p` is: resuming at
//! position 10^9 costs what resuming at 0 does.

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

/// A permutation of `[0, n)` determined by `(seed, epoch)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleOrder {
    n: u64,
    key: u64,
    half_bits: u32,
}

impl SampleOrder {
    /// The order of epoch `epoch` under `seed` over `n` samples.
    pub fn new(n: u64, seed: u64, epoch: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros(); // ceil(log2 n)
        let half_bits = bits.div_ceil(2).max(1);
        SampleOrder {
            n,
            key: mix64(mix64(seed) ^ epoch),
            half_bits,
        }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The sample at position `pos`.
    ///
    /// # Panics
    /// If `pos >= n`.
    pub fn at(&self, pos: u64) -> u64 {
        assert!(pos < self.n, "position {pos} outside [0, {})", self.n);
        let mut x = pos;
        loop {
            x = self.feistel(x);
            if x < self.n {
                return x;
            }
        }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for round in 0..ROUNDS {
            let f = mix64(
                r ^ self.key.rotate_left(round as u32 * 11)
                    ^ round.wrapping_mul(0xA24B_AED4_963E_E407),
            );
            (l, r) = (r, l ^ (f & mask));
        }
        (l << self.half_bits) | r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_small_order_is_a_permutation() {
        for n in [1u64, 2, 3, 5, 16, 17, 100, 1000] {
            for seed in 0..3 {
                let o = SampleOrder::new(n, seed, 0);
                let mut seen: Vec<u64> = (0..n).map(|p| o.at(p)).collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n={n} seed={seed}");
            }
        }
    }

    #[test]
    fn seeds_and_epochs_give_different_orders() {
        let a: Vec<u64> = (0..50)
            .map(|p| SampleOrder::new(1000, 1, 0).at(p))
            .collect();
        let b: Vec<u64> = (0..50)
            .map(|p| SampleOrder::new(1000, 2, 0).at(p))
            .collect();
        let c: Vec<u64> = (0..50)
            .map(|p| SampleOrder::new(1000, 1, 1).at(p))
            .collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
