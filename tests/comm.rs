//! The TCP ring: collectives equal a local reference for every world size from 1 to 4 and awkward sizes,
//! results are deterministic, set-up refuses a wrong secret, and deadlines and aborts end blocked calls
//! instead of hanging. Ranks are threads of this process on `127.0.0.1:0` listeners.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tessera::comm::tcp::TcpRing;
use tessera::comm::{CommError, Communicator, ReduceOp};

const SECRET: &[u8] = b"test run secret";
const SETUP: Duration = Duration::from_secs(20);

/// Binds `world` listeners on loopback and returns them with their addresses.
fn listeners(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

/// Connects a ring of `world` ranks (threads) with one secret per rank; returns each rank's result.
fn connect_with(secrets: &[&[u8]], timeout: Duration) -> Vec<Result<TcpRing, CommError>> {
    let world = secrets.len();
    let (ls, addrs) = listeners(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, secret) = (&addrs, secrets[rank]);
                s.spawn(move || TcpRing::connect(rank, world, l, addrs, secret, timeout))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn ring(world: usize) -> Vec<TcpRing> {
    TcpRing::on_loopback(world, SECRET, SETUP).unwrap()
}

/// Runs `f` on every rank at once and returns the results in rank order.
fn on_all<R: Send>(rings: &mut [TcpRing], f: impl Fn(usize, &mut TcpRing) -> R + Sync) -> Vec<R> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = rings.iter_mut().enumerate().map(|(r, ring)| s.spawn(move || f(r, ring))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank `rank`'s input: varied signs and magnitudes, different on every rank.
fn data(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u64).wrapping_mul(2654435761).wrapping_add(rank as u64 * 40503) % 20011;
            (h as f32 - 10005.0) / 997.0
        })
        .collect()
}

fn to_vec<T: tch::kind::Element + Default + Clone>(t: &Tensor) -> Vec<T> {
    let mut v = vec![T::default(); t.numel()];
    t.copy_data(&mut v, t.numel());
    v
}

fn reference(inputs: &[Vec<f32>], op: ReduceOp) -> Vec<f64> {
    let w = inputs.len() as f64;
    (0..inputs[0].len())
        .map(|i| {
            let col = inputs.iter().map(|v| v[i] as f64);
            match op {
                ReduceOp::Sum => col.sum(),
                ReduceOp::Avg => col.sum::<f64>() / w,
                ReduceOp::Max => col.fold(f64::NEG_INFINITY, f64::max),
            }
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: element {i} is {g}, expected {w}");
    }
}

#[test]
fn all_reduce_sum_avg_and_max_match_a_local_reference_for_worlds_of_one_to_four_and_awkward_sizes() {
    for world in 1..=4 {
        let mut rings = ring(world);
        for n in [0, 1, world - 1, 7, 1000, 1_000_003] {
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, n)).collect();
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                let outs = on_all(&mut rings, |r, ring| {
                    let mut t = Tensor::from_slice(&inputs[r]);
                    ring.all_reduce(&mut t, op).unwrap();
                    to_vec::<f32>(&t)
                });
                let want = reference(&inputs, op);
                for (r, got) in outs.iter().enumerate() {
                    let what = format!("world {world}, n {n}, {op:?}, rank {r}");
                    if op == ReduceOp::Max {
                        let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
                        assert_eq!(got, &want, "{what}");
                    } else {
                        assert_close(got, &want, &what);
                    }
                    assert_eq!(got, &outs[0], "{what}: every rank holds the same bits");
                }
            }
        }
        // Every call above was counted: 6 sizes × 3 ops.
        assert!(rings.iter().all(|r| r.seq() == 18));
    }
}

