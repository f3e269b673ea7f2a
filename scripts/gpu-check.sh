#!/usr/bin/env bash
# The GPU checks of issues 4 and 10 in one call of a CUDA machine (sessions get one H100 for 15 minutes):
#   1. `tessera doctor`: the shim's kernels against references on the GPU, allocator statistics, NCCL;
#   2. `tessera bench` (each lever, then all) beside ../shared/bench/pt_baseline.py, same card, same call,
#      at 125M 16x1024, 350M 8x1024, 760M 8x1024 (16 heads, as the baseline), 1.3B 4x2048;
#   3. a 125M run through `tessera launch` (one NCCL rank) with a checkpoint, and its resumption;
#   4. auto micro-batching against a real out-of-memory: 1.3B with 64 x 2048 tokens per step;
#   5. where the time goes: scripts/gpu-probe.py (PyTorch eager, by phase, with each weight layout) beside
#      `tessera bench --phases`; and a 125M run of `tessera train` itself.
# Most important first; each stage is skipped once the time budget (BUDGET_S, default 520 s) is spent.
# STAGES="launch final" runs only the named stages (doctor, 125m, launch, oom, 1.3b, 350m, 760m, compile,
# final: every size with all levers on beside torch's fused AdamW, no ladder; recheck: 125M, and 1.3B at
# 8 x 2048; probe: phases and weight layouts; phases: Tessera's alone; vs-compile: 125M and 1.3B beside torch.compile; oomcheck: auto
# micro-batching against a fixed micro-batch; train: `tessera train` at 125M; kernels: doctor, then
# `tessera bench --kernels` (without, with each and with all of Tessera's kernels) at 125M, 350M and 1.3B, and
# 1.3B with --recompute and by phase with all the kernels; profile: every GPU kernel's time per step at 125M and
# 1.3B, Tessera with and without its kernels beside PyTorch eager (Conv1D weights, clipped, as Tessera) and
# torch.compile (the baseline's model), from libtorch's profiler on both sides); lease: the whole of issue 10's
# table in one call of about 9 minutes (doctor, --kernels at 125M and 1.3B, all kernels at 350M and 760M, each
# beside torch fused; torch.compile at 125M and 1.3B; `tessera train` with and without train.kernels; profiles
# of Tessera with its kernels and of torch.compile, as far as the budget goes).
#
#   scripts/gpu-check.sh DIR OUT     # DIR holds the tessera binary and pt_baseline.py; results go to OUT
set -uo pipefail
dir=$(cd "$1" && pwd); out=$2
mkdir -p "$out"
bin=$dir/tessera
budget=${BUDGET_S:-520}
start=$(date +%s)
log=$out/gpu-check.log
torch_lib=$(python3 -c 'import torch,os; print(os.path.dirname(torch.__file__) + "/lib")')
nccl=$(python3 -c 'import nvidia,os; print(list(nvidia.__path__)[0])' 2>/dev/null)
nccl=$(find "$nccl" -name 'libnccl.so.2' 2>/dev/null | head -1)
mkdir -p /tmp/nccl && [ -n "$nccl" ] && ln -sf "$nccl" /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=$torch_lib:/tmp/nccl:${LD_LIBRARY_PATH:-}

