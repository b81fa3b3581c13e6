"""Mixture of experts: the profile's predicted FLOPs against the measured FLOPs of every step of a training run
(issue 37, item 1).

An expert's FLOPs follow the tokens the router sends it, so the prediction could drift as routing changes. It
does not, by construction: every token goes to top-k experts, so a layer's experts together multiply
tokens × top-k rows whatever the routing, and the profile (measured once on a weightless copy whose experts run
as batched matmuls) predicts that total. This bench checks it over a run in which routing does change: random
models of Mixtral, Qwen3-MoE and OLMoE shape ("small": hidden 512, 4 layers, 4 experts, 2 per token), each step
a new batch of random tokens, a new random trainable set (as GreenTrainer's re-selection would change it) and
an AdamW step on it, so the router and the experts move; transformers' default grouped experts kernel and the
eager loop over experts. Per step: the FLOPs counted live (no cache), the profile's prediction for that
trainable set, and how unevenly the router spread the tokens (the busiest expert's share over an even share).

python bench/moe_flops.py [--quick] [--steps 40]
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys

from common import write_results

ARCHS = ("mixtral", "qwen3_moe", "olmoe")


def run(arch: str, experts: str, steps: int, size: str, batch: tuple[int, int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from greentrainer.flops import (FlopCounter, meta_model_from_config, profile_model, trainable_exactly,
                                    unique_named_parameters)
    from greentrainer.models import tiny_config
    cfg = tiny_config(arch, size)
    prof = profile_model(meta_model_from_config(cfg), *batch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), experts_implementation=experts).train()
    params = unique_named_parameters(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-3)
    loads = []
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]

    def record(module, args, out):  # the router's choice: how many token-expert pairs each expert got
        logits = out[0] if isinstance(out, tuple) else out
        k = cfg.num_experts_per_tok
        top = logits.detach().float().topk(k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(top, minlength=logits.shape[-1]).float()
        loads.append(float(counts.max() / counts.mean()))
    hooks = [r.register_forward_hook(record) for r in routers]
    rng = random.Random(0)
    errors, imbalance = [], []
    for step in range(steps):
        sel = rng.sample(prof.names, rng.randint(1, len(prof.names))) if step else prof.names
        ids = torch.randint(0, cfg.vocab_size - 4, batch, generator=torch.Generator().manual_seed(step))
        loads.clear()
        with trainable_exactly(params, set(sel)):
            with FlopCounter() as c:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        predicted = prof.predict(sel)
        errors.append((c.total - predicted) / predicted)
        imbalance.append(max(loads) if loads else 1.0)
    for h in hooks:
        h.remove()
    return {"model": arch, "experts": experts, "steps": steps, "batch": f"{batch[0]}×{batch[1]}",
            "max_abs_error_%": 100 * max(abs(e) for e in errors), "mean_error_%": 100 * statistics.mean(errors),
            "steps_exact": sum(e == 0 for e in errors),
            "busiest_expert_load_min": min(imbalance), "busiest_expert_load_max": max(imbalance)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, 4 steps")
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    size, steps, batch = ("tiny", 4, (2, 16)) if a.quick else ("small", a.steps, (4, 128))
    rows = [run(arch, experts, steps, size, batch) for arch in ARCHS for experts in ("grouped_mm", "eager")]
    write_results("moe_flops" + ("_quick" if a.quick else ""),
                  "Mixture of experts: predicted against measured FLOPs, every step of a run", rows,
                  ["model", "experts", "steps", "batch", "steps_exact", "max_abs_error_%", "mean_error_%",
                   "busiest_expert_load_min", "busiest_expert_load_max"],
                  notes=f"Random {size} models of each shape (hidden {'64' if a.quick else '512'}, 4 experts, 2 per "
                        "token), each step a new batch of random tokens, a new random trainable set and an AdamW "
                        "step (lr 1e-3), so routing changes from step to step. Measured: FlopCounter on the live "
                        "step (no cache); predicted: the profile of the weightless copy for that trainable set. "
                        "busiest_expert_load: the most-loaded expert's token-expert pairs over an even share, the "
                        "worst layer of a step (min and max over the run): routing is uneven and changes, the "
                        "FLOPs do not.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
