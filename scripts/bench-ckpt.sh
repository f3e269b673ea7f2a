#!/usr/bin/env bash
# Checkpoint stall: how long the training loop is blocked per checkpoint, asynchronous (the writer actor)
# against synchronous (the loop waits for the commit), on the same model, data and machine, one after the other.
# Each run trains a GPT of about 25M parameters (8 layers, d_model 512; a 300 MB checkpoint: weights and
# two AdamW moments) for STEPS steps with a checkpoint every EVERY steps, and reads the `saved` lines'
# stall_ms from metrics.jsonl. Prints a markdown table.
#
#   scripts/bench-ckpt.sh                 # 3 checkpoints per mode
#   STEPS=12 EVERY=2 scripts/bench-ckpt.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
steps=${STEPS:-9}
every=${EVERY:-3}
tessera=${TESSERA:-$root/target/release/tessera}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$tessera" = "$root/target/release/tessera" ]; then
    echo "bench-ckpt: building tessera (release)" >&2
    cargo build --release --quiet
fi
TESSERA=$tessera scripts/demo-corpus.sh "$work/corpus" >/dev/null

for mode in true false; do
    cat > "$work/$mode.toml" <<TOML
run_dir = "$work/run-$mode"
seed = 1
[model]
preset = "mini"
n_layer = 8
d_model = 512
n_head = 8
seq_len = 64
[data]
path = "$work/corpus"
eval_fraction = 0.0
[train]
steps = $steps
batch_size = 4
micro_batch = 4
log_every = 1
warmup_steps = 1
eval_every = 0
checkpoint_every = $every
[checkpoint]
async_write = $mode
keep_last = 100
TOML
    echo "bench-ckpt: async_write = $mode" >&2
    "$tessera" train --config "$work/$mode.toml" --quiet >/dev/null
done

python3 - "$work" <<'PY'
import json, statistics, sys, os
work = sys.argv[1]
rows = {}
for mode in ("true", "false"):
    lines = [json.loads(l) for l in open(os.path.join(work, f"run-{mode}", "metrics.jsonl"))]
    stalls = [l["stall_ms"] for l in lines if l.get("checkpoint") == "saved"]
    commits = [l["commit_s"] for l in lines if l.get("checkpoint") == "committed"]
    steps = [l for l in lines if "loss" in l]
    rows[mode] = (stalls, commits)
ckpts = os.path.join(work, "run-true", "checkpoints")
one = sorted(d for d in os.listdir(ckpts) if d.startswith("step-"))[0]
size = sum(os.path.getsize(os.path.join(ckpts, one, f)) for f in os.listdir(os.path.join(ckpts, one)))
print(f"one checkpoint: {size/1e6:.0f} MB")
print("| mode | checkpoints | stall per checkpoint (median, ms) | all stalls (ms) | hand-off to commit (median, s) |")
print("|---|---|---|---|---|")
for mode, name in (("true", "asynchronous (writer actor)"), ("false", "synchronous (loop waits for commit)")):
    stalls, commits = rows[mode]
    print(f"| {name} | {len(stalls)} | {statistics.median(stalls):.1f} | {', '.join(f'{s:.0f}' for s in stalls)} | {statistics.median(commits):.2f} |")
a, s = statistics.median(rows["true"][0]), statistics.median(rows["false"][0])
print(f"\nasynchronous stall = {100*a/s:.1f}% of the synchronous save (goal: at most 10%)")
PY
