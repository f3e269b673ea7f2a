//! The gradient all-reduce overlapped with backward: buckets start their all-reduce while backward is still
//! running, and the step comes out as it does when the whole gradient is reduced after backward. Ranks are
//! threads of this process joined by a real TCP ring on loopback.

mod common;

use common::rings;
use tch::{Device, Kind, Tensor};
use tessera::comm::Communicator;
use tessera::data::Batch;
use tessera::model::optim::ShardLayout;
use tessera::model::{AdamW, AdamWConfig, Gpt, GptConfig};
use tessera::train::overlap::Buckets;
use tessera::train::step::{try_step, StepFaults, StepOutcome, StepOutput};

fn config() -> GptConfig {
    GptConfig { n_layer: 4, n_head: 4, d_model: 64, seq_len: 32, vocab_size: 128 }
}

/// Rank `rank`'s micro-batches for a step: its own tokens (ranks see different data).
fn batches(rank: usize, micro: usize) -> Vec<Batch> {
    let c = config();
    (0..micro)
        .map(|m| {
            let base = (rank * 7 + m * 3) as i64;
            let t = (Tensor::arange(4 * (c.seq_len + 1), (Kind::Int64, Device::Cpu)) * (base + 5) + base)
                .remainder(c.vocab_size)
                .view([4, c.seq_len + 1]);
            Batch {
                inputs: t.narrow(1, 0, c.seq_len).contiguous(),
                targets: t.narrow(1, 1, c.seq_len).contiguous(),
                ids: vec![0; 4],
            }
        })
        .collect()
}

struct RankResult {
    outputs: Vec<(f64, f64, f64, usize)>,
    /// Whether the step said some rank was asked to stop (the last rank asks before the third step).
    stops: Vec<bool>,
    weights: Tensor,
}

