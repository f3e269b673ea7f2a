# The PyTorch baseline's training step (../shared/bench/pt_baseline.py: GPT-2 style, SDPA, tied embeddings)
# on the CPU in fp32, beside `tessera bench --device cpu`: fused AdamW and clip_grad_norm_(1.0), as Tessera
# steps. Denormal floats are flushed to zero: without it libtorch's CPU matmuls slow down about 4x on the
# tiny values this model's PyTorch-default initialisation produces (Tessera's GPT-2 initialisation does not).
#
#   python3 scripts/pt-cpu-step.py SIZE BATCH SEQ STEPS      # SIZE: 125m | 350m
import sys, time, torch, torch.nn as nn, torch.nn.functional as F

size, batch, T, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
V, D, L, H = {"125m": (50304, 768, 12, 12), "350m": (50304, 1024, 24, 16)}[size]
torch.set_flush_denormal(True)


class Block(nn.Module):
    def __init__(s):
        super().__init__(); s.ln1 = nn.LayerNorm(D); s.qkv = nn.Linear(D, 3 * D); s.proj = nn.Linear(D, D)
        s.ln2 = nn.LayerNorm(D); s.fc = nn.Linear(D, 4 * D); s.fc2 = nn.Linear(4 * D, D)

    def forward(s, x):
        B, T_, _ = x.shape
        q, k, v = s.qkv(s.ln1(x)).view(B, T_, 3, H, D // H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T_, D)
        x = x + s.proj(y)
        return x + s.fc2(F.gelu(s.fc(s.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(s):
        super().__init__(); s.wte = nn.Embedding(V, D); s.wpe = nn.Embedding(1024, D)
        s.h = nn.ModuleList([Block() for _ in range(L)]); s.lnf = nn.LayerNorm(D)

    def forward(s, x, y):
        h = s.wte(x) + s.wpe(torch.arange(T))
        for b in s.h: h = b(h)
        return F.cross_entropy((s.lnf(h) @ s.wte.weight.t()).view(-1, V), y.view(-1))


torch.manual_seed(0)
m = GPT()
opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=True)
x = torch.randint(V, (batch, T)); y = torch.randint(V, (batch, T))


def step():
    loss = m(x, y); opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()


step()  # warm-up
t0 = time.time()
for _ in range(steps): step()
dt = (time.time() - t0) / steps
print(f"RESULT impl=torch-cpu size={size} batch={batch} seq={T} step_ms={dt*1e3:.1f} tok_per_s={batch*T/dt:.0f} threads={torch.get_num_threads()}")
