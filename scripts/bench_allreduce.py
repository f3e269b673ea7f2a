"""All-reduce bus bandwidth of torch.distributed's gloo backend: the reference the TCP ring is measured
against (scripts/bench-allreduce.sh runs both). Same sweep, same iteration rule and same output as
examples/ring_bandwidth.rs:

    .venv/bin/python3 scripts/bench_allreduce.py --rank R --world W --port P [--sizes BYTES,BYTES,...]

prints (rank 0), per size:
    RESULT impl=torch-gloo world=W bytes=B iters=N us=T algbw_gbps=A busbw_gbps=B

Threads: torch.set_num_threads(1). Gloo reduces on its own threads, not torch's intra-op pool, so this
does not slow gloo's collectives; it keeps torch from starting one pool thread per core in each of W
processes on a small machine, which would only add noise. The Rust side is likewise one thread per rank.
"""

import argparse
import time

import torch
import torch.distributed as dist


def default_sizes():
    return [1024 << (2 * i) for i in range(10)]  # 1 KiB .. 256 MiB


def iterations(nbytes):
    """About 1 GiB reduced per size, between 5 and 500 calls (as in ring_bandwidth.rs)."""
    return min(max((1 << 30) // max(nbytes, 1), 5), 500)


def warmup(nbytes):
    return 1 if nbytes >= 16 << 20 else 5


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True, help="rank 0's TCP store port on 127.0.0.1")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=default_sizes())
    a = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world
    )
    for nbytes in a.sizes:
        t = torch.zeros(nbytes // 4, dtype=torch.float32)
        for _ in range(warmup(nbytes)):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        iters = iterations(nbytes)
        dist.barrier()
        started = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
        per_op = elapsed.item() / iters
        algbw = nbytes / per_op / 1e9
        busbw = algbw * 2 * (a.world - 1) / a.world
        if a.rank == 0:
            print(
                f"RESULT impl=torch-gloo world={a.world} bytes={nbytes} iters={iters} us={per_op * 1e6:.1f} "
                f"algbw_gbps={algbw:.4f} busbw_gbps={busbw:.4f}",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
