#!/usr/bin/env bash
# All-reduce bus bandwidth of tessera's TCP ring against torch.distributed's gloo backend (the `.venv`
# torch), 1 KiB to 256 MiB, with 2 and 4 processes on this machine over loopback. Every world size and
# implementation runs on its own, one after the other, so they never compete for cores. Prints a markdown
# table per world size; the raw RESULT lines go to stderr as they arrive.
#
#   scripts/bench-allreduce.sh                       # W = 2 and 4, the full sweep
#   WORLDS="2" SIZES=1048576,4194304 scripts/bench-allreduce.sh
#   REPEATS=3 scripts/bench-allreduce.sh             # on a shared machine: best of 3 alternating runs
#
# The example is built with `cargo build --release`; the first release build of torch-sys takes about five
# minutes (it is shared with `cargo bench`). CARGO_TARGET_DIR is honoured.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
worlds=${WORLDS:-"2 4"}
repeats=${REPEATS:-1}
sizes=${SIZES:-}
python=${PYTHON:-$root/.venv/bin/python3}
target=${CARGO_TARGET_DIR:-$root/target}
logs=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$logs"
}
trap cleanup EXIT

echo "bench-allreduce: building the ring_bandwidth example (release)" >&2
cargo build --release --example ring_bandwidth >&2
ring="$target/release/examples/ring_bandwidth"

# n free loopback ports (bound together, then released: a small race with other programs, fine here).
free_ports() {
    "$python" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# run IMPL WORLD: starts WORLD processes of IMPL, waits for all, appends rank 0's RESULT lines to results.
run() {
    local impl=$1 w=$2 r fail=0
    local ports addrs
    read -r -a ports <<<"$(free_ports "$w")"
    addrs=$(printf '127.0.0.1:%s,' "${ports[@]}")
    addrs=${addrs%,}
    pids=()
    for ((r = 0; r < w; r++)); do
        if [ "$impl" = tessera-ring ]; then
            "$ring" --rank "$r" --world "$w" --addrs "$addrs" ${sizes:+--sizes "$sizes"} >"$logs/$impl-$w-$r.log" 2>&1 &
        else
            GLOO_SOCKET_IFNAME=lo "$python" scripts/bench_allreduce.py --rank "$r" --world "$w" --port "${ports[0]}" \
                ${sizes:+--sizes "$sizes"} >"$logs/$impl-$w-$r.log" 2>&1 &
        fi
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || fail=1; done
    pids=()
    if [ "$fail" = 1 ]; then
        echo "bench-allreduce: $impl with $w processes failed:" >&2
        tail -n 20 "$logs/$impl-$w-"*.log >&2
        exit 1
    fi
    grep '^RESULT' "$logs/$impl-$w-0.log" | tee -a "$logs/results" >&2
}

# Repeats alternate the implementations, so background load falls on both alike.
for ((rep = 1; rep <= repeats; rep++)); do
    for w in $worlds; do
        for impl in tessera-ring torch-gloo; do
            echo "bench-allreduce: $impl, $w processes (run $rep of $repeats)" >&2
            run "$impl" "$w"
        done
    done
done

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) cores, $(uname -m), loopback TCP; load average:$(cut -d' ' -f1-3 /proc/loadavg)"
"$python" - "$logs/results" "$repeats" <<'PY'
import sys
# Fastest time per call for each (world, size, implementation); bus bandwidth recomputed from it.
best = {}
for line in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in line.split()[1:])
    key = (int(kv["world"]), int(kv["bytes"]), kv["impl"])
    best[key] = min(best.get(key, float("inf")), float(kv["us"]))

def busbw(w, b, impl):
    us = best.get((w, b, impl))
    return b / (us * 1e-6) * 2 * (w - 1) / w / 1e9 if us else None

def size(b):
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= div:
            return f"{b // div} {unit}"
    return f"{b} B"

fmt = lambda x: f"{x:.3g}" if x is not None else "-"
runs = f", best of {sys.argv[2]} runs" if sys.argv[2] != "1" else ""
for w in sorted({k[0] for k in best}):
    print(f"\nW={w} (bus bandwidth, GB/s{runs})\n")
    print("| size | tessera ring | torch gloo | ring / gloo |")
    print("|---:|---:|---:|---:|")
    for b in sorted({k[1] for k in best if k[0] == w}):
        r, g = busbw(w, b, "tessera-ring"), busbw(w, b, "torch-gloo")
        print(f"| {size(b)} | {fmt(r)} | {fmt(g)} | {f'{r / g:.2f}' if r and g else '-'} |")
PY
