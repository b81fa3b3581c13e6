"""The demo: fine-tune the packaged default model with GreenTrainer on SciTLDR and show what it did.

Zero-shot and fine-tuned ROUGE on the same held-out test items with the same prompt format, two predictions
before and after, the measured FLOPs against full fine-tuning on the same batches, and the time saved (full
fine-tuning's step time is measured on a few of the same batches). Its settings were chosen on the
validation split (``--tune`` runs the same demo there), never on the items it reports.
"""
from __future__ import annotations

import json
import tempfile
import textwrap
import time
from pathlib import Path

DEMO_SETTINGS = dict(dataset="scitldr", method="greentrainer", rho=0.5, step_policy="select", max_train=160,
                     epochs=1, batch_size=4, max_input_length=320, max_eval=24, num_beams=1, eval_before=True)


def demo_config(output_dir: str, **overrides):
    from .config import config_from_options
    return config_from_options({**DEMO_SETTINGS, "output_dir": output_dir, "overwrite": True, **overrides})


def _validation_files(cfg, folder: Path) -> dict:
    """--tune: the demo's training items and validation items as JSONL files (train/eval of a user dataset)."""
    from .data import DATASETS, load_examples
    spec = DATASETS[cfg.dataset]
    out = {}
    for split, name, n in (("train", "train.jsonl", cfg.max_train), ("validation", "validation.jsonl", cfg.max_eval)):
        rows = [{"source": e.source, "target": e.target, "targets": e.targets, "id": e.id}
                for e in load_examples(cfg.dataset, split, n, cfg.seed)]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[split] = str(folder / name)
    return {"dataset": out["train"], "eval_dataset": out["validation"], "instruction": spec.instruction,
            "max_train": None}


def time_full_steps(model, batches, lr: float) -> float:
    """Seconds per full fine-tuning step (every tensor trains, AdamW), timed on ``batches`` after one warm-up."""
    import torch
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / max(len(times) - 1, 1)


def _wrap(label: str, text: str, width: int = 100) -> str:
    return textwrap.fill(text, width, initial_indent=f"  {label:11}", subsequent_indent=" " * 13)


def run_demo(output_dir: str = "runs/demo", tune: bool = False, log=print, progress=True, **overrides) -> dict:
    """Run the demo and print its report; returns the numbers it printed."""
    from .run import run_training
    with tempfile.TemporaryDirectory() as tmp:
        if tune:
            overrides = {**_validation_files(demo_config(output_dir, **overrides), Path(tmp)), **overrides}
        cfg = demo_config(output_dir, **overrides)
        m = run_training(cfg, log=log, progress=progress)
        return _report(cfg, m, "validation" if tune else "test")


def _report(cfg, m, split: str) -> dict:
    out = Path(cfg.output_dir)
    before, after = m["eval_before"], m["eval"]
    t = m["totals"]
    report = {"items": m["n_eval"], "split": split, "before": before, "after": after,
              "gain_rouge1": after["rouge1_first_ref"] - before["rouge1_first_ref"],
              "flops": t["flops_total"], "flops_full": t["flops_full_ft_reference"],
              "fraction": t["flops_fraction_of_full"], "train_time_s": t["time_s"], "steps": t["steps"]}
    if "co2_g" in t:
        report.update({k: t[k] for k in ("energy_kwh", "co2_g", "energy_full_ft_reference_kwh",
                                         "co2_full_ft_reference_g")}, energy_kind=t["energy"]["kind"])
    # full fine-tuning's step time on a few of the same training batches (the trained model's copy is fine:
    # a step's time does not depend on the weights)
    from .data import PromptFormat, collate, encode_all, load_examples, resolve_dataset
    from .models import load_model
    model, tok = load_model(str(out / "model"))
    fmt = PromptFormat(m["prompt_format"], m.get("instruction") or "")
    exs = load_examples(cfg.dataset, "train", 4 * cfg.batch_size, cfg.seed, cfg.eval_dataset)
    enc = encode_all(exs, tok, resolve_dataset(cfg.dataset)[0].task, False, cfg.max_input_length, fmt)
    batches = [collate(enc[i: i + cfg.batch_size], tok.pad_token_id, False) for i in range(0, len(enc), cfg.batch_size)]
    if batches:
        report["full_step_s"] = time_full_steps(model, batches, cfg.lr)
        report["full_time_s"] = report["full_step_s"] * report["steps"]
    _print_report(cfg, m, report, out)
    return report


def _print_report(cfg, m, r, out: Path) -> None:
    b, a = r["before"], r["after"]
    print()
    print(f"GreenTrainer demo: {cfg.model} fine-tuned on {m['n_train']} {cfg.dataset} training items, "
          f"ρ {m['config']['method_config']['rho']}, lr {cfg.lr:g}, {m['prompt_format']} prompt format")
    print(f"{'':12}{'zero-shot':>11}{'fine-tuned':>12}{'gain':>8}   ({r['items']} {r['split']} items, "
          f"greedy decoding)")
    for k, name in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
        x, y = b[f"{k}_first_ref"], a[f"{k}_first_ref"]
        print(f"{name:12}{x:11.1f}{y:12.1f}{y - x:+8.1f}")
    pre = [json.loads(ln) for ln in (out / "predictions_before.jsonl").read_text().splitlines()]
    post = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    for i in range(min(2, len(pre))):
        print(f"\n[{i + 1}]")
        print(_wrap("reference", pre[i]["references"][0]))
        print(_wrap("zero-shot", pre[i]["prediction"] or "(empty)"))
        print(_wrap("fine-tuned", post[i]["prediction"] or "(empty)"))
    print(f"\ncompute: {r['flops'] / 1e12:.1f} TFLOPs measured = {100 * r['fraction']:.1f}% of full fine-tuning on "
          f"the same batches ({r['flops_full'] / 1e12:.1f} TFLOPs)")
    if "full_step_s" in r:
        full = r["full_time_s"]
        print(f"time: {r['train_time_s']:.0f} s of training ({r['steps']} steps, probes included); full fine-tuning: "
              f"~{full:.0f} s ({r['full_step_s']:.1f} s per step, timed on training batches) → "
              f"~{full - r['train_time_s']:.0f} s saved ({100 * (1 - r['train_time_s'] / full):.0f}%)")
    if "co2_g" in r:
        from .energy import fmt_co2, fmt_energy
        print(f"energy: {fmt_energy(r['energy_kwh'])} ({r['energy_kind']}, CodeCarbon) = {fmt_co2(r['co2_g'])} "
              f"({m.get('grid', {}).get('carbon_intensity_source', 'along the trace')}); full fine-tuning on the same batches: {fmt_energy(r['energy_full_ft_reference_kwh'])}"
              f" = {fmt_co2(r['co2_full_ft_reference_g'])} (this run's energy per FLOP)")
    print(f"run folder: {out} (metrics.json, predictions.jsonl, predictions_before.jsonl, model/, carbon.png)")