#[test]
fn int64_sum_and_max_are_exact_and_double_sums_match() {
    let mut rings = ring(3);
    let outs = on_all(&mut rings, |r, ring| {
        let base = 1i64 << 40;
        let v: Vec<i64> = (0..1001).map(|i| base + i * (r as i64 + 1) - 500).collect();
        let mut sum = Tensor::from_slice(&v);
        ring.all_reduce(&mut sum, ReduceOp::Sum).unwrap();
        let mut max = Tensor::from_slice(&v);
        ring.all_reduce(&mut max, ReduceOp::Max).unwrap();
        let mut dbl = Tensor::from_slice(&v).to_kind(Kind::Double) / 3.0;
        ring.all_reduce(&mut dbl, ReduceOp::Avg).unwrap();
        (to_vec::<i64>(&sum), to_vec::<i64>(&max), to_vec::<f64>(&dbl))
    });
    for (sum, max, dbl) in outs {
        for i in 0..1001i64 {
            let base = 1i64 << 40;
            assert_eq!(sum[i as usize], 3 * base + i * 6 - 1500);
            assert_eq!(max[i as usize], base + i * 3 - 500);
            let want = (3 * base + i * 6 - 1500) as f64 / 9.0;
            assert!((dbl[i as usize] - want).abs() <= 1e-12 * want.abs(), "{} vs {want}", dbl[i as usize]);
        }
    }
}

#[test]
fn the_same_inputs_twice_give_bit_identical_outputs() {
    let mut rings = ring(3);
    let run = |rings: &mut [TcpRing]| {
        on_all(rings, |r, ring| {
            // Magnitudes spread over many orders so that the summation order shows in the bits.
            let v: Vec<f32> =
                data(r, 100_003).iter().enumerate().map(|(i, x)| x * 10f32.powi((i % 13) as i32 - 6)).collect();
            let mut t = Tensor::from_slice(&v);
            ring.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            to_vec::<f32>(&t).iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        })
    };
    let first = run(&mut rings);
    let second = run(&mut rings);
    let fresh = run(&mut ring(3));
    assert_eq!(first, second);
    assert_eq!(first, fresh, "a new ring of the same size gives the same bits");
    assert!(first.iter().all(|bits| *bits == first[0]), "all ranks agree bit for bit");
}

#[test]
fn reduce_scatter_then_all_gather_equals_all_reduce() {
    let (world, k) = (3, 1001);
    let mut rings = ring(world);
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
        let outs = on_all(&mut rings, |r, ring| {
            let input = Tensor::from_slice(&data(r, world * k));
            let mut shard = Tensor::zeros([k as i64], (Kind::Float, Device::Cpu));
            ring.reduce_scatter(&input, &mut shard, op).unwrap();
            let mut gathered = Tensor::zeros([(world * k) as i64], (Kind::Float, Device::Cpu));
            ring.all_gather(&shard, &mut gathered).unwrap();
            let mut whole = input.copy();
            ring.all_reduce(&mut whole, op).unwrap();
            (to_vec::<f32>(&shard), to_vec::<f32>(&gathered), to_vec::<f32>(&whole))
        });
        for (r, (shard, gathered, whole)) in outs.iter().enumerate() {
            assert_eq!(gathered, whole, "{op:?}, rank {r}");
            assert_eq!(shard[..], whole[r * k..(r + 1) * k], "{op:?}: rank {r} holds chunk {r}");
        }
    }
}

#[test]
fn all_gather_puts_each_ranks_input_at_its_chunk_even_from_a_view_of_the_output() {
    let (world, k) = (3, 70_001);
    let mut rings = ring(world);
    let outs = on_all(&mut rings, |r, ring| {
        let mut out = Tensor::zeros([(world * k) as i64], (Kind::Float, Device::Cpu));
        ring.all_gather(&Tensor::from_slice(&data(r, k)), &mut out).unwrap();
        // ZeRO-style: the input is this rank's own chunk of the output.
        let mut ints = Tensor::zeros([(world * 2) as i64], (Kind::Int64, Device::Cpu));
        let _ = ints.narrow(0, (r * 2) as i64, 2).fill_(r as i64 + 10);
        let mine = ints.narrow(0, (r * 2) as i64, 2);
        ring.all_gather(&mine, &mut ints).unwrap();
        (to_vec::<f32>(&out), to_vec::<i64>(&ints))
    });
    let want: Vec<f32> = (0..world).flat_map(|r| data(r, k)).collect();
    for (floats, ints) in outs {
        assert_eq!(floats, want);
        assert_eq!(ints, vec![10, 10, 11, 11, 12, 12]);
    }
}

