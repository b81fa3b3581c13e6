"""How fast is the exact selector over blocks (GreenTrainer --over blocks), with thousands of candidates?

For the default model and a LLaMA-7B-shaped config (weightless: profiles run on the meta device), the
candidates of --over blocks (l×l blocks of the target projections plus the norms and biases whole) with
random importances, at ρ 0.5: the selector's time (median of 5), against the tensor selector on the same
model. Writes bench/results/block_selector.{md,json}.

python bench/block_selector.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from common import big_configs, write_results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the default model only")
    a = ap.parse_args()
    from greentrainer.block_selection import select_members
    from greentrainer.flops import meta_model_from_config, profile_config
    from greentrainer.methods.greentrainer.blocks import block_candidates
    from greentrainer.selection import rho_to_backward_budget, select_tensors
    configs = big_configs(quick=True)
    if not a.quick:
        configs["LLaMA-7B"] = big_configs()["LLaMA-7B"]
    settings = {"SmolLM2-135M": [("q,k,v", 192), ("q,k,v", 64), ("q,k,v,o,gate,up,down", 64)],
                "LLaMA-7B": [("q,k,v", 256), ("q,k,v,o,gate,up,down", 256), ("q,k,v", 128)]}
    rows = []
    for name, cfg in configs.items():
        prof = profile_config(cfg, 4, 256)
        meta = meta_model_from_config(cfg)
        budget = rho_to_backward_budget(0.5, prof.t_fp, prof.t_full)
        rng = np.random.default_rng(0)
        imp = rng.normal(0.2, 1.0, len(prof.tensors))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            select_tensors(prof.t_dws, prof.t_dys, imp, budget, None, prof.branch_tuples)
            times.append(time.perf_counter() - t0)
        rows.append({"model": name, "candidates": f"{len(prof.tensors)} tensors (--over tensors)",
                     "n_candidates": len(prof.tensors), "block": "", "selector_ms": 1000 * statistics.median(times),
                     "selected": ""})
        for targets, l in settings[name]:
            c = block_candidates(meta, prof, targets.split(","), l)
            imp = rng.normal(0.2, 1.0, len(c.members))
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                sel = select_members(c.t_dy, c.positions, c.costs, imp, budget)
                times.append(time.perf_counter() - t0)
            n_blocks = sum(1 for m in sel.members if c.members[m][1] is not None)
            rows.append({"model": name, "candidates": f"{targets} blocks + {sum(1 for m in c.members if m[1] is None)}"
                                                      f" small tensors", "n_candidates": len(c.members),
                         "block": c.l, "selector_ms": 1000 * statistics.median(times),
                         "selected": f"{n_blocks} blocks, {len(sel.members) - n_blocks} small, "
                                     f"{100 * (prof.t_fp + sel.cost) / prof.t_full:.1f}% of full"})
            print(rows[-1], flush=True)
    write_results("block_selector", "Exact selector over blocks: time with thousands of candidates", rows,
                  ["model", "candidates", "n_candidates", "block", "selector_ms", "selected"],
                  notes="`python bench/block_selector.py`. Batch 4 × 256 tokens, ρ 0.5, random importances "
                        "(N(0.2, 1)); median of 5 calls. The block selector is exact (tests/test_over.py checks "
                        "it against brute force): per depth it completes each point of the small tensors' Pareto "
                        "front with the most important blocks that fit (blocks of one cost are interchangeable).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
