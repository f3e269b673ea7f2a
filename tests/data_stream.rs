//! The data stream: permutations per epoch (with rollback layers and skips), one global order for any
//! world size, and resumption that equals running straight through.

mod common;

use proptest::prelude::*;
use std::collections::BTreeSet;
use tessera::data::order::SampleOrder;
use tessera::data::prefetch::step_data;
use tessera::data::{DataState, LayerError, Prefetcher, StepShape, TokenizerKind};

/// Every sample of one epoch under `state`: the trained positions of the (layered) epoch plus the skipped.
fn epoch_samples(state: &DataState) -> (Vec<u64>, Vec<u64>) {
    let trained = (0..state.epoch_len()).map(|p| state.locate(state.epoch_start + p).sample).collect();
    (trained, state.skipped())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn every_epoch_is_a_permutation_of_all_samples(n in 1u64..3000, seed: u64, epoch in 0u64..5, block in 1u64..40) {
        let o = SampleOrder::with_blocks(n, seed, epoch, block);
        let seen: BTreeSet<u64> = (0..n).map(|p| o.at(p)).collect();
        prop_assert_eq!(seen.len() as u64, n);
        prop_assert_eq!(seen.last().copied(), Some(n - 1));
    }

    #[test]
    fn rollback_layers_keep_each_sample_exactly_once_per_epoch(
        n in 2u64..2000,
        seed: u64,
        block in 1u64..16,
        layers in prop::collection::vec((0.0f64..1.0, any::<u64>(), 0u64..30, 0u64..20), 0..6),
    ) {
        let mut state = DataState::new(n, seed, block);
        let mut at = 0u64;
        for (frac, layer_seed, skip, skip_at) in layers {
            // Rollback targets move forward through the epoch (a checkpoint is never before the layers it has).
            let remaining = state.epoch_len() - (at - state.epoch_start);
            let pos = at + ((remaining - 1) as f64 * frac) as u64;
            let left = state.epoch_len() - (pos - state.epoch_start);
            let skip_at = skip_at.min(left - 1);
            let skip = skip.min(left - skip_at - 1);
            state.add_layer_skipping(pos, layer_seed, skip_at, skip).unwrap();
            at = pos;
        }
        prop_assert_eq!(state.check(), Ok(()), "every state the stream makes passes the check on loading");
        let (trained, skipped) = epoch_samples(&state);
        let mut all: Vec<u64> = trained.iter().chain(&skipped).copied().collect();
        all.sort_unstable();
        prop_assert_eq!(all, (0..n).collect::<Vec<_>>(), "trained + skipped is one permutation of the epoch");
        prop_assert_eq!(trained.len() as u64, state.epoch_len());
    }
}

#[test]
fn a_data_state_no_stream_could_have_made_is_refused_on_loading_instead_of_panicking_later() {
    let mut good = DataState::new(100, 1, 1);
    good.add_layer_skipping(10, 7, 2, 5).unwrap();
    good.seek(40);
    assert_eq!(good.check(), Ok(()));
    let mut skips_everything = good.clone();
    skips_everything.layers[0].skip = 1000; // `n - skips` underflowed
    let mut before_its_epoch = good.clone();
    before_its_epoch.epoch_start = 50; // `locate` asserted
    let mut out_of_order = good.clone();
    out_of_order.layers.push(tessera::data::stream::Layer { start: 3, seed: 1, skip: 0, skip_at: 0 });
    let mut empty = good.clone();
    empty.n = 0;
    for (what, bad) in [("skip", skips_everything), ("start", before_its_epoch), ("order", out_of_order), ("n", empty)]
    {
        assert!(bad.check().is_err(), "{what}: {bad:?}");
    }
}

