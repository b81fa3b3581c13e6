"""Padded against grouped against packed batches on the default model (issue 33, item 3): what each costs in FLOPs
and time for the same training items, and the validation loss each reaches after them.

Two parts, each resumable (one JSON per setting in bench/results/packing/):

1. Training: full fine-tuning of SmolLM2-135M-Instruct on the same --items training items, each seen once (one
   epoch, batch 4, the same seed and lr), in three settings: random padded batches (the default),
   --group-by-length and --packing (rows of up to --max-input-length tokens, so about twice the items per step
   and fewer steps). The same items means the same target tokens; each run's FLOPs are measured, and its
   validation loss at the end is on the same --val-items items. Train times here are not a timing comparison
   (part 2 is).
2. Timing, interleaved: one model, one AdamW step after another in rounds (padded, grouped, packed, padded, ...),
   each on a batch of its setting drawn from the same items: median seconds per step, and items and target
   tokens per second, as ratios to padded batches (settings interleaved, so a slow minute slows all of them).
   Run it with nothing else on the machine.

python bench/packing.py [--quick] [--dataset dialogsum] [--items 256]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time

from common import RESULTS, machine
from greentrainer.files import write_json_atomic, write_text_atomic

SETTINGS = {"padded": {}, "grouped": {"group_by_length": True}, "packed": {"packing": True}}


def train_setting(name: str, a, log) -> dict:
    """Part 1 for one setting: its result file, or the one already there."""
    path = a.out / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from greentrainer.config import config_from_options
    from greentrainer.run import run_training
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_options(dict(dataset=a.dataset, method="full", lr=a.lr, epochs=1, batch_size=4,
                                       max_train=a.items, max_eval=a.val_items, max_input_length=a.max_input_length,
                                       no_eval=True, seed=0, eval_seed=0, output_dir=f"{tmp}/run", overwrite=True,
                                       no_energy=True, **SETTINGS[name]))
        m = run_training(cfg, log=lambda *x: None, progress=False)
    t = m["totals"]
    res = {"setting": name, "items": m["n_train"], "optimizer_steps": t["steps"], "val_loss": m["history"][-1]["val_loss"],
           "train_loss": m["history"][-1]["train_loss"], "flops_total": t["flops_total"],
           "flops_full_ft_reference": t["flops_full_ft_reference"],
           "flops_full_ft_random_batches": t.get("flops_full_ft_random_batches", t["flops_full_ft_reference"]),
           "train_time_s": t["time_s"], "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    write_json_atomic(path, res)
    log(f"{name}: {res['optimizer_steps']} steps, val loss {res['val_loss']:.4f}, "
        f"{res['flops_total'] / 1e12:.1f} TFLOPs")
    return res


def setting_batches(a) -> dict:
    """Each setting's batches over the same training items, as the loop builds them (seed 0)."""
    import torch
    from greentrainer.data import (DATASETS, encode_all, group_by_length, load_examples, pack,
                                   resolve_prompt_format)
    from greentrainer.models import load_model
    model, tok = load_model("smollm2-135m")
    spec = DATASETS[a.dataset]
    fmt = resolve_prompt_format("auto", tok, False, spec.instruction)
    enc = encode_all(load_examples(a.dataset, "train", a.items, 0, None), tok, spec.task, False, a.max_input_length,
                     fmt)
    order = torch.randperm(len(enc), generator=torch.Generator().manual_seed(0)).tolist()
    lengths = [len(e.input_ids) for e in enc]
    grouped = group_by_length(order, lengths, 4, torch.Generator().manual_seed(0))
    rows = pack(enc, a.max_input_length)
    row_order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    cut = lambda items, idx: [[items[j] for j in idx[i: i + 4]] for i in range(0, len(idx), 4)]  # noqa: E731
    return model, tok, {"padded": cut(enc, order), "grouped": cut(enc, grouped), "packed": cut(rows, row_order)}