left() { echo $((budget - ($(date +%s) - start))); }
stage() { # stage SECONDS_NEEDED NAME: false when not selected or the budget cannot fit it
    case " ${STAGES:-doctor 125m launch oom 1.3b 350m 760m compile} " in *" ${2%% *} "*) ;; *) return 1 ;; esac
    if [ "$(left)" -lt "$1" ]; then echo "### SKIPPED $2 ($(left) s left)" | tee -a "$log"; return 1; fi
    echo "### $2 (t=$(( $(date +%s) - start )) s)" | tee -a "$log"
}
run() { # run TIMEOUT CMD...
    local t=$1; shift
    timeout "$t" "$@" >>"$log" 2>&1; local rc=$?
    echo "### rc=$rc: $*" >>"$log"
    return $rc
}
pt() { run "$1" python3 "$dir/pt_baseline.py" "${@:2}"; }
tb() { run "$1" "$bin" bench --device cuda "${@:2}"; }
corpus() { # the GPT-2 BPE corpus the training stages read, prepared once per machine
    [ -d data/gpu ] && return
    for i in 1 2 3 4 5 6; do cat "$dir"/corpus/*; done >/tmp/corpus.txt
    run 60 "$bin" data prepare --input /tmp/corpus.txt --out data/gpu --tokenizer gpt2
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "nccl: $nccl"; } >>"$log" 2>&1

stage 30 doctor && run 120 "$bin" doctor --device cuda
stage 60 "125m" && {
    tb 90 --model gpt-125m --batch 16 --seq 1024 --steps 20 --ladder
    pt 60 125m 16 20 eager; pt 60 125m 16 20 fused
}
stage 80 "launch 125m" && {
    corpus
    run 120 "$bin" launch --config examples/gpu-125m.toml --set train.steps=30
    run 90 "$bin" launch --config examples/gpu-125m.toml --set train.steps=40
    cp runs/gpu-125m/metrics.jsonl "$out/launch-125m-metrics.jsonl" 2>/dev/null
}
stage 60 "oom (auto micro-batch under a real out-of-memory)" && {
    corpus
    run 150 "$bin" train --config examples/gpu-125m.toml --set run_dir=\"runs/gpu-oom\" \
        --set model.preset=\"gpt-1.3b\" --set model.seq_len=2048 --set train.batch_size=64 \
        --set train.micro_batch=\"auto\" --set train.steps=3 --set train.warmup_steps=1 \
        --set train.checkpoint_every=0 --set train.log_every=1
    cp runs/gpu-oom/metrics.jsonl "$out/oom-metrics.jsonl" 2>/dev/null
    cp runs/gpu-oom/events.jsonl "$out/oom-events.jsonl" 2>/dev/null
}
stage 60 "1.3b" && { tb 120 --model gpt-1.3b --batch 4 --seq 2048 --steps 10 --ladder; pt 60 1.3b 4 10 eager; pt 60 1.3b 4 10 fused; }
stage 50 "350m" && { tb 90 --model gpt-350m --batch 8 --seq 1024 --steps 20 --ladder; pt 50 350m 8 20 eager; pt 50 350m 8 20 fused; }
stage 50 "760m" && { tb 90 --model gpt-760m --heads 16 --batch 8 --seq 1024 --steps 20 --ladder; pt 50 760m 8 20 eager; pt 50 760m 8 20 fused; }
stage 100 "compile 125m" && pt 100 125m 16 20 compile
stage 150 "compile 1.3b" && pt 150 1.3b 4 10 compile
stage 100 "compile 350m" && pt 100 350m 8 20 compile
stage 120 "final (all levers at every size beside torch fused AdamW)" && {
    tb 60 --model gpt-125m --batch 16 --seq 1024 --steps 20; pt 40 125m 16 20 fused; pt 40 125m 16 20 eager
    tb 60 --model gpt-350m --batch 8 --seq 1024 --steps 20; pt 40 350m 8 20 fused
    tb 60 --model gpt-760m --heads 16 --batch 8 --seq 1024 --steps 20; pt 40 760m 8 20 fused
    tb 60 --model gpt-1.3b --batch 4 --seq 2048 --steps 10; pt 40 1.3b 4 10 fused
}
stage 60 "recheck (125M and 1.3B at 8 x 2048 beside torch fused AdamW)" && {
    tb 60 --model gpt-125m --batch 16 --seq 1024 --steps 20; pt 40 125m 16 20 fused
    tb 60 --model gpt-1.3b --batch 8 --seq 2048 --steps 10; pt 60 1.3b 8 10 fused
}
stage 120 "probe (phases and weight layout: PyTorch eager beside tessera bench --phases)" && {
    probe() { run "$1" python3 scripts/gpu-probe.py "${@:2}"; }
    tb 60 --model gpt-1.3b --batch 4 --seq 2048 --steps 10 --phases
    probe 50 1.3b 4 10 linear 0; probe 50 1.3b 4 10 conv1d 0; probe 50 1.3b 4 10 conv1d 1
    tb 50 --model gpt-350m --batch 8 --seq 1024 --steps 20 --phases
    probe 40 350m 8 20 linear 0; probe 40 350m 8 20 conv1d 0
}
stage 200 "vs-compile (125M and 1.3B beside torch.compile, same call)" && {
    tb 60 --model gpt-125m --batch 16 --seq 1024 --steps 20; pt 120 125m 16 20 compile
    tb 60 --model gpt-1.3b --batch 4 --seq 2048 --steps 10; pt 150 1.3b 4 10 compile
}
stage 60 "phases (tessera bench --phases at 1.3B and 760M)" && {
    tb 60 --model gpt-1.3b --batch 4 --seq 2048 --steps 10 --phases
    tb 60 --model gpt-760m --heads 16 --batch 8 --seq 1024 --steps 20 --phases
}
stage 100 "oomcheck (auto micro-batching under a real OOM against a fixed micro-batch of 8, with warm-up)" && {
    corpus
    for mb in '"auto"' 8; do
        name=$([ "$mb" = 8 ] && echo fixed || echo auto)
        run 150 "$bin" train --config examples/gpu-125m.toml --set run_dir=\"runs/gpu-oom-$name\" \
            --set model.preset=\"gpt-1.3b\" --set model.seq_len=2048 --set train.batch_size=64 \
            --set train.micro_batch=$mb --set train.steps=4 --set train.warmup_steps=4 --set train.lr=1e-4 \
            --set train.checkpoint_every=0 --set train.log_every=1 --set train.eval_every=0
        cp runs/gpu-oom-$name/metrics.jsonl "$out/oom-$name-metrics.jsonl" 2>/dev/null
    done
}
stage 200 "kernels (Tessera's NVRTC kernels and recomputation, each A/B in the same call)" && {
    # Launch errors reported at the launch that made them, the first time these kernels meet a GPU.
    run 120 env CUDA_LAUNCH_BLOCKING=1 "$bin" doctor --device cuda
    for size in "gpt-125m --batch 16 --seq 1024 --steps 20" "gpt-350m --batch 8 --seq 1024 --steps 20" \
        "gpt-1.3b --batch 4 --seq 2048 --steps 10"; do
        tb 120 --model $size --kernels
    done
    pt 40 125m 16 20 fused; pt 40 350m 8 20 fused; pt 40 1.3b 4 10 fused
    tb 90 --model gpt-1.3b --batch 4 --seq 2048 --steps 10 --recompute
    tb 90 --model gpt-1.3b --batch 8 --seq 2048 --steps 10 --recompute --ce-kernel
    tb 90 --model gpt-1.3b --batch 4 --seq 2048 --steps 10 --phases --ce-kernel --ln-kernel --adamw-kernel --bf16-weights
}
stage 200 "lease (issue 10's whole table in one call: doctor, every size with and without Tessera's kernels beside torch fused, torch.compile, the training loop, then profiles)" && {
    # A lease is 15 minutes with every machine start counted, so one call of about 9 minutes has to give the
    # whole table; most important first, each command under its own timeout.
    all="--ce-kernel --ln-kernel --adamw-kernel --bf16-weights"
    run 120 env CUDA_LAUNCH_BLOCKING=1 "$bin" doctor --device cuda
    tb 100 --model gpt-125m --batch 16 --seq 1024 --steps 20 --kernels; pt 40 125m 16 20 fused; pt 40 125m 16 20 eager
    tb 120 --model gpt-1.3b --batch 4 --seq 2048 --steps 10 --kernels; pt 50 1.3b 4 10 fused
    tb 50 --model gpt-350m --batch 8 --seq 1024 --steps 20 $all; pt 40 350m 8 20 fused
    tb 60 --model gpt-760m --heads 16 --batch 8 --seq 1024 --steps 20 $all; pt 50 760m 8 20 fused
    [ "$(left)" -gt 150 ] && { pt 100 125m 16 20 compile; pt 130 1.3b 4 10 compile; }
    [ "$(left)" -gt 90 ] && { corpus; for k in false true; do
        run 60 "$bin" train --config examples/gpu-125m.toml --set run_dir=\"runs/gpu-train-$k\" --set train.steps=40 \
            --set train.checkpoint_every=0 --set train.kernels=$k
        cp runs/gpu-train-$k/metrics.jsonl "$out/train-125m-kernels-$k-metrics.jsonl" 2>/dev/null
    done; }
    prof=/tmp/tessera-prof; mkdir -p "$out/profile"
    for size in "gpt-125m --batch 16 --seq 1024:125m 16" "gpt-1.3b --batch 4 --seq 2048:1.3b 4"; do
        [ "$(left)" -gt 60 ] || break
        tb 60 --model ${size%%:*} --steps 5 --profile $prof $all
        [ "$(left)" -gt 60 ] && run 90 python3 scripts/gpu-probe.py ${size##*:} 5 linear 0 $prof compile
    done
    cp $prof/*.tsv "$out/profile/" 2>/dev/null
}
stage 120 "profile (every GPU kernel's time per step: Tessera, with and without its kernels, beside torch eager and compile)" && {
    # Traces stay on the machine (tens of MB at 1.3B); the per-kernel tables and PROFILE lines come back.
    prof=/tmp/tessera-prof
    for size in "gpt-125m --batch 16 --seq 1024" "gpt-1.3b --batch 4 --seq 2048"; do
        tb 90 --model $size --steps 5 --profile $prof
        tb 90 --model $size --steps 5 --profile $prof --ce-kernel --ln-kernel --adamw-kernel --bf16-weights
    done
    probe() { run "$1" python3 scripts/gpu-probe.py "${@:2}"; }
    probe 60 125m 16 5 conv1d 1 $prof eager; probe 120 125m 16 5 linear 0 $prof compile
    probe 60 1.3b 4 5 conv1d 1 $prof eager; probe 150 1.3b 4 5 linear 0 $prof compile
    mkdir -p "$out/profile" && cp $prof/*.tsv "$out/profile/" 2>/dev/null
    gzip -c $prof/trace-gpt-125m-all.json >"$out/profile/trace-gpt-125m-all.json.gz" 2>/dev/null
}
stage 60 "train 125m (tessera train, one process, bf16; then with train.kernels)" && {
    corpus
    for k in false true; do
        run 120 "$bin" train --config examples/gpu-125m.toml --set run_dir=\"runs/gpu-train-$k\" --set train.steps=40 \
            --set train.checkpoint_every=0 --set train.kernels=$k
        cp runs/gpu-train-$k/metrics.jsonl "$out/train-125m-kernels-$k-metrics.jsonl" 2>/dev/null
    done
}
grep -h '^RESULT' "$log" >"$out/results.txt"
grep -h '^PROFILE' "$log" >"$out/profile.txt"
echo "### done at t=$(( $(date +%s) - start )) s" | tee -a "$log"
