# Where does a GPT training step's time go in PyTorch eager, and does the weight layout matter?
#
# The model is ../shared/bench/pt_baseline.py's (GPT-2, bf16 autocast, SDPA, fused AdamW), with two switches:
#   layout=linear  nn.Linear's (out, in) weights, y = x @ W.T + b  (the baseline's)
#   layout=conv1d  Hugging Face GPT-2's Conv1D (in, out) weights, y = addmm(b, x, W)  (Tessera's)
#   clip=1         torch.nn.utils.clip_grad_norm_(max_norm=1.0) before the update, as Tessera clips
# It prints a RESULT line like the baseline's, plus the mean forward / backward / optimizer times of steps
# timed phase by phase with CUDA events (a separate pass, so the RESULT step time has no extra syncs).
#
#   python3 scripts/gpu-probe.py SIZE BATCH STEPS LAYOUT CLIP
import sys, time, torch, torch.nn as nn, torch.nn.functional as F

size, batch, steps, layout, clip = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
cfgs = {"125m": (50304, 1024, 768, 12, 12), "350m": (50304, 1024, 1024, 24, 16), "760m": (50304, 1024, 1536, 24, 16), "1.3b": (50304, 2048, 2048, 24, 16)}
V, T, D, L, H = cfgs[size]


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
m = GPT().cuda()
n = sum(p.numel() for p in m.parameters())
opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=True)
x = torch.randint(V, (batch, T), device="cuda"); y = torch.randint(V, (batch, T), device="cuda")


def forward():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return m(x, y)


def update():
    if clip:
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()


def step():
    loss = forward()
    opt.zero_grad(set_to_none=True); loss.backward(); update()


for _ in range(3): step()
torch.cuda.synchronize()
t0 = time.time()
for _ in range(steps): step()
torch.cuda.synchronize()
dt = (time.time() - t0) / steps

ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
phases = [0.0, 0.0, 0.0]
for _ in range(steps):
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
      f"peak_mem_gb={torch.cuda.max_memory_allocated()/1e9:.1f}")