def timing(a, log) -> dict:
    """Part 2: interleaved optimizer steps, the same model and optimizer throughout."""
    path = a.out / "timing.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch
    from greentrainer.data import collate, target_tokens
    model, tok, batches = setting_batches(a)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)  # tiny steps: the weights barely move between settings
    rng = random.Random(0)
    times = {k: [] for k in SETTINGS}
    counts = {k: [0, 0] for k in SETTINGS}  # items, target tokens of the timed steps

    def step(items):
        batch = collate(items, tok.pad_token_id, False)
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, batch

    for k in SETTINGS:  # warm-up, untimed
        step(batches[k][0])
    for r in range(a.rounds):
        for k in SETTINGS:
            items = rng.choice(batches[k])
            dt, batch = step(items)
            times[k].append(dt)
            counts[k][0] += sum(len(e.parts) or 1 for e in items)
            counts[k][1] += target_tokens(batch, False)
        log(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in SETTINGS))
    res = {k: {"median_step_s": statistics.median(times[k]), "steps": len(times[k]),
               "items_per_s": counts[k][0] / sum(times[k]), "target_tokens_per_s": counts[k][1] / sum(times[k]),
               "batches_in_epoch": len(batches[k])} for k in SETTINGS}
    res = {"settings": res, "rounds": a.rounds, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    write_json_atomic(path, res)
    return res


def report(a, runs: dict, tim: dict | None) -> None:
    pad = runs.get("padded")
    lines = ["# Padded, grouped and packed batches", "",
             f"`python bench/packing.py{' --quick' if a.quick else ''}` — {machine()}", "",
             f"SmolLM2-135M-Instruct, full fine-tuning, {a.dataset}: the same {a.items} training items each seen once "
             f"(one epoch, batch 4, lr {a.lr:g}, seed 0; so the same target tokens), chat format, "
             f"--max-input-length {a.max_input_length}; validation loss on the same {a.val_items} items at the end. "
             "Padded: random batches right-padded to their longest item (the default); grouped: --group-by-length; "
             "packed: --packing (rows of up to --max-input-length tokens, about twice the items per step, so "
             "fewer steps). FLOPs are measured; \"full FT on padded batches\" is what full fine-tuning on random "
             "padded batches of the same items costs (each run's own reference for padded batches).", "",
             "| setting | optimizer steps | FLOPs (TFLOPs) | % of full FT on padded batches | val loss | "
             "train loss |", "|---|---|---|---|---|---|"]
    for k in SETTINGS:
        r = runs.get(k)
        if r is None:
            continue
        lines.append(f"| {k} | {r['optimizer_steps']} | {r['flops_total'] / 1e12:.1f} | "
                     f"{100 * r['flops_total'] / r['flops_full_ft_random_batches']:.1f} | {r['val_loss']:.4f} | "
                     f"{r['train_loss']:.4f} |")
    if tim is not None:
        s = tim["settings"]
        lines += ["", f"Timing, interleaved ({tim['rounds']} rounds of one AdamW step per setting, on batches of the "
                  f"same items; {tim['machine']}, {tim['date']}): time per step grows with the packed rows' length, "
                  "but each step carries more items; what matters is items (or target tokens) per second.", "",
                  "| setting | median s per step | items per s | target tokens per s | vs padded (items per s) |",
                  "|---|---|---|---|---|"]
        for k in SETTINGS:
            lines.append(f"| {k} | {s[k]['median_step_s']:.2f} | {s[k]['items_per_s']:.3f} | "
                         f"{s[k]['target_tokens_per_s']:.1f} | {s[k]['items_per_s'] / s['padded']['items_per_s']:.2f}× |")
    if pad is not None and "packed" in runs:
        p = runs["packed"]
        lines += ["", f"Packing spent {100 * p['flops_total'] / pad['flops_total']:.1f} % of the padded run's FLOPs "
                  f"on the same items in {p['optimizer_steps']} steps instead of {pad['optimizer_steps']}; its validation "
                  f"loss after them: {p['val_loss']:.4f} against {pad['val_loss']:.4f}."]
    name = "packing" + ("_quick" if a.quick else "")
    write_text_atomic(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    write_json_atomic(RESULTS / f"{name}.json", {"runs": runs, "timing": tim})
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke test: 16 items, 4 validation items, 1 round")
    ap.add_argument("--dataset", default="dialogsum")
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--val-items", type=int, default=64)
    ap.add_argument("--max-input-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-5, help="full FT's swept lr (accuracy_sweep_scitldr.md)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--part", choices=("all", "train", "timing", "report"), default="all")
    a = ap.parse_args()
    if a.quick:
        a.items, a.val_items, a.rounds = 16, 4, 1  # (DialogSum's items need about 300 of the 512 tokens)
    a.out = RESULTS / ("packing_quick" if a.quick else "packing")
    a.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)
    if a.part in ("all", "train"):
        for k in SETTINGS:
            train_setting(k, a, log)
    if a.part in ("all", "timing"):
        timing(a, log)
    runs = {k: json.loads((a.out / f"{k}.json").read_text()) for k in SETTINGS if (a.out / f"{k}.json").is_file()}
    tim = json.loads((a.out / "timing.json").read_text()) if (a.out / "timing.json").is_file() else None
    report(a, runs, tim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
