"""Cost and accuracy of every method on the same data (paper Tables 2, 3, 5 at small scale).

Default model; a fixed train subset; a fixed test subset; the same seed for all rows. Learning rates:
each method gets the best of a small sweep (lowest validation loss after the same short training on
the validation split), and the paper's single 2e-5 is reported too.

python bench/methods.py [--quick] [--dataset scitldr] [--max-train 64] [--max-eval 30] [--epochs 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
import tempfile
import time

import torch

from common import RESULTS, write_results
from greentrainer.config import TrainConfig, config_from_options
from greentrainer.data import encode_all, load_examples, resolve_dataset
from greentrainer.errors import UsageError
from greentrainer.loop import train
from greentrainer.methods import build_method
from greentrainer.models import load_model
from greentrainer.run import run_training

SWEEP = {"full": [2e-5, 1e-4, 3e-4], "top2": [2e-5, 1e-4, 5e-4], "lora": [2e-5, 3e-4, 1e-3], "dora": [2e-5, 3e-4, 1e-3],
         "prefix": [2e-5, 1e-3, 1e-2], "smt": [2e-5, 1e-4, 5e-4], "greentrainer": [2e-5, 1e-4, 3e-4, 1e-3]}


def row_config(method, lr, a, rho=0.6, seed=42, out=None, importance="dw_grad", select_once=False,
               select_every=None):
    return config_from_options(dict(
        model="smollm2-135m", dataset=a.dataset, method=method, output_dir=out, overwrite=True, epochs=a.epochs,
        batch_size=4, lr=lr, max_input_length=a.max_input_length, max_train=a.max_train, max_eval=a.max_eval,
        seed=seed, num_beams=a.num_beams, rho=rho, importance=importance, select_once=select_once,
        select_every=select_every, step_policy="select", lora_r=a.lora_r, prefix_tokens=a.prefix_tokens, smt_warmup=a.smt_warmup,
        smt_params=a.smt_params))


def parse_variant(m: str):
    """'gt0.6' → GreenTrainer ρ 0.6; suffixes ':dw', ':grad' (importance), ':once', ':every8' (selection)."""
    if not m.startswith("gt"):
        return m, {}
    head, *opts = m.split(":")
    kw = {"rho": float(head[2:])}
    label = f"GreenTrainer ρ={kw['rho']}"
    for o in opts:
        if o in ("dw", "grad", "dw_grad"):
            kw["importance"] = o
        elif o == "once":
            kw["select_once"] = True
        elif o.startswith("every"):
            kw["select_every"] = int(o[5:])
        label += f" [{o}]"
    return label, kw


def sweep_lr(method, a, log):
    """Best learning rate by validation loss after a short run on a separate validation subset."""
    spec, _ = resolve_dataset(a.dataset)
    model, tok = load_model("smollm2-135m")
    split = "validation" if (spec.name in ("scitldr", "dialogsum")) else "eval"
    from greentrainer.data import _read_jsonl, _to_example, DATA_DIR  # noqa: PLC2701
    if split == "validation":
        path = DATA_DIR / spec.name / "validation.jsonl.gz"
        exs = [_to_example(path, ln, r) for ln, r in _read_jsonl(path)][: a.sweep_train + a.sweep_val]
    else:
        exs = load_examples(a.dataset, "eval", a.sweep_train + a.sweep_val, 7)
    enc = encode_all(exs, tok, spec.task, False, a.max_input_length)
    tr, va = enc[: a.sweep_train], enc[a.sweep_train:]
    scores = {}
    for lr in SWEEP[method]:
        m, _ = load_model("smollm2-135m")
        cfg = row_config(method, lr, a)
        cfg.epochs = 1
        res = train(m, tok, build_method(cfg), tr, va, cfg, torch.device("cpu"), log=lambda *x: None,
                    progress=False)
        scores[lr] = res["history"][-1]["val_loss"]
        log(f"  sweep {method} lr {lr:g}: val loss {scores[lr]:.4f}")
    return min(scores, key=scores.get), scores


def run_row(label, cfg, log):
    with tempfile.TemporaryDirectory() as d:
        cfg.output_dir = d + "/run"
        t0 = time.perf_counter()
        try:
            m = run_training(cfg, log=lambda *x: None, progress=False)
        except UsageError as e:  # e.g. a rho below the smallest feasible one for this model and data
            log(f"{label}: {e}")
            return {"method": label, "lr": cfg.lr, "note": str(e)}
        wall = time.perf_counter() - t0
    t, e = m["totals"], m.get("eval", {})
    row = {"method": label, "lr": cfg.lr, "PFLOPs": t["flops_total"] / 1e15,
           "flops_%_full": 100 * t["flops_fraction_of_full"], "train_time_s": t["time_s"],
           "peak_mem_MiB": t["peak_memory_bytes"] / 2**20, "trainable_params": t["trainable_params"],
           "total_wall_s": wall}
    sels = [s for h in m["history"] for s in h.get("selections", []) if s.get("kind") == "probe"]
    if sels:
        row["probe+selector_time_%"] = 100 * sum(s["probe_time_s"] + s["selector_time_s"] for s in sels) / t["time_s"]
        row["selector_ms"] = 1000 * max(s["selector_time_s"] for s in sels)
        row["probe_grad_MiB"] = max(s["probe_grad_bytes"] for s in sels) / 2**20
        row["full_grad_MiB"] = sels[0]["probe_grad_bytes_full_backward"] / 2**20
        row["flops_overhead_%"] = 100 * t["flops_overhead"] / t["flops_total"]
    if m["history"] and "smt" in m["history"][0]:
        row["smt_budget_share"] = m["history"][0]["smt"]["budget_share_by_kind"]
    for k in ("rouge1", "rouge2", "rougeL"):
        if f"{k}_first_ref" in e:
            row[f"{k}"] = e[f"{k}_first_ref"]
            row[f"{k}_best"] = e[f"{k}_best_ref"]
    for k in ("exact_match", "label_accuracy", "loglik_accuracy"):
        if k in e:
            row[k] = e[k]
    log(json.dumps(row))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dataset", default="scitldr")
    ap.add_argument("--max-train", type=int, default=64)
    ap.add_argument("--max-eval", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-input-length", type=int, default=256)
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--methods", default="full,top2,prefix,lora,dora,smt,gt0.4,gt0.5,gt0.6,gt0.7")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--paper-lr-rows", action="store_true", help="also run every method at lr 2e-5")
    ap.add_argument("--lrs", default="", help="fixed rates instead of a sweep: 'full=1e-4,greentrainer=1e-4'; "
                                              "'all=2e-5' sets every method")
    ap.add_argument("--sweep-train", type=int, default=32)
    ap.add_argument("--sweep-val", type=int, default=16)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=20)
    ap.add_argument("--smt-warmup", type=int, default=8)
    ap.add_argument("--smt-params", type=float, default=None, help="default: match LoRA's trainable count")
    ap.add_argument("--name", default=None)
    ap.add_argument("--update", action="store_true",
                    help="re-run only --methods and replace their rows in the existing table of the same name")
    ap.add_argument("--seeds", default="42", help="comma-separated; several seeds repeat every row")
    a = ap.parse_args()
    if a.quick:
        a.max_train, a.max_eval, a.epochs, a.max_input_length, a.num_beams = 16, 4, 2, 128, 1
        a.methods, a.no_sweep, a.smt_warmup = "full,lora,smt,gt0.7", True, 2
    log = print
    a.seeds = [int(s) for s in a.seeds.split(",")]
    methods = a.methods.split(",")
    if a.smt_params is None:  # LoRA r on q,v of SmolLM2: r·(576+576) + r·(576+192) per layer
        from greentrainer.models import load_config
        c = load_config("smollm2-135m")
        kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
        lora = a.lora_r * ((c.hidden_size * 2) + (c.hidden_size + kv)) * c.num_hidden_layers
        a.smt_params = 100 * lora / 134515008
    rows, lrs, sweeps = [], {}, {}
    base = lambda m: "greentrainer" if m.startswith("gt") else m.split(":")[0]  # noqa: E731
    fixed = dict(kv.split("=") for kv in a.lrs.split(",") if kv)
    for m in methods:
        b = base(m)
        if b in lrs:
            continue
        if b in fixed or "all" in fixed:
            lrs[b] = float(fixed.get(b, fixed.get("all")))
        elif a.no_sweep:
            lrs[b] = 2e-5 if b in ("full", "greentrainer") else 1e-3 if b in ("lora", "dora") else 1e-4
        else:
            lrs[b], sweeps[b] = sweep_lr(b, a, log)
            log(f"{b}: best lr {lrs[b]:g}")
    for m in methods:
        b = base(m)
        for seed in a.seeds:
            label, kw = parse_variant(m)
            if len(a.seeds) > 1:
                label += f" (seed {seed})"
            rows.append(run_row(label, row_config(b, lrs[b], a, seed=seed, **kw), log))
            if a.paper_lr_rows and lrs[b] != 2e-5:
                rows.append(run_row(label + " @2e-5", row_config(b, 2e-5, a, seed=seed, **kw), log))
    if len(a.seeds) > 1:
        rows += seed_summary(rows)
    name = a.name or ("methods_quick" if a.quick else f"methods_{a.dataset}")
    updated = ""
    if a.update and (RESULTS / f"{name}.json").exists():
        rows, lrs, sweeps, updated = merge_into(RESULTS / f"{name}.json", rows, lrs, sweeps)
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:  # rows kept from an earlier run (--update) keep the ratio to that run's full FT
        if full and isinstance(r.get("train_time_s"), float) and "time_%_full" not in r:
            r["time_%_full"] = 100 * r["train_time_s"] / full["train_time_s"]
    cols = ["method", "lr", "trainable_params", "PFLOPs", "flops_%_full", "train_time_s", "time_%_full",
            "peak_mem_MiB", "rouge1", "rouge2", "rougeL", "rouge1_best", "rougeL_best", "exact_match",
            "probe+selector_time_%", "flops_overhead_%", "probe_grad_MiB", "full_grad_MiB", "note"]
    cols = [c for c in cols if any(c in r for r in rows)]
    write_results(name, f"Methods on {a.dataset}: measured cost and accuracy", rows, cols,
                  f"SmolLM2-135M, {a.max_train} train items × {a.epochs} epochs, batch 4, max input "
                  f"{a.max_input_length}; {a.max_eval} test items, beam {a.num_beams}. ROUGE: F1 ×100 against the "
                  f"first reference (`_best`: best of all references). lr: best of a sweep on the validation "
                  f"split ({json.dumps({k: {str(x): round(y, 4) for x, y in v.items()} for k, v in sweeps.items()})})"
                  + updated if sweeps else f"lr: fixed ({', '.join(f'{k} {v:g}' for k, v in lrs.items())}; no sweep)."
                  + updated,
                  {"lrs": lrs, "sweeps": {k: {str(x): y for x, y in v.items()} for k, v in sweeps.items()}})
    plot(rows, RESULTS / f"{name}.png", a.dataset)


def merge_into(path, rows, lrs, sweeps):
    """Replace the rows of an existing table that were re-run (same label), keeping the others and their
    provenance; returns (rows, lrs, sweeps, a note saying which rows came from which command)."""
    old = json.loads(Path(path).read_text())
    new = {r["method"]: r for r in rows}
    labels = list(new)
    merged = [new.pop(r["method"], r) for r in old["rows"]] + list(new.values())
    lrs = {**old.get("lrs", {}), **lrs}
    sweeps = {**{k: {float(x): y for x, y in v.items()} for k, v in old.get("sweeps", {}).items()}, **sweeps}
    note = (f" Rows {', '.join(labels)} re-run by `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d %H:%M')});"
            f" the others by `{old['meta']['command']}` ({old['meta']['date']}).")
    return merged, lrs, sweeps, note


def seed_summary(rows):
    """One 'mean ± sd (min–max)' row per method over its seeds, so a difference can be told from noise."""
    import statistics
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "(seed " in r["method"] and "PFLOPs" in r:
            groups.setdefault(r["method"].split(" (seed ")[0], []).append(r)
    out = []
    for label, rs in groups.items():
        row = {"method": f"{label}: mean ± sd over {len(rs)} seeds", "lr": rs[0]["lr"]}
        for k in ("PFLOPs", "flops_%_full", "train_time_s", "peak_mem_MiB", "rouge1", "rouge2", "rougeL"):
            v = [r[k] for r in rs if k in r]
            if len(v) > 1:
                row[k] = f"{statistics.mean(v):.4g} ± {statistics.stdev(v):.2g} ({min(v):.4g}–{max(v):.4g})"
        out.append(row)
    return out


def plot(rows, path, dataset):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in rows if isinstance(r.get("rougeL"), float) and isinstance(r.get("PFLOPs"), float)]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    offsets = [(5, 4), (5, -11), (-10, 9), (5, -20)]  # alternate so close points stay readable
    for i, r in enumerate(sorted(pts, key=lambda r: r["PFLOPs"])):
        ax.scatter(r["PFLOPs"], r["rougeL"], s=40)
        ax.annotate(r["method"], (r["PFLOPs"], r["rougeL"]), fontsize=8, xytext=offsets[i % len(offsets)],
                    textcoords="offset points")
    ax.set_xlabel("measured training PFLOPs")
    ax.set_ylabel("ROUGE-L (first reference)")
    ax.set_title(f"{dataset}: accuracy vs measured compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":  # redraw a committed table's plot
        plot(json.loads(Path(sys.argv[2]).read_text())["rows"], Path(sys.argv[2]).with_suffix(".png"),
             Path(sys.argv[2]).stem.replace("methods_", ""))
    else:
        main()
