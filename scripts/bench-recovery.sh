#!/usr/bin/env bash
# Fault recovery, Tessera against torchrun (TorchElastic, from the .venv's torch), on the same machine, one
# after the other (issue 6). Both train the same tiny GPT (Tessera's `tiny` preset: 2 layers, d_model 64,
# context 64, byte vocabulary; 120,576 parameters) on 2 CPU ranks, global batch 8, a checkpoint every EVERY
# steps, STEPS steps. Once a checkpoint is committed and rank 0 has completed KILL_STEP steps, the rank-1
# worker process gets `kill -9`; the run must recover by itself and finish. Measured, from the kill:
#
#   detected     when the supervisor noticed (Tessera: the `detected` event in run_dir/events.jsonl;
#                torchrun: the agent's "Sending process ... closing signal SIGTERM" log line, which follows
#                its detection by a few ms)
#   respawned    when the first replacement worker process existed (a new child of the launcher or of the
#                torchrun agent, seen by polling /proc every 2 ms)
#   first step   when the first training step after the rollback completed (Tessera: its line appearing in
#                metrics.jsonl, watched every 2 ms; torchrun: the time.time() the worker logs after the step)
#   steps lost   steps completed before the fault that had to be redone (newest step before the kill minus
#                the checkpoint resumed from)
#
# Tessera's own `recover_s` (detection to the first completed step, as the launcher saw it through
# heartbeats) is shown beside it. Prints a markdown table (medians, then every value). A run that has not
# finished RECOVERY_TIMEOUT s after the fault, or that fails, is stopped and counted as not recovered.
#
# torchrun runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 unless TORCHRUN_SHARED_STORE=1: with torch 2.11's
# default (the agent's TCPStore shared with the workers and kept across restarts, without a per-restart
# prefix) the restarted workers can read the dead group's gloo addresses from the store; their
# init_process_group then fails ("Connection refused") or hangs. TORCHRUN_SHARED_STORE=1 measures that default.
#
#   scripts/bench-recovery.sh                       # 3 repeats of each
#   REPEATS=5 STEPS=400 KILL_STEP=205 scripts/bench-recovery.sh
#   TESSERA=/path/to/tessera scripts/bench-recovery.sh   # skip the release build
#   SIDES=torchrun TORCHRUN_SHARED_STORE=1 REPEATS=5 scripts/bench-recovery.sh
#   KEEP=1 scripts/bench-recovery.sh                # keep the runs, logs and results.jsonl (path printed)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
repeats=${REPEATS:-3}
steps=${STEPS:-300}
every=${EVERY:-10}
kill_step=${KILL_STEP:-105}
recovery_timeout=${RECOVERY_TIMEOUT:-120}
sides=${SIDES:-tessera torchrun}
shared_store=${TORCHRUN_SHARED_STORE:-0}
tessera=${TESSERA:-$root/target/release/tessera}
python=$root/.venv/bin/python
torchrun=$root/.venv/bin/torchrun
work=$(mktemp -d)
if [ -n "${KEEP:-}" ]; then
    echo "bench-recovery: keeping $work" >&2
else
    trap 'rm -rf "$work"' EXIT
fi

if [ "$tessera" = "$root/target/release/tessera" ]; then
    echo "bench-recovery: building tessera (release)" >&2
    cargo build --release --quiet
fi
TESSERA=$tessera scripts/demo-corpus.sh "$work/corpus" >/dev/null

# The driver: starts one run, kills rank 1 at the agreed point, follows it to the end, writes a JSON result.
cat > "$work/drive.py" <<'PY'
import glob, json, os, re, signal, subprocess, sys, threading, time

mode, out, run, steps, every, kill_step, recovery_timeout = sys.argv[1:4] + [*map(int, sys.argv[4:8])]
cmd = sys.argv[8:]
POLL = 0.002


def children(pid):
    kids = set()
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            kids.update(int(p) for p in open(task).read().split())
        except OSError:
            pass
    return kids


def environ(pid):
    try:
        return open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return []


class Tail(threading.Thread):
    """Follows a JSON-lines file as it grows, stamping each line with the time it was seen."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.lines, self.stop = path, [], False

    def run(self):
        f, buf = None, ""
        while True:
            stopping = self.stop
            if f is None and os.path.exists(self.path):
                f = open(self.path)
            if f is not None:
                buf += f.read()
                *done, buf = buf.split("\n")
                now = time.time()
                self.lines.extend((now, json.loads(l)) for l in done if l.strip())
            if stopping:
                return
            time.sleep(POLL)


class Spawns(threading.Thread):
    """Records when each child process of `pid` was first seen."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.seen, self.stop = pid, {}, False

    def run(self):
        while not self.stop:
            now = time.time()
            for c in children(self.pid):
                self.seen.setdefault(c, now)
            time.sleep(POLL)


