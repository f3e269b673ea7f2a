"""PyTorch reference for Tessera's GPT and AdamW (used by tests/model_reference.rs).

Reads `in.safetensors` (Hugging Face GPT-2 named weights, `idx`, `targets`, and scalars in `hparams`),
rebuilds the same GPT-2 forward pass with plain torch ops, takes `steps` AdamW steps with
torch.optim.AdamW (single-tensor path, weight decay on matmul weights only, clip_grad_norm_), and writes
`out.safetensors` with the logits of the initial weights, the loss, the gradient norm, and the weights after.
"""
import sys
import torch
import torch.nn.functional as F

# One intra-op thread, as Tessera's side uses: multi-threaded CPU kernels were measured to round differently
# from run to run under load, which the eps-limited Adam updates of near-zero gradients amplify.
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file

src, dst = sys.argv[1], sys.argv[2]
t = load_file(src)
idx, targets = t.pop("idx"), t.pop("targets")
lr, wd, clip, beta1, beta2, eps, steps, n_head = t.pop("hparams").tolist()
steps, n_head = int(steps), int(n_head)
params = {k: v.clone().requires_grad_(True) for k, v in t.items()}
n_layer = 1 + max(int(k.split(".")[2]) for k in params if k.startswith("transformer.h."))


def forward(idx):
    p = params
    B, T = idx.shape
    x = p["transformer.wte.weight"][idx] + p["transformer.wpe.weight"][:T]
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        C = x.shape[-1]
        a = F.layer_norm(x, (C,), p[h + "ln_1.weight"], p[h + "ln_1.bias"], 1e-5)
        qkv = a @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]
        q, k, v = qkv.view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + (y @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"])
        m = F.layer_norm(x, (C,), p[h + "ln_2.weight"], p[h + "ln_2.bias"], 1e-5)
        m = F.gelu(m @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"], approximate="tanh")
        x = x + (m @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (x.shape[-1],), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], 1e-5)
    return x @ p["transformer.wte.weight"].t()


decay = [v for k, v in params.items() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
no_decay = [v for k, v in params.items() if not k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
    lr=lr, betas=(beta1, beta2), eps=eps, foreach=False, fused=False,
)
out = {}
for s in range(steps):
    logits = forward(idx)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
    if s == 0:
        out["logits"] = logits.detach().contiguous()
        out["loss"] = loss.detach().reshape(1)
        out["grad_norm"] = norm.detach().reshape(1)
    opt.step()
for k, v in params.items():
    out["after." + k] = v.detach().contiguous()
save_file(out, dst)