#[test]
fn broadcast_from_root_one_of_three_gives_every_rank_the_roots_tensor() {
    let mut rings = ring(3);
    let n = 300_007;
    let outs = on_all(&mut rings, |r, ring| {
        let mut t = Tensor::from_slice(&data(r, n));
        ring.broadcast(&mut t, 1).unwrap();
        to_vec::<f32>(&t)
    });
    assert!(outs.iter().all(|o| *o == data(1, n)));
}

#[test]
fn barrier_returns_on_every_rank() {
    for world in [1, 2, 4] {
        let mut rings = ring(world);
        let outs = on_all(&mut rings, |_, ring| (ring.barrier(), ring.barrier(), ring.seq()));
        assert!(outs.iter().all(|o| *o == (Ok(()), Ok(()), 2)), "world {world}: {outs:?}");
    }
}

#[test]
fn a_wrong_secret_on_one_rank_fails_set_up_on_both_sides_naming_the_secret() {
    let timeout = Duration::from_secs(10);
    let started = Instant::now();
    let results = connect_with(&[SECRET, b"another run's secret"], timeout);
    assert!(started.elapsed() < timeout, "refused at once, not at the deadline");
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Err(CommError::Setup(msg)) => assert!(msg.contains("wrong run secret"), "rank {rank}: {msg}"),
            Err(e) => panic!("rank {rank}: expected a set-up error, got {e}"),
            Ok(_) => panic!("rank {rank} connected with the wrong secret"),
        }
    }
}

