"""Checks a `tessera export --format hf` directory with Hugging Face transformers (used by tests/export.rs).

Usage: hf_export_check.py EXPORT_DIR EXPECTED.safetensors THRESHOLD

Loads EXPORT_DIR with `transformers.GPT2LMHeadModel.from_pretrained` (float32, eval mode), checks that every
tensor was loaded from the file (no missing, unexpected or mismatched key; the LM head tied to the token
embedding), runs the `tokens` of EXPECTED.safetensors and compares the logits with its `logits` (Tessera's).
Prints one JSON line with the measured maximum absolute difference and exits 1 if it is above THRESHOLD.
"""
import json
import sys

import torch
import transformers
from safetensors.torch import load_file

export_dir, expected_path, threshold = sys.argv[1], sys.argv[2], float(sys.argv[3])
expected = load_file(expected_path)
tokens, tessera_logits = expected["tokens"], expected["logits"]

model, info = transformers.GPT2LMHeadModel.from_pretrained(
    export_dir, dtype=torch.float32, output_loading_info=True
)
model.eval()
problems = []
for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    if info.get(kind):
        problems.append(f"{kind}: {sorted(map(str, info[kind]))}")
if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
    problems.append("the LM head is not tied to transformer.wte.weight")
if any(p.dtype != torch.float32 for p in model.parameters()):
    problems.append("not every parameter is float32")

with torch.no_grad():
    hf_logits = model(input_ids=tokens).logits
if hf_logits.shape != tessera_logits.shape:
    problems.append(f"logits shape {tuple(hf_logits.shape)}, Tessera's {tuple(tessera_logits.shape)}")
    diff = float("inf")
else:
    diff = (hf_logits - tessera_logits).abs().max().item()

print(
    json.dumps(
        {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "max_abs_diff": diff,
            "max_abs_logit": tessera_logits.abs().max().item(),
            "threshold": threshold,
            "activation_function": model.config.activation_function,
            "layer_norm_epsilon": model.config.layer_norm_epsilon,
            "eos_token_id": model.config.eos_token_id,
            "problems": problems,
        }
    )
)
sys.exit(0 if not problems and diff <= threshold else 1)
