"""Does wall time follow FLOPs? Per-step time of a GreenTrainer selection at ρ ∈ {0.3 … 0.9} against full
fine-tuning, measured interleaved in one process (round-robin over the settings) so machine noise cancels.

Each setting's selection is made once (exact selector, importances from one real probe on the default
model); then steps are timed with exactly that selection trainable.

python bench/time_vs_flops.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import RESULTS, write_results
from greentrainer.data import collate, encode_all, load_examples
from greentrainer.flops import FlopCounter, profile_config
from greentrainer.importance import probe_importance
from greentrainer.methods.greentrainer import budget_for
from greentrainer.models import load_model
from greentrainer.selection import select_tensors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    rhos = [0.5, 0.7, 0.9] if a.quick else [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    rounds = 1 if a.quick else a.rounds
    model, tok = load_model("smollm2-135m")
    exs = load_examples("scitldr", "train", 8, 0)
    enc = encode_all(exs, tok, "summarization", False, a.seq_len)
    for e in enc:  # fixed shape: pad every item to seq_len by repeating its source
        while len(e.input_ids) < a.seq_len:
            e.input_ids.insert(0, e.input_ids[0])
            e.labels.insert(0, -100)
    batch = collate(enc[:4], tok.pad_token_id, False)
    probe_batch = collate(enc[4:8], tok.pad_token_id, False)
    prof = profile_config(model.config, 4, a.seq_len)
    names = prof.names
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=1e-5)
    settings = {"full": names}
    infeasible = []
    for rho in rhos:
        budget, upto = budget_for(prof, rho, 10**9)  # per-step budget, probe cost left out here
        if upto < 0:
            print(f"rho {rho}: infeasible, skipped")
            infeasible.append({"setting": f"rho {rho}", "tensors": "infeasible: below the smallest feasible rho"})
            continue
        imp = probe_importance(model, opt, None, probe_batch, names, upto)["importance"]
        sel = select_tensors(prof.t_dws, prof.t_dys, imp, budget, branches=prof.branch_tuples)
        settings[f"rho {rho}"] = [names[i] for i in sel.indices]
    times = {k: [] for k in settings}
    flops = {}
    for r in range(rounds + 1):  # round 0 warms up
        for k, sel in settings.items():
            keep = set(sel)
            for n, p in params.items():
                p.requires_grad_(n in keep)
            counter = FlopCounter()
            t0 = time.perf_counter()
            with counter:
                loss = model(**batch).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if r:
                times[k].append(dt)
            flops[k] = counter.total
    full_t = statistics.median(times["full"])
    rows = []
    for k in settings:
        t = statistics.median(times[k])
        rows.append({"setting": k, "tensors": len(settings[k]), "step_GFLOPs": flops[k] / 1e9,
                     "flops_ratio": flops[k] / flops["full"], "median_step_s": t, "time_ratio": t / full_t,
                     "min_step_s": min(times[k]), "max_step_s": max(times[k])})
    write_results("time_vs_flops" + ("_quick" if a.quick else ""), "Wall time against measured FLOPs",
                  rows + infeasible,
                  ["setting", "tensors", "step_GFLOPs", "flops_ratio", "median_step_s", "time_ratio", "min_step_s",
                   "max_step_s"],
                  f"SmolLM2-135M, batch 4 × {a.seq_len}, one training step (forward, backward, AdamW) per setting per "
                  f"round, {rounds} rounds interleaved after a warm-up round; median shown.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 5))
    xs = [r["flops_ratio"] for r in rows]
    ys = [r["time_ratio"] for r in rows]
    ax.plot([0, 1.05], [0, 1.05], "k--", lw=1, label="y = x")
    ax.scatter(xs, ys, zorder=3)
    for r in rows:
        ax.annotate(r["setting"], (r["flops_ratio"], r["time_ratio"]), fontsize=8, xytext=(4, -10),
                    textcoords="offset points")
    ax.set_xlabel("step FLOPs / full fine-tuning")
    ax.set_ylabel("step wall time / full fine-tuning")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.2)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / ("time_vs_flops" + ("_quick" if a.quick else "") + ".png"), dpi=120)


if __name__ == "__main__":
    main()
