# Where does a GPT training step's time go in PyTorch eager, and does the weight layout matter?
#
# The model is ../shared/bench/pt_baseline.py's (GPT-2, bf16 autocast, SDPA, fused AdamW), with two switches:
#   layout=linear  nn.Linear's (out, in) weights, y = x @ W.T + b  (the baseline's)
#   layout=conv1d  Hugging Face GPT-2's Conv1D (in, out) weights, y = addmm(b, x, W)  (Tessera's)
#   clip=1         torch.nn.utils.clip_grad_norm_(max_norm=1.0) before the update, as Tessera clips
# It prints a RESULT line like the baseline's, plus the mean forward / backward / optimizer times of steps
# timed phase by phase with CUDA events (a separate pass, so the RESULT step time has no extra syncs).
# With PROFILE_DIR it then profiles 3 more steps with torch.profiler and prints the GPU's kernels as
# `tessera bench --profile` does (PROFILE lines, longest first; the trace and the table go to PROFILE_DIR);
# MODE compile runs the model through torch.compile (the baseline's compile mode).
#
#   python3 scripts/gpu-probe.py SIZE BATCH STEPS LAYOUT CLIP [PROFILE_DIR [eager|compile]]
#
# TESSERA_PROBE_DEVICE=cpu runs it on the CPU in fp32 (no phases): to try the script without a GPU, and as the
# CPU baseline beside `tessera bench --device cpu`. There denormal floats are flushed to zero: without it
# libtorch's CPU matmuls slow down about 4x on the tiny values PyTorch's default initialisation produces
# (Tessera's GPT-2 initialisation does not). TESSERA_PROBE_SEQ sets a shorter sequence than the size's.
import os, sys, time, torch, torch.nn as nn, torch.nn.functional as F

size, batch, steps, layout, clip = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
prof_dir = sys.argv[6] if len(sys.argv) > 6 else None
mode = sys.argv[7] if len(sys.argv) > 7 else "eager"
device = os.environ.get("TESSERA_PROBE_DEVICE", "cuda")
cuda = device == "cuda"


def sync():
    if cuda:
        torch.cuda.synchronize()

cfgs = {"125m": (50304, 1024, 768, 12, 12), "350m": (50304, 1024, 1024, 24, 16), "760m": (50304, 1024, 1536, 24, 16), "1.3b": (50304, 2048, 2048, 24, 16)}
V, T, D, L, H = cfgs[size]
T = int(os.environ.get("TESSERA_PROBE_SEQ", T))
if not cuda:
    torch.set_flush_denormal(True)


class Conv1D(nn.Module):
    def __init__(s, d_in, d_out):
        super().__init__()
        s.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.02)
        s.bias = nn.Parameter(torch.zeros(d_out))

    def forward(s, x):
        return torch.addmm(s.bias, x.reshape(-1, x.shape[-1]), s.weight).view(*x.shape[:-1], -1)


Lin = nn.Linear if layout == "linear" else Conv1D


class Block(nn.Module):
    def __init__(s):
        super().__init__(); s.ln1 = nn.LayerNorm(D); s.qkv = Lin(D, 3 * D); s.proj = Lin(D, D)
        s.ln2 = nn.LayerNorm(D); s.fc = Lin(D, 4 * D); s.fc2 = Lin(4 * D, D)

    def forward(s, x):
        B, T_, _ = x.shape
        q, k, v = s.qkv(s.ln1(x)).view(B, T_, 3, H, D // H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T_, D)
        x = x + s.proj(y)
        return x + s.fc2(F.gelu(s.fc(s.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(s):
        super().__init__(); s.wte = nn.Embedding(V, D); s.wpe = nn.Embedding(T, D)
        s.h = nn.ModuleList([Block() for _ in range(L)]); s.lnf = nn.LayerNorm(D)

    def forward(s, x, y):
        h = s.wte(x) + s.wpe(torch.arange(T, device=x.device))
        for b in s.h: h = b(h)
        logits = s.lnf(h) @ s.wte.weight.t()
        return F.cross_entropy(logits.view(-1, V).float(), y.view(-1))


torch.manual_seed(0)
m = GPT().to(device)
fwd = torch.compile(m) if mode == "compile" else m
n = sum(p.numel() for p in m.parameters())
opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=True)
x = torch.randint(V, (batch, T), device=device); y = torch.randint(V, (batch, T), device=device)


def forward():
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        return fwd(x, y)


def update():
    if clip:
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()


def step():
    loss = forward()
    opt.zero_grad(set_to_none=True); loss.backward(); update()


for _ in range(3): step()
sync()
t0 = time.time()
for _ in range(steps): step()
sync()
dt = (time.time() - t0) / steps

ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if cuda else []
phases = [0.0, 0.0, 0.0]
for _ in range(steps if cuda else 0):
    ev[0].record(); loss = forward(); ev[1].record()
    opt.zero_grad(set_to_none=True); loss.backward(); ev[2].record()
    update(); ev[3].record()
    torch.cuda.synchronize()
    for i in range(3): phases[i] += ev[i].elapsed_time(ev[i + 1]) / steps

tok = batch * T
fpt = 6 * (n - T * D) + 12 * L * D * T
tf = fpt * tok / dt / 1e12
print(f"RESULT impl=torch-probe-{layout}{'-clip' if clip else ''} size={size} params={n/1e6:.1f}M batch={batch} "
      f"step_ms={dt*1e3:.1f} tok_per_s={tok/dt:.0f} model_tflops={tf:.1f} mfu_vs_989={tf/989*100:.1f}% "
      f"fwd_ms={phases[0]:.1f} bwd_ms={phases[1]:.1f} opt_ms={phases[2]:.1f} "
      f"peak_mem_gb={torch.cuda.max_memory_allocated()/1e9 if cuda else 0:.1f}")

if prof_dir:
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(prof_dir, exist_ok=True)
    label = f"torch-{mode}-{layout}{'-clip' if clip else ''}"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as p:
        for _ in range(3): step()
        sync()
    p.export_chrome_trace(f"{prof_dir}/trace-{size}-{label}.json")
    # The same events and sums as Tessera's (csrc/shim.cpp, tessera_profile_stop): Kineto's, by name, the GPU's
    # kernels and copies on CUDA (not the GPU-side spans of record_function, such as the optimizer's step), else
    # the CPU operators.
    by = {}
    for e in p.profiler.kineto_results.events():
        if (e.device_type() == torch.autograd.DeviceType.CUDA) != cuda or e.is_user_annotation():
            continue
        calls, ns = by.get(e.name(), (0, 0))
        by[e.name()] = (calls + 1, ns + e.duration_ns())
    with open(f"{prof_dir}/kernels-{size}-{label}.tsv", "w") as f:
        for name, (calls, ns) in sorted(by.items()):
            f.write(f"{name}\t{calls}\t{ns}\n")
    rows = sorted(((ns / 3e6, calls / 3, name) for name, (calls, ns) in by.items()), reverse=True)
    total = sum(r[0] for r in rows)
    busy = f" total_ms_per_step={total:.2f}" if cuda else ""
    print(f"PROFILE impl={label} size={size}{busy} kernels={len(rows)}")
    for ms, calls, name in rows[:30]:
        print(f"PROFILE impl={label} size={size} ms_per_step={ms:.3f} share={100 * ms / max(total, 1e-12):.1f}% "
              f"calls_per_step={calls:g} name={name}")