#[test]
fn a_skip_window_can_start_after_the_rollback_point_where_a_spike_began() {
    let mut state = DataState::new(1000, 5, 1);
    let before: Vec<u64> = (0..1000).map(|g| state.locate(g).sample).collect();
    // Roll back to position 400; the spike's data was at 440..470.
    state.add_layer_skipping(400, 99, 40, 30).unwrap();
    assert_eq!(state.epoch_len(), 970);
    assert_eq!(state.skipped(), before[440..470].to_vec(), "exactly the offending window is skipped");
    let trained_after: BTreeSet<u64> = (400..970).map(|g| state.locate(g).sample).collect();
    let expected: BTreeSet<u64> = before[400..440].iter().chain(&before[470..]).copied().collect();
    assert_eq!(trained_after, expected, "the clean data between the rollback point and the spike is kept");
    // A window past the end is refused; one reaching past it is cut.
    let mut s = DataState::new(100, 1, 1);
    assert!(matches!(s.add_layer_skipping(50, 2, 60, 5), Err(LayerError::SkipPastEnd { .. })));
    s.add_layer_skipping(50, 2, 40, 30).unwrap();
    assert_eq!(s.epoch_len(), 90);
    // Skipping the whole rest of an epoch ends it at the rollback point; the next epoch is complete.
    let mut s = DataState::new(100, 1, 1);
    s.add_layer_skipping(60, 2, 0, 500).unwrap();
    assert_eq!((s.epoch_len(), s.skipped().len()), (60, 40));
    assert_eq!((s.locate(60).epoch, s.locate(60).offset), (1, 0));
    assert!(matches!(DataState::new(100, 1, 1).add_layer(0, 2, 100), Err(LayerError::SkipTooLarge { .. })));
}

#[test]
fn a_layer_keeps_the_prefix_and_reshuffles_only_the_rest() {
    let mut state = DataState::new(1000, 5, 1);
    let before: Vec<u64> = (0..1000).map(|g| state.locate(g).sample).collect();
    state.add_layer(400, 99, 0).unwrap();
    let after: Vec<u64> = (0..1000).map(|g| state.locate(g).sample).collect();
    assert_eq!(before[..400], after[..400], "positions before the rollback point are history");
    assert_ne!(before[400..], after[400..], "the rest of the epoch gets a fresh order");
    let rest_before: BTreeSet<u64> = before[400..].iter().copied().collect();
    let rest_after: BTreeSet<u64> = after[400..].iter().copied().collect();
    assert_eq!(rest_before, rest_after, "the same remaining samples, in another order");
}

#[test]
fn a_skip_jumps_over_the_window_after_the_rollback_point_and_accounts_for_it() {
    let mut state = DataState::new(1000, 5, 1);
    let before: Vec<u64> = (0..1000).map(|g| state.locate(g).sample).collect();
    state.add_layer(400, 99, 25).unwrap();
    assert_eq!(state.epoch_len(), 975);
    assert_eq!(state.skipped(), before[400..425].to_vec(), "the offending window is what gets skipped");
    let trained_after: BTreeSet<u64> = (400..975).map(|g| state.locate(g).sample).collect();
    assert!(before[400..425].iter().all(|s| !trained_after.contains(s)));
    // The next epoch starts right after the shortened one, clean and complete.
    let next = state.locate(975);
    assert_eq!((next.epoch, next.offset), (1, 0));
    assert_eq!(next.sample, SampleOrder::new(1000, 5, 1).at(0));
}

#[test]
fn epochs_follow_each_other_with_fresh_orders() {
    let state = DataState::new(100, 3, 1);
    let e0: Vec<u64> = (0..100).map(|g| state.locate(g).sample).collect();
    let e1: Vec<u64> = (100..200).map(|g| state.locate(g).sample).collect();
    assert_ne!(e0, e1);
    assert_eq!(state.locate(250).epoch, 2);
    let mut sorted = e1.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
}

#[test]
fn world_sizes_one_to_four_with_the_same_batch_consume_the_same_global_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 3, TokenizerKind::Byte);
    let shards = std::sync::Arc::new(tessera::data::TokenShards::open(&corpus).unwrap());
    let (set, _) = tessera::data::SampleSet::split(shards, 32, 0.0).unwrap();
    let mut state = DataState::new(set.len, 11, 4);
    state.add_layer(50, 3, 2).unwrap(); // a rollback in the history changes nothing about this
    let batch = 12;
    let global = |world: u64, step: u64| -> (Vec<u64>, Vec<i64>, u64) {
        let mut ids = vec![];
        let mut tokens = vec![];
        let mut digest = 0u64;
        for rank in 0..world {
            let shape = StepShape { batch, micro_batch: batch / world, rank, world };
            let d = step_data(&set, &state, shape, step).unwrap();
            digest = digest.wrapping_add(d.digest);
            for m in d.micro {
                ids.extend(m.ids);
                tokens.extend(m.tokens);
            }
        }
        (ids, tokens, digest)
    };
    for step in [0, 1, 4, 9, 30] {
        let reference = global(1, step);
        for world in [2, 3, 4] {
            assert_eq!(global(world, step), reference, "world {world}, step {step}");
        }
    }
}