log_path = os.path.join(out, f"{mode}-{os.path.basename(run)}.log")
log = open(log_path, "w")
# A session of its own, so that a run that never recovers can be stopped with everything it started.
proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
spawns = Spawns(proc.pid)
spawns.start()
if mode == "tessera":
    tail = Tail(os.path.join(run, "metrics.jsonl"))
    rank_var = b"TESSERA_RANK=1"
    steps_seen = lambda: [l["step"] for _, l in tail.lines if "loss" in l]
    committed = lambda: glob.glob(os.path.join(run, "checkpoints", "step-*", "manifest.json"))
else:
    tail = Tail(os.path.join(run, "steps.jsonl"))
    rank_var = b"RANK=1"
    steps_seen = lambda: [l["step"] for _, l in tail.lines if l["event"] == "step" and l["rank"] == 0]
    committed = lambda: glob.glob(os.path.join(run, "ckpt", "step-*.pt"))
tail.start()

deadline = time.time() + 300
while not (committed() and steps_seen() and steps_seen()[-1] >= kill_step):
    if proc.poll() is not None or time.time() > deadline:
        sys.exit(f"{mode}: the run ended or stalled before step {kill_step}; see {log_path}")
    time.sleep(POLL)
victim = next((c for c in children(proc.pid) if rank_var in environ(c)), None)
if victim is None:
    sys.exit(f"{mode}: no rank-1 worker among the children of {proc.pid}")
before = set(children(proc.pid))
t_kill = time.time()
os.kill(victim, signal.SIGKILL)
try:
    code = proc.wait(timeout=recovery_timeout)
except subprocess.TimeoutExpired:
    # torchrun starts each worker in a session of its own: kill every descendant, not just the group.
    family, todo = [], [proc.pid]
    while todo:
        p = todo.pop()
        family.append(p)
        todo.extend(children(p))
    for p in family:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    code = f"none: no end {recovery_timeout} s after the fault"
time.sleep(0.05)
tail.stop = spawns.stop = True
tail.join()
spawns.join()
log.close()
if code != 0:
    # Recorded, not fatal: a launcher that does not recover is a result too.
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps({"mode": mode, "t_kill": t_kill, "failed": f"exit code {code}", "log": log_path}) + "\n")
    print(f"bench-recovery: {mode}: did not recover (exit code {code}); see {log_path}", file=sys.stderr)
    sys.exit(0)

res = {"mode": mode, "t_kill": t_kill}
new = [t for p, t in spawns.seen.items() if p not in before and t > t_kill]
if mode == "tessera":
    events = [json.loads(l) for l in open(os.path.join(run, "events.jsonl"))]
    ev = {e["event"]: e for e in reversed(events)}  # the first of each kind
    step_lines = [(t, l["step"]) for t, l in tail.lines if "loss" in l]
    # The resumed gang's first line is the first whose step does not exceed the one before it.
    i = next(i for i in range(1, len(step_lines)) if step_lines[i][1] <= step_lines[i - 1][1])
    res.update(
        detected=ev["detected"]["unix_s"] - t_kill,
        restart=ev["restart"]["unix_s"] - t_kill,
        respawned=min(new) - t_kill if new else None,
        first_step=step_lines[i][0] - t_kill,
        first_step_event=ev["recovered"]["unix_s"] - t_kill,
        recover_s=ev["recovered"]["recover_s"],
        last_before=step_lines[i - 1][1],
        resumed_from=step_lines[i][1] - 1,
        lost=step_lines[i - 1][1] - (step_lines[i][1] - 1),
        lost_event=ev["restart"]["lost_steps"],
        restarts=sum(e["event"] == "restart" for e in events),
        final_step=max(s for _, s in step_lines),
    )
else:
    recs = [l for _, l in tail.lines]
    first = min((r for r in recs if r["event"] == "step" and r["restart"] >= 1), key=lambda r: r["t"])
    imported = [r["t"] for r in recs if r["event"] == "imported" and r["restart"] >= 1]
    joined = [r["t"] for r in recs if r["event"] == "joined" and r["restart"] >= 1]
    ready = [r["t"] for r in recs if r["event"] == "ready" and r["restart"] >= 1]
    last_before = max(r["step"] for r in recs if r["event"] == "step" and r["restart"] == 0)
    # The agent's log line when it stops the surviving workers: "W1126 22:15:47.800000 1583 ... closing signal"
    detected = None
    for line in open(log_path):
        m = re.match(r"[IWE](\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) .*closing signal", line)
        if m:
            mo, d, hh, mm, ss = m.groups()
            lt = time.localtime(t_kill)
            base = time.mktime((lt.tm_year, int(mo), int(d), int(hh), int(mm), 0, 0, 0, -1))
            detected = base + float(ss) - t_kill
            break
    res.update(
        detected=detected,
        respawned=min(new) - t_kill if new else None,
        imported=max(imported) - t_kill,
        joined=max(joined) - t_kill,
        ready=max(ready) - t_kill,
        first_step=first["t"] - t_kill,
        last_before=last_before,
        resumed_from=first["step"] - 1,
        lost=last_before - (first["step"] - 1),
        restarts=first["restart"],
        final_step=max(r["step"] for r in recs if r["event"] == "step"),
    )
