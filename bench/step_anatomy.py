"""Where a training step's FLOPs go, by model shape: what a FLOPs budget ρ can buy beyond the forward pass.

GreenTrainer saves only in the backward: every step still pays the forward (t_fp) and, to train anything below
the output head, the activation gradient through the head. On a small model with a large vocabulary those
are a large share of a full step, so ρ 0.5 leaves little to choose with; at 1B–8B shapes the head is a
smaller share and the same ρ reaches deeper. From the per-tensor FLOPs profile alone (meta device, no
weights): the forward's share, the head's (its weight gradient and its activation gradient), the smallest
feasible ρ, and at ρ 0.5 and 0.7 how deep a backward can reach (the deepest tensor that fits on its own,
as a share of the model's tensors) and how much weight-gradient work fits once the forward is paid.

python bench/step_anatomy.py [--quick] [--seq-len 256] [--batch-size 4]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def shapes(quick: bool) -> dict:
    """Configs of models people fine-tune (published shapes; no weights are needed)."""
    from transformers import LlamaConfig
    from greentrainer.models import load_config
    out = {"SmolLM2-135M": load_config("smollm2-135m")}
    if quick:
        return out
    llama3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
    out["Llama-3.2-1B shape"] = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                            num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                            tie_word_embeddings=True, **llama3)
    out["Llama-3.2-3B shape"] = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                            num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                            tie_word_embeddings=True, **llama3)
    out["Llama-3.1-8B shape"] = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                            tie_word_embeddings=False, **llama3)
    return out


def anatomy(name, config, batch_size: int, seq_len: int) -> dict:
    from greentrainer.flops import profile_config
    from greentrainer.methods.greentrainer.budget import deepest_reachable
    from greentrainer.selection import min_feasible_rho, rho_to_backward_budget
    p = profile_config(config, batch_size, seq_len)
    # the head's weight: lm_head, or (tied) the input embedding, whose t_dw carries the head's dW; the
    # activation gradient through the head is the first t_dy of the chain (index 0 is nearest the output; an
    # untied lm_head comes first and the final norm carries the gradient through it)
    by_name = {t.name: t for t in p.tensors}
    head_dw = next((t.t_dw for n, t in by_name.items() if n.endswith("lm_head.weight")),
                   next((t.t_dw for n, t in by_name.items() if n.endswith("embed_tokens.weight")), 0))
    head_dy = next((t.t_dy for t in p.tensors if t.t_dy), 0)
    row = {"model": name, "params_M": sum(p.numel() for p in _meta(config).parameters()) / 1e6,
           "t_full_GFLOPs": p.t_full / 1e9, "forward_%": 100 * p.t_fp / p.t_full,
           "head_dw_%": 100 * head_dw / p.t_full, "head_dy_%": 100 * head_dy / p.t_full,
           "min_rho": min_feasible_rho(p.t_dws, p.t_dys, p.t_fp, p.t_full, branches=p.branch_tuples)}
    n = len(p.tensors)
    for rho in (0.5, 0.7):
        budget = rho_to_backward_budget(rho, p.t_fp, p.t_full)
        depth = deepest_reachable(p, budget)
        row[f"reach_%_at_{rho}"] = 100 * (depth + 1) / n
        row[f"backward_left_%_at_{rho}"] = 100 * budget / (p.t_full - p.t_fp)
    return row


def _meta(config):
    from greentrainer.flops import meta_model_from_config
    return meta_model_from_config(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the default model only")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    a = ap.parse_args()
    from common import write_results
    rows = [anatomy(name, cfg, a.batch_size, a.seq_len) for name, cfg in shapes(a.quick).items()]
    write_results("step_anatomy" + ("_quick" if a.quick else ""),
                  "Where a training step's FLOPs go, by model shape (what ρ can buy beyond the forward)",
                  rows, ["model", "params_M", "t_full_GFLOPs", "forward_%", "head_dw_%", "head_dy_%", "min_rho",
                         "reach_%_at_0.5", "backward_left_%_at_0.5", "reach_%_at_0.7", "backward_left_%_at_0.7"],
                  notes=f"Batch {a.batch_size} × {a.seq_len} tokens, fp32 FLOPs from the per-tensor profile (meta "
                        f"device; shapes as published, random weights never built). forward_%: the forward's "
                        f"share of a full step (t_fp / t_full), paid by every step whatever trains; head_dw_% / "
                        f"head_dy_%: the output head's weight gradient and the activation gradient through it "
                        f"(which any backward below the head pays); min_rho: the smallest ρ at which anything "
                        f"trains; reach_%_at_ρ: the deepest tensor a backward can reach at ρ on its own, as a "
                        f"share of the model's tensors in backward order (100: the whole model); "
                        f"backward_left_%_at_ρ: the backward budget at ρ as a share of full fine-tuning's backward.")


if __name__ == "__main__":
    main()