/// Three steps on every rank of a `world`-rank ring, with the overlap over `bucket_elems`-element buckets
/// (`None`: reduce after backward); `faults` on rank 1's second step.
fn train(world: usize, bucket_elems: Option<i64>, micro: usize, faults: StepFaults) -> Vec<(RankResult, Vec<bool>)> {
    tch::set_num_threads(1);
    let mut rings = rings(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = rings
            .iter_mut()
            .enumerate()
            .map(|(rank, ring)| {
                s.spawn(move || {
                    let mut model = Gpt::new(config(), Device::Cpu, 11);
                    let mut opt = AdamW::new(AdamWConfig::default(), &model.params.flat);
                    let shard = ShardLayout::new(0, rank, world, model.params.layout.numel);
                    let buckets = bucket_elems.map(|n| Buckets::new(&model.params.layout, n));
                    let (mut outputs, mut oom, mut stops) = (vec![], vec![], vec![]);
                    for step in 0..3 {
                        let f = if rank == 1 && step == 1 { faults } else { StepFaults::default() };
                        let comm: &mut dyn Communicator = ring;
                        let outcome = try_step(
                            &mut model,
                            &mut opt,
                            &shard,
                            comm,
                            &batches(rank, micro),
                            1e-3,
                            1.0,
                            f,
                            buckets.as_ref(),
                            rank == world - 1 && step == 2,
                        )
                        .unwrap();
                        match outcome {
                            StepOutcome::Done(StepOutput {
                                loss,
                                grad_norm,
                                local_grad_norm,
                                overlapped,
                                stop,
                                ..
                            }) => {
                                stops.push(stop);
                                outputs.push((
                                    loss.double_value(&[]),
                                    grad_norm.double_value(&[]),
                                    local_grad_norm.double_value(&[]),
                                    overlapped,
                                ));
                                oom.push(false);
                            }
                            StepOutcome::OutOfMemory(_) => oom.push(true),
                        }
                    }
                    (RankResult { outputs, stops, weights: model.params.flat.copy() }, oom)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn buckets_are_reduced_while_backward_runs_and_the_step_equals_reducing_afterwards() {
    let overlapped = train(2, Some(4_000), 2, StepFaults::default());
    let after = train(2, None, 2, StepFaults::default());
    let buckets = Buckets::new(&Gpt::new(config(), Device::Cpu, 0).params.layout, 4_000).len();
    assert!(buckets >= 8, "the model is cut into {buckets} buckets");
    for rank in 0..2 {
        let (a, b) = (&overlapped[rank].0, &after[rank].0);
        for (step, (x, y)) in a.outputs.iter().zip(&b.outputs).enumerate() {
            // Two ranks: every element's average is (a + b) / 2 whatever the buckets, so bit for bit.
            assert_eq!((x.0, x.1), (y.0, y.1), "rank {rank} step {step}: loss and gradient norm");
            // The local norm is summed per tensor in fp64 on the way, rather than over the flat fp32 buffer.
            assert!((x.2 - y.2).abs() < 1e-5 * y.2, "rank {rank} step {step}: local norm {} vs {}", x.2, y.2);
            // Every bucket went to the reduction thread from a hook, inside backward, none after it.
            assert_eq!(x.3, buckets, "rank {rank} step {step}: buckets handed over during backward");
            assert_eq!(y.3, 0);
        }
        assert!(a.weights.equal(&b.weights), "rank {rank}: weights differ");
    }
    // Replicas agree.
    assert!(overlapped[0].0.weights.equal(&overlapped[1].0.weights));
    // One rank asked to stop before the third step, and both ranks learn it from that step.
    for (r, _) in overlapped.iter().chain(&after) {
        assert_eq!(r.stops, [false, false, true]);
    }
}

#[test]
fn three_ranks_overlapped_match_three_ranks_reduced_afterwards_to_float_rounding() {
    let overlapped = train(3, Some(4_000), 1, StepFaults::default());
    let after = train(3, None, 1, StepFaults::default());
    for rank in 0..3 {
        let (a, b) = (&overlapped[rank].0, &after[rank].0);
        for (x, y) in a.outputs.iter().zip(&b.outputs) {
            assert!((x.0 - y.0).abs() < 1e-6 && (x.1 - y.1).abs() < 1e-5 * y.1, "{x:?} vs {y:?}");
            assert!(x.3 > 0, "buckets handed over during backward");
        }
        let d = (&a.weights - &b.weights).abs().max().double_value(&[]);
        assert!(d < 1e-6, "rank {rank}: weights differ by {d}");
    }
}

#[test]
fn an_out_of_memory_on_one_rank_mid_overlap_is_agreed_by_both_and_nothing_hangs() {
    let faults = StepFaults { out_of_memory: true, ..StepFaults::default() };
    let results = train(2, Some(4_000), 2, faults);
    for (rank, (r, oom)) in results.iter().enumerate() {
        assert_eq!(oom, &vec![false, true, false], "rank {rank} sees the failed attempt of step 1");
        assert_eq!(r.outputs.len(), 2);
    }
    assert!(results[0].0.weights.equal(&results[1].0.weights), "replicas agree after the failed attempt");
}

#[test]
fn a_faulty_ranks_gradient_scale_is_applied_before_averaging_with_the_overlap_too() {
    let faults = StepFaults { grad_scale: Some(1000.0), ..StepFaults::default() };
    let overlapped = train(2, Some(4_000), 1, faults);
    let after = train(2, None, 1, faults);
    let (a, b) = (&overlapped[1].0.outputs[1], &after[1].0.outputs[1]);
    assert_eq!(a.1, b.1, "the faulty step's global norm");
    assert!((a.2 - b.2).abs() < 1e-5 * b.2, "its local norm: {} vs {}", a.2, b.2);
    assert!(a.2 > 100.0 * overlapped[0].0.outputs[1].2, "rank 1's local norm shows the fault");
}

#[test]
fn a_panic_in_backward_still_completes_the_collectives_then_goes_on_unwinding() {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let mut rings = rings(2);
    let results: Vec<Result<bool, _>> = std::thread::scope(|s| {
        let handles: Vec<_> = rings
            .iter_mut()
            .enumerate()
            .map(|(rank, ring)| {
                s.spawn(move || {
                    let model = Gpt::new(config(), Device::Cpu, 1);
                    let buckets = tessera::train::overlap::Buckets::new(&model.params.layout, 4_000);
                    catch_unwind(AssertUnwindSafe(|| {
                        let comm: &mut dyn Communicator = ring;
                        tessera::train::overlap::reduce_overlapped(&model.params, &buckets, comm, None, || {
                            if rank == 1 {
                                panic!("a bug in backward");
                            }
                        })
                        .is_ok()
                    }))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(matches!(results[0], Ok(true)), "rank 0's reduction completed");
    assert!(results[1].is_err(), "rank 1's panic came through, after the collectives");
}