#[test]
fn set_up_names_the_address_of_a_peer_that_never_listens() {
    let (mut ls, mut addrs) = listeners(1);
    // A port that was free a moment ago and has no listener now.
    addrs.push(TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    let started = Instant::now();
    let err = TcpRing::connect(0, 2, ls.remove(0), &addrs, SECRET, Duration::from_millis(500)).err().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let CommError::Setup(msg) = err else { panic!("{err}") };
    assert!(msg.contains(&addrs[1].to_string()), "{msg}");
}

#[test]
fn a_rank_that_never_calls_makes_its_peer_time_out_at_the_deadline() {
    let mut rings = ring(2);
    let timeout = Duration::from_millis(700);
    rings[0].set_timeout(timeout);
    let mut t = Tensor::from_slice(&data(0, 1_000_000));
    let started = Instant::now();
    // Rank 1 never enters: rank 0 blocks on its data (and, for 4 MB, on full socket buffers).
    let err = rings[0].all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
    let took = started.elapsed();
    assert_eq!(err, CommError::Timeout { op: "all_reduce", seq: 0, timeout });
    assert!(took >= timeout && took < timeout + Duration::from_secs(5), "took {took:?}");
    // The ring is broken now: later calls fail at once, on both ranks.
    assert!(matches!(rings[0].barrier(), Err(CommError::Aborted { op: "barrier", seq: 1 })));
    // Rank 1 reads what rank 0 had sent (an all_reduce header, not its barrier's), then end-of-file.
    let started = Instant::now();
    let err = rings[1].barrier().unwrap_err();
    assert!(matches!(err, CommError::Invalid { seq: 0, .. } | CommError::PeerLost { peer: 0, seq: 0, .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn abort_from_another_thread_ends_a_pending_call_with_aborted_at_once() {
    let mut rings = ring(2);
    rings[0].set_timeout(Duration::from_secs(60));
    let handle = rings[0].abort_handle();
    let started = Instant::now();
    let (err, later) = std::thread::scope(|s| {
        s.spawn(|| {
            // A deliberate pause so rank 0 is blocked inside the call when the abort lands (were it not
            // yet, the call would still fail with Aborted, through the already-aborted path).
            std::thread::sleep(Duration::from_millis(300));
            handle.abort();
        });
        let mut t = Tensor::from_slice(&data(0, 1_000_000));
        let err = rings[0].all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
        (err, rings[0].barrier().unwrap_err())
    });
    assert_eq!(err, CommError::Aborted { op: "all_reduce", seq: 0 });
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(later, CommError::Aborted { op: "barrier", seq: 1 });
    assert!(handle.is_aborted());
}

#[test]
fn aborting_one_rank_makes_peers_blocked_in_a_call_fail_fast_with_peer_lost() {
    let mut rings = ring(3);
    let handle = rings[2].abort_handle();
    let (left, _) = rings.split_at_mut(2);
    let started = Instant::now();
    let errs = std::thread::scope(|s| {
        s.spawn(|| {
            // A deliberate pause so ranks 0 and 1 are blocked in all_reduce, waiting for rank 2.
            std::thread::sleep(Duration::from_millis(300));
            handle.abort();
        });
        on_all(left, |r, ring| {
            ring.set_timeout(Duration::from_secs(60));
            let mut t = Tensor::from_slice(&data(r, 100_000));
            ring.all_reduce(&mut t, ReduceOp::Sum).unwrap_err()
        })
    });
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    // Rank 0 receives from rank 2 and rank 1 sends to it; whichever notices first closes its own links, so
    // the other may learn of it second-hand. The first failure always names rank 2.
    assert!(errs.iter().all(|e| matches!(e, CommError::PeerLost { seq: 0, .. })), "{errs:?}");
    assert!(errs.iter().any(|e| matches!(e, CommError::PeerLost { peer: 2, .. })), "{errs:?}");
}

#[test]
fn mismatched_collectives_are_reported_instead_of_mixing_data() {
    let mut rings = ring(2);
    let errs = on_all(&mut rings, |r, ring| {
        let mut t = Tensor::zeros([10 + r as i64], (Kind::Float, Device::Cpu));
        ring.all_reduce(&mut t, ReduceOp::Sum).unwrap_err()
    });
    let invalid: Vec<&String> = errs
        .iter()
        .filter_map(|e| match e {
            CommError::Invalid { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert!(!invalid.is_empty(), "{errs:?}");
    assert!(invalid[0].contains("#0 (all_reduce) of 1"), "{}", invalid[0]);
}

#[test]
fn rejects_non_contiguous_wrong_dtype_and_mismatched_sizes_with_invalid_and_stays_usable() {
    let mut rings = ring(2);
    let outs = on_all(&mut rings, |_, ring| {
        let invalid = |r: Result<(), CommError>| matches!(r, Err(CommError::Invalid { .. }));
        let mut transposed = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let mut half = Tensor::zeros([4], (Kind::Half, Device::Cpu));
        let mut int32 = Tensor::zeros([4], (Kind::Int, Device::Cpu));
        let mut ints = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
        let mut five = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        let eight = Tensor::zeros([8], (Kind::Float, Device::Cpu));
        let checks = [
            invalid(ring.all_reduce(&mut transposed, ReduceOp::Sum)),
            invalid(ring.all_reduce(&mut half, ReduceOp::Sum)),
            invalid(ring.all_reduce(&mut int32, ReduceOp::Max)),
            invalid(ring.all_reduce(&mut ints, ReduceOp::Avg)),
            invalid(ring.reduce_scatter(&eight, &mut five, ReduceOp::Sum)),
            invalid(ring.all_gather(&five, &mut eight.copy())),
            invalid(ring.broadcast(&mut five, 2)),
        ];
        // Nothing reached the wire, so the ring still works.
        let mut ok = Tensor::ones([5], (Kind::Float, Device::Cpu));
        ring.all_reduce(&mut ok, ReduceOp::Sum).unwrap();
        (checks, to_vec::<f32>(&ok), ring.seq())
    });
    for (checks, ok, seq) in outs {
        assert!(checks.iter().all(|&c| c), "{checks:?}");
        assert_eq!(ok, vec![2.0; 5]);
        assert_eq!(seq, 8);
    }
}
