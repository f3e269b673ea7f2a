//! All-reduce bus bandwidth of the TCP ring, one process per rank. `scripts/bench-allreduce.sh` runs it
//! beside torch.distributed's gloo backend (`scripts/bench_allreduce.py`, same sweep, same output).
//!
//! ```text
//! cargo run --release --example ring_bandwidth -- --rank R --world W --addrs host:port,host:port,... \
//!     [--sizes BYTES,BYTES,...]
//! ```
//! Each process binds its own address from `--addrs` and connects the ring with a fixed test secret. For
//! each size (default: powers of 4 from 1 KiB to 256 MiB of f32) it runs warm-up calls, a barrier, then
//! timed `all_reduce(Sum)` calls back to back; the time per call is the slowest rank's. Rank 0 prints one
//! line per size:
//! `RESULT impl=tessera-ring world=W bytes=B iters=N us=T algbw_gbps=A busbw_gbps=B` where
//! `algbw = bytes / time` and `busbw = algbw · 2(W-1)/W` (the bytes each rank sends per byte reduced, so a
//! bandwidth-optimal algorithm's busbw is comparable across world sizes; GB = 1e9 bytes).

use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tessera::comm::tcp::TcpRing;
use tessera::comm::{Communicator, ReduceOp};

const SECRET: &[u8] = b"ring-bandwidth benchmark secret";

/// Powers of 4 from 1 KiB to 256 MiB.
fn default_sizes() -> Vec<usize> {
    (0..10).map(|i| 1024 << (2 * i)).collect()
}

/// Timed calls for a size: about 1 GiB reduced in all, between 5 and 500 calls (same rule in the Python
/// script, so both implementations do the same work).
fn iterations(bytes: usize) -> usize {
    ((1usize << 30) / bytes.max(1)).clamp(5, 500)
}

/// Untimed calls before timing (connections warm, pages touched).
fn warmup(bytes: usize) -> usize {
    if bytes >= 16 << 20 {
        1
    } else {
        5
    }
}

struct Args {
    rank: usize,
    world: usize,
    addrs: Vec<SocketAddr>,
    sizes: Vec<usize>,
}

fn parse() -> Result<Args, Box<dyn Error>> {
    let (mut rank, mut world, mut addrs, mut sizes) = (None, None, None, default_sizes());
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rank" => rank = Some(value()?.parse()?),
            "--world" => world = Some(value()?.parse()?),
            "--addrs" => {
                addrs = Some(value()?.split(',').map(str::parse).collect::<Result<Vec<SocketAddr>, _>>()?);
            }
            "--sizes" => sizes = value()?.split(',').map(str::parse).collect::<Result<Vec<usize>, _>>()?,
            _ => return Err(format!("unknown argument {flag}; see the example's doc comment").into()),
        }
    }
    let (rank, world, addrs) = match (rank, world, addrs) {
        (Some(r), Some(w), Some(a)) => (r, w, a),
        _ => return Err("--rank, --world and --addrs are required".into()),
    };
    if addrs.len() != world || rank >= world {
        return Err(format!("rank {rank} with {} addresses for a world of {world}", addrs.len()).into());
    }
    Ok(Args { rank, world, addrs, sizes })
}

fn main() -> Result<(), Box<dyn Error>> {
    let a = parse()?;
    let listener = TcpListener::bind(a.addrs[a.rank])?;
    let mut ring = TcpRing::connect(a.rank, a.world, listener, &a.addrs, SECRET, Duration::from_secs(60))?;
    ring.set_timeout(Duration::from_secs(300));
    for &bytes in &a.sizes {
        let mut t = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
        for _ in 0..warmup(bytes) {
            ring.all_reduce(&mut t, ReduceOp::Sum)?;
        }
        let iters = iterations(bytes);
        ring.barrier()?;
        let started = Instant::now();
        for _ in 0..iters {
            ring.all_reduce(&mut t, ReduceOp::Sum)?;
        }
        let mut elapsed = Tensor::from_slice(&[started.elapsed().as_secs_f64()]);
        ring.all_reduce(&mut elapsed, ReduceOp::Max)?;
        let per_op = elapsed.double_value(&[0]) / iters as f64;
        let algbw = bytes as f64 / per_op / 1e9;
        let busbw = algbw * 2.0 * (a.world - 1) as f64 / a.world as f64;
        if a.rank == 0 {
            println!(
                "RESULT impl=tessera-ring world={} bytes={bytes} iters={iters} us={:.1} algbw_gbps={algbw:.4} \
                 busbw_gbps={busbw:.4}",
                a.world,
                per_op * 1e6
            );
        }
    }
    Ok(())
}