#[test]
fn resuming_from_a_serialized_state_continues_exactly_as_running_straight_through() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::stdlib_corpus(&corpus, 3, TokenizerKind::Byte);
    let shards = std::sync::Arc::new(tessera::data::TokenShards::open(&corpus).unwrap());
    let (set, _) = tessera::data::SampleSet::split(shards, 32, 0.0).unwrap();
    let batch = 8;
    let shape = StepShape { batch, micro_batch: 4, rank: 0, world: 1 };
    let n = set.len;

    // A rollback to the checkpoint of step `k` reshuffled the rest of epoch 0 and skipped a window that
    // starts some positions later. The skip is chosen so that epoch 0 ends inside a step.
    let k = n / batch / 3;
    let skip_at = 3 * batch + 1;
    let skip = (2 * batch + 3..).find(|s| (n - s) % batch != 0).unwrap();
    let mut layered = DataState::new(n, 1, 1);
    layered.add_layer_skipping(k * batch, 77, skip_at, skip).unwrap();
    let epoch_len = n - skip;
    assert_eq!(layered.epoch_len(), epoch_len);
    let skipped: BTreeSet<u64> = layered.skipped().into_iter().collect();
    assert_eq!(skipped.len() as u64, skip);

    // Straight through: one prefetcher from the start (the layer leaves positions before `k·B` as they were)
    // to well into epoch 1.
    let steps = epoch_len / batch + 20;
    let mut straight = Prefetcher::start(set.clone(), layered.clone(), shape, 0, steps, 3);
    let all: Vec<_> = (0..steps).map(|_| straight.next_step().unwrap().0).collect();
    let base = DataState::new(n, 1, 1);
    for want in &all[..k as usize] {
        assert_eq!(step_data(&set, &base, shape, want.step).unwrap().micro, want.micro, "history before the rollback");
    }
    let ids: Vec<u64> = all.iter().flat_map(|d| d.micro.iter().flat_map(|m| m.ids.iter().copied())).collect();
    let epoch0 = &ids[..epoch_len as usize];
    assert!(epoch0.iter().all(|id| !skipped.contains(id)), "a skipped sample was trained on in epoch 0");
    let mut seen: Vec<u64> = epoch0.iter().chain(&skipped).copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..n).collect::<Vec<_>>(), "trained plus skipped is epoch 0 exactly once");
    let epoch1 = SampleOrder::new(n, 1, 1);
    assert_eq!(ids[epoch_len as usize..], (0..ids.len() as u64 - epoch_len).map(|p| epoch1.at(p)).collect::<Vec<_>>());

    // Interrupted, as the trainer runs: the live state seeks after every step; a checkpoint serializes it.
    // One stop lies in epoch 0 (the saved state carries the layer), one past its end (seeking there moved
    // the state into epoch 1, starting where the shortened epoch 0 ended).
    let boundary_step = epoch_len / batch;
    for stop in [boundary_step - 2, boundary_step + 3] {
        let mut live = layered.clone();
        for step in k..stop {
            live.seek((step + 1) * batch);
        }
        if stop < boundary_step {
            assert_eq!(live.layers.len(), 1, "stopped in epoch 0, with its layer");
        } else {
            assert_eq!((live.epoch, live.epoch_start, live.layers.len()), (1, epoch_len, 0), "stopped in epoch 1");
        }
        let saved = serde_json::to_string(&live).unwrap();
        assert!(saved.len() < 300, "the state is small: {saved}");
        let restored: DataState = serde_json::from_str(&saved).unwrap();
        assert_eq!(restored, live);
        let mut resumed = Prefetcher::start(set.clone(), restored, shape, stop, steps, 3);
        for want in &all[stop as usize..] {
            let got = resumed.next_step().unwrap().0;
            assert_eq!((got.step, got.epoch, got.digest), (want.step, want.epoch, want.digest), "stop {stop}");
            assert_eq!(got.micro, want.micro, "stop {stop}, step {}", want.step);
        }
        assert!(matches!(resumed.next_step(), Err(tessera::data::DataError::PrefetchEnded)));
    }
    assert!(all[boundary_step as usize].epoch == 0 && all[boundary_step as usize + 1].epoch == 1);
}