assert res["final_step"] == steps, res
with open(os.path.join(out, "results.jsonl"), "a") as f:
    f.write(json.dumps(res) + "\n")
print(f"bench-recovery: {mode}: first step after recovery {res['first_step']:.2f} s after the kill, "
      f"{res['lost']} step(s) lost", file=sys.stderr)
PY

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
drive() { python3 "$work/drive.py" "$1" "$work" "$2" "$steps" "$every" "$kill_step" "$recovery_timeout" "${@:3}"; }

for i in $(seq 1 "$repeats"); do
    if [[ " $sides " == *" tessera "* ]]; then
        run=$work/tessera-$i
        cat > "$run.toml" <<TOML
run_dir = "$run"
seed = 5
[model]
preset = "tiny"
[data]
path = "$work/corpus"
eval_fraction = 0.0
[train]
steps = $steps
batch_size = 8
micro_batch = 4
lr = 3e-3
warmup_steps = 2
log_every = 1
eval_every = 0
checkpoint_every = $every
[launch]
hang_timeout_s = 3
max_restarts = 3
TOML
        echo "bench-recovery: repeat $i/$repeats: tessera" >&2
        drive tessera "$run" "$tessera" launch --config "$run.toml" --nproc 2
    fi
    if [[ " $sides " == *" torchrun "* ]]; then
        run=$work/torchrun-$i
        mkdir -p "$run"
        echo "bench-recovery: repeat $i/$repeats: torchrun" >&2
        share=()
        [ "$shared_store" = 1 ] || share=(env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
        drive torchrun "$run" "${share[@]}" "$torchrun" --nproc_per_node 2 --max_restarts 3 --rdzv_backend c10d \
            --rdzv_endpoint "127.0.0.1:$(free_port)" scripts/bench_recovery_torchrun.py \
            --step-log "$run/steps.jsonl" --ckpt-dir "$run/ckpt" --steps "$steps" --ckpt-every "$every"
    fi
done

python3 - "$work/results.jsonl" "$("$python" -c 'import torch; print(torch.__version__)')" "$shared_store" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
torch_version, shared = sys.argv[2], sys.argv[3] == "1"
ok = [r for r in rows if "failed" not in r]


def cell(mode, key, fmt="{:.2f}"):
    vals = [r[key] for r in ok if r["mode"] == mode and r.get(key) is not None]
    if not vals:
        return "–"
    return f"**{fmt.format(statistics.median(vals))}** ({', '.join(fmt.format(v) for v in vals)})"


def recovered(mode):
    return f"{sum(r['mode'] == mode for r in ok)} of {sum(r['mode'] == mode for r in rows)}"


store = "shared TCPStore (default)" if shared else "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
names = {"tessera": "Tessera `launch`", "torchrun": f"torchrun (torch {torch_version}, {store})"}
modes = [m for m in ("tessera", "torchrun") if any(r["mode"] == m for r in rows)]
print("| | recovered | fault → detected (s) | fault → new workers exist (s) | fault → first step after recovery (s) "
      "| steps lost | restarts |")
print("|---|---|---|---|---|---|---|")
for m in modes:
    print(f"| {names[m]} | {recovered(m)} | {cell(m, 'detected')} | {cell(m, 'respawned')} | {cell(m, 'first_step')} "
          f"| {cell(m, 'lost', '{:.0f}')} | {cell(m, 'restarts', '{:.0f}')} |")
med = {m: statistics.median(r["first_step"] for r in ok if r["mode"] == m) for m in modes
       if any(r["mode"] == m for r in ok)}
if len(med) == 2:
    print(f"\nmedian fault → first step after recovery: Tessera {med['tessera']:.2f} s, torchrun "
          f"{med['torchrun']:.2f} s: {med['torchrun'] / med['tessera']:.1f}x")
if "tessera" in med:
    print(f"Tessera's own view (events.jsonl): fault → `recovered` event {cell('tessera', 'first_step_event')} s; "
          f"recover_s (detection → first step, via heartbeats) {cell('tessera', 'recover_s')}; "
          f"lost_steps {cell('tessera', 'lost_event', '{:.0f}')}")
if "torchrun" in med:
    print(f"torchrun, from the fault, the slower new worker: imported torch {cell('torchrun', 'imported')} s; "
          f"process group up {cell('torchrun', 'joined')} s; model, optimizer, checkpoint and DDP ready "
          f"{cell('torchrun', 'ready')} s")
for r in rows:
    if "failed" in r:
        print(f"not recovered: {r['mode']}: {r['failed']} ({r['log']})")
PY
