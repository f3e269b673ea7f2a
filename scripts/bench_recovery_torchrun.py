"""The torchrun (TorchElastic) side of the fault-recovery benchmark (scripts/bench-recovery.sh, issue 6).

A tiny GPT the shape of Tessera's `tiny` preset (2 layers, 4 heads, d_model 64, context 64, byte vocabulary
256, tied LM head, pre-LayerNorm, tanh GELU: 120,576 parameters), trained with DistributedDataParallel over
gloo on the CPU, written the way a careful user writes a TorchElastic job:

- every --ckpt-every steps rank 0 saves model, optimizer and step with torch.save to a temporary file and
  renames it into place (atomic), keeping the newest three;
- on every (re)start each rank loads the newest checkpoint and continues from its step;
- the data of step s is a pure function of (seed, s, rank), so a resumed run sees what it would have seen.

Every completed step appends one JSON line to --step-log: {"event": "step", "t": time.time(), "step": steps
done, "rank", "restart": TORCHELASTIC_RESTART_COUNT}. Each process also appends {"event": "start", ...} when
it starts (before importing torch), "imported" once torch is imported, "joined" once the process group is
up and "ready" once the checkpoint is loaded, so the recovery time can be taken apart. Run it as

    torchrun --nproc_per_node 2 --max_restarts 3 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT \\
        scripts/bench_recovery_torchrun.py --step-log steps.jsonl --ckpt-dir ckpt --steps 300 --ckpt-every 10
"""

import json
import os
import sys
import time

STARTED = time.time()  # before the heavy imports: a restarted worker's start-up is part of the recovery

import argparse  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

IMPORTED = time.time()

VOCAB, CONTEXT, D_MODEL, N_HEAD, N_LAYER = 256, 64, 64, 4, 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(D_MODEL)
        self.c_attn = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.c_proj = nn.Linear(D_MODEL, D_MODEL)
        self.ln_2 = nn.LayerNorm(D_MODEL)
        self.c_fc = nn.Linear(D_MODEL, 4 * D_MODEL)
        self.c_mlp = nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D_MODEL, dim=2)
        q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.c_mlp(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D_MODEL)
        self.wpe = nn.Embedding(CONTEXT, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(D_MODEL)
        for m in self.modules():  # GPT-2's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied LM head


def log(fd, **fields):
    # One write on an O_APPEND descriptor per line: lines of both ranks never interleave.
    os.write(fd, (json.dumps(fields) + "\n").encode())


def newest_checkpoint(ckpt_dir):
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step-") and n.endswith(".pt"))
    return os.path.join(ckpt_dir, names[-1]) if names else None


def batch(data, seed, step, rank, per_rank):
    """The sequences of `rank` at `step`: windows of a byte file, or random bytes without one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    if data is None:
        return torch.randint(0, VOCAB, (per_rank, CONTEXT + 1), generator=g)
    starts = torch.randint(0, len(data) - CONTEXT - 1, (per_rank,), generator=g)
    return torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()]).long()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-log", required=True, help="JSON-lines step log (appended)")
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="global batch, in sequences")
    p.add_argument("--data", help="a file of bytes to train on (default: random bytes)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    fd = os.open(args.step_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    log(fd, event="start", t=STARTED, rank=rank, restart=restart, pid=os.getpid())

    log(fd, event="imported", t=IMPORTED, rank=rank, restart=restart)
    torch.set_num_threads(1)  # one core per rank, as Tessera's CPU ranks
    dist.init_process_group("gloo")
    log(fd, event="joined", t=time.time(), rank=rank, restart=restart)
    os.makedirs(args.ckpt_dir, exist_ok=True)

    torch.manual_seed(args.seed)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start_step = 0
    path = newest_checkpoint(args.ckpt_dir)
    if path is not None:
        state = torch.load(path, map_location="cpu")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]
    ddp = DDP(model)
    data = None
    if args.data:
        with open(args.data, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    per_rank = args.batch_size // world
    log(fd, event="ready", t=time.time(), rank=rank, restart=restart, resumed_from=start_step)

    for step in range(start_step, args.steps):
        seqs = batch(data, args.seed, step, rank, per_rank)
        logits = ddp(seqs[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), seqs[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients here
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        log(fd, event="step", t=time.time(), step=done, rank=rank, restart=restart, loss=round(loss.item(), 4))
        if rank == 0 and done % args.ckpt_every == 0:
            final = os.path.join(args.ckpt_dir, f"step-{done:09d}.pt")
            tmp = final + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done}, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)  # atomic: a reader sees the old checkpoint or the whole new one
            for old in sorted(n for n in os.listdir(args.ckpt_dir) if n.endswith(".pt"))[:-3]:
                os.remove(os.path.join(args.ckpt_dir, old))
    dist.destroy_process_group()
    os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
