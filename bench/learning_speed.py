"""Why does GreenTrainer learn slowly per step? Validation-loss curves of GreenTrainer variants against full
fine-tuning on the same batches (SciTLDR's validation split; the test split is not used).

Each variant is one run with --eval-steps, one JSON per run in bench/results/learning_speed/ (runs already
there are skipped, so the script can be stopped and started again). The table gives the validation loss at
each measured step and how much of full fine-tuning's drop each variant achieves; the plot shows the curves.

python bench/learning_speed.py            # every variant
python bench/learning_speed.py --report   # table and plot from the runs done so far
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine
from greentrainer.files import write_json_atomic

OUT = RESULTS / "learning_speed"
# label -> (options, what it tests)
VARIANTS = {
    "full lr1e-4": ({"method": "full", "lr": 1e-4}, "the reference"),
    "full lr3e-4": ({"method": "full", "lr": 3e-4}, "the reference at GreenTrainer's rate"),
    "gt0.5 lr1e-4": ({"method": "greentrainer", "rho": 0.5, "lr": 1e-4, "full_warmup_steps": 0}, "the same rate as full FT"),
    "gt0.5 lr3e-4": ({"method": "greentrainer", "rho": 0.5, "lr": 3e-4, "full_warmup_steps": 0}, "a higher rate"),
    "gt0.5 lr1e-3": ({"method": "greentrainer", "rho": 0.5, "lr": 1e-3, "full_warmup_steps": 0}, "a much higher rate"),
    "gt0.5 lr3e-4 untied": ({"method": "greentrainer", "rho": 0.5, "lr": 3e-4, "full_warmup_steps": 0, "untie": True},
                            "the output embedding as its own tensor at the top of the backward (tied: at the bottom)"),
    "gt0.5 lr3e-4 every8": ({"method": "greentrainer", "rho": 0.5, "lr": 3e-4, "full_warmup_steps": 0, "select_every": 8},
                            "re-selection every 8 steps (the first selection is made before any training)"),
    "gt0.5 lr3e-4 keep": ({"method": "greentrainer", "rho": 0.5, "lr": 3e-4, "full_warmup_steps": 0, "select_every": 8,
                           "deselected_state": "keep"}, "optimizer state kept for re-selected tensors"),
    "gt0.7 lr3e-4": ({"method": "greentrainer", "rho": 0.7, "lr": 3e-4, "full_warmup_steps": 0}, "a larger budget"),
    "gt0.5 lr1e-4 warm8": ({"method": "greentrainer", "rho": 0.5, "lr": 1e-4, "full_warmup_steps": 8},
                           "8 steps of full FT first, repaid by the selections after them (run total within ρ)"),
    "gt0.5 lr3e-4 warm8": ({"method": "greentrainer", "rho": 0.5, "lr": 3e-4, "full_warmup_steps": 8},
                           "the same at the higher rate"),
}


def untied_copy(folder: Path) -> str:
    """The default model with its output embedding untied from the input embedding (an equal copy)."""
    import torch
    from greentrainer.models import load_model
    model, tok = load_model("smollm2-135m")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def run(label: str, opts: dict, a, log) -> dict:
    path = OUT / f"{label.replace(' ', '_')}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from greentrainer.config import config_from_options
    from greentrainer.run import run_training
    opts = dict(opts)
    with tempfile.TemporaryDirectory() as tmp:
        model = untied_copy(Path(tmp) / "untied") if opts.pop("untie", False) else "smollm2-135m"
        if opts["method"] == "greentrainer":
            opts.setdefault("select_every", a.steps // 2)
        cfg = config_from_options(dict(model=model, dataset="scitldr", max_train=a.steps * 4, epochs=1,
                                       batch_size=4, max_eval=a.val_items, max_input_length=a.max_input_length,
                                       eval_steps=a.eval_steps, no_eval=True, seed=0, output_dir=f"{tmp}/run",
                                       overwrite=True, **opts))
        t0 = time.perf_counter()
        m = run_training(cfg, log=lambda *x: None, progress=False)
    curve = [pt for h in m["history"] for pt in h["val_curve"]]
    sels = [s for h in m["history"] for s in h.get("selections", [])]
    res = {"label": label, "options": opts, "curve": curve, "flops_fraction_of_full": m["totals"]["flops_fraction_of_full"],
           "flops": {k: m["totals"][k] for k in ("flops_forward", "flops_backward", "flops_overhead")},
           "selections": [{"step": s.get("step"), "n_selected": s["n_selected"], "selected": s["selected"],
                           "probe_depth": s.get("probe_depth")} for s in sels],
           "train_time_s": m["totals"]["time_s"], "wall_s": time.perf_counter() - t0, "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    OUT.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, res)
    log(f"{label}: " + ", ".join(f"{s}:{v:.3f}" for s, v, *_ in curve))
    return res


def report(a) -> None:
    runs = {p.stem.replace("_", " "): json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    ref = runs.get("full lr1e-4")
    if not runs:
        return
    steps = sorted({s for r in runs.values() for s, *_ in r["curve"]})
    cols = ["variant", "what it tests", "FLOPs % of full"] + [f"step {s}" for s in steps] + ["% of full FT's drop"]
    lines = ["# Learning speed: validation loss per optimizer step", "",
             "`python bench/learning_speed.py` — " + machine(), "",
             f"SmolLM2-135M-Instruct, SciTLDR, chat prompt format, one pass over {4 * a.steps} training items in "
             f"batches of 4 (no item seen twice), GreenTrainer re-selecting every {a.steps // 2} steps unless said, "
             f"{a.val_items} validation items (the test split is not used), seed 0; every run sees the same "
             "batches. Last column: the variant's drop "
             "in validation loss from step 0 to the last step, as a share of full fine-tuning's (lr 1e-4).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, (opts, why) in VARIANTS.items():
        r = runs.get(label)
        if r is None:
            continue
        by = {s: v for s, v, *_ in r["curve"]}
        share = ""
        if ref is not None:
            d_ref = ref["curve"][0][1] - ref["curve"][-1][1]
            share = f"{100 * (r['curve'][0][1] - r['curve'][-1][1]) / d_ref:.0f}%" if d_ref > 0 else ""
        lines.append(f"| {label} | {why} | {100 * r['flops_fraction_of_full']:.1f} | "
                     + " | ".join(f"{by[s]:.3f}" if s in by else "" for s in steps) + f" | {share} |")
    (RESULTS / "learning_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in runs.items():
        xs, ys = zip(*[(s, v) for s, v, *_ in r["curve"]])
        ax.plot(xs, ys, "o-" if label.startswith("full") else ".-", label=label, lw=2 if label.startswith("full") else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (SciTLDR)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "learning_speed.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated variant labels")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=8)
    ap.add_argument("--val-items", type=int, default=32)
    ap.add_argument("--max-input-length", type=int, default=320)
    a = ap.parse_args()
    if not a.report:
        wanted = a.only.split(",") if a.only else list(VARIANTS)
        for label in wanted:
            run(label, VARIANTS[label][0], a, lambda msg: print(msg, flush=True))
    report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
