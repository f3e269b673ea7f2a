//! Resuming the data stream: cost of the first batch at position 0 vs 10^9 of n = 10^10 samples, against
//! fast-forwarding (walking the order position by position, the cheapest possible replay: it reads no data).
//!
//! `cargo bench --bench resume`; results go in BENCHMARKS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use tessera::data::DataState;

const N: u64 = 10_000_000_000;
const BATCH: u64 = 512;

/// Builds the state at `position` (what loading a checkpoint does) and locates one global batch.
fn resume_at(position: u64, layers: usize) -> u64 {
    let mut state = DataState::new(N, 17, 1);
    for l in 0..layers as u64 {
        state.add_layer(l * 1_000_000, 100 + l, 0).expect("layer");
    }
    state.seek(position);
    (position..position + BATCH).map(|g| state.locate(g).sample).fold(0, u64::wrapping_add)
}

/// Replays the order from 0 to `position`, then locates the batch.
fn fast_forward_to(position: u64) -> u64 {
    let state = DataState::new(N, 17, 1);
    let mut acc = 0u64;
    for g in 0..position {
        acc = acc.wrapping_add(state.locate(g).sample);
    }
    acc.wrapping_add((position..position + BATCH).map(|g| state.locate(g).sample).fold(0, u64::wrapping_add))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("resume_first_batch_of_512");
    for position in [0u64, 1_000_000_000] {
        g.bench_with_input(BenchmarkId::new("direct", position), &position, |b, &p| {
            b.iter(|| resume_at(black_box(p), 0))
        });
    }
    g.bench_with_input(
        BenchmarkId::new("direct_with_3_rollback_layers", 1_000_000_000u64),
        &1_000_000_000u64,
        |b, &p| b.iter(|| resume_at(black_box(p), 3)),
    );
    g.sample_size(10);
    for position in [10_000u64, 1_000_000] {
        g.bench_with_input(BenchmarkId::new("fast_forward", position), &position, |b, &p| {
            b.iter(|| fast_forward_to(black_box(p)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
