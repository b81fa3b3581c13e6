"""The GPU benchmark anyone can run (issue 38): does step time follow FLOPs on a GPU, and what do our counting
and bookkeeping cost there?

One command, nothing downloaded: a random-weight model of Llama-3.2-1B's shape (16 layers, hidden 2048, GQA 32/8
heads, tied 128k vocabulary) with the packaged tokenizer on SciTLDR's training items, bf16 weights
(--precision bf16-true), fused attention (on CUDA the flash/efficient SDPA kernels, counted exactly like
eager attention), the items packed into full rows (--packing) so every batch has about the plain loop's
shape. Full fine-tuning, GreenTrainer ρ 0.5 and 0.7, LoRA, SMT and GreenTrainer over LoRA adapters
each train the same batches through the tool (`greentrainer train`'s code): median step time, the step-time
ratio to full FT next to the FLOPs fraction, peak memory (torch.cuda.max_memory_allocated) and energy
(CodeCarbon: NVML on NVIDIA GPUs, "measured"). Then the physical anchor: a plain PyTorch/transformers loop
(forward, backward, AdamW, nothing else) on the same shape, training the same tensors as each run's last
selection, the settings interleaved step by step; ours over plain is what the tool adds (counting,
bookkeeping, the selection's probes). About 6 minutes on one H100.

python bench/gpu.py           # CUDA (writes bench/results/gpu.md, naming the device)
python bench/gpu.py --tiny    # the same code on the CPU with a tiny model (seconds; the test suite runs it)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine
from greentrainer.files import write_json_atomic, write_text_atomic

# label -> options of `greentrainer train`
METHODS = {
    "full FT": {"method": "full"},
    "GreenTrainer ρ 0.5": {"method": "greentrainer", "rho": 0.5, "step_policy": "select"},
    "GreenTrainer ρ 0.7": {"method": "greentrainer", "rho": 0.7, "step_policy": "select"},
    "LoRA": {"method": "lora"},
    "SMT": {"method": "smt"},
    "GT over LoRA ρ 0.5": {"method": "greentrainer", "over": "lora", "rho": 0.5},
}


def model_config(tiny: bool):
    from transformers import LlamaConfig
    if tiny:
        from greentrainer.models import tiny_config
        return tiny_config("llama")
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0,
                       eos_token_id=2, pad_token_id=None)


def build_model(folder: Path, tiny: bool, dtype) -> None:
    """The random-weight model and the packaged tokenizer, saved as an ordinary model folder."""
    import torch
    from transformers import AutoModelForCausalLM
    from greentrainer.models import load_model, tiny_tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(tiny), dtype=dtype)
    if tiny:
        tok = tiny_tokenizer()
    else:
        _, tok = load_model("smollm2-135m")  # its ids all lie inside the larger vocabulary
        model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def run_method(label: str, a, folder: Path, work: Path) -> dict:
    from greentrainer.config import config_from_options
    from greentrainer.run import run_training
    opts = dict(METHODS[label])
    if opts["method"] == "smt":
        opts["smt_warmup"] = max(1, a.steps // 4)
    cfg = config_from_options(dict(model=str(folder), dataset=a.dataset, epochs=1, batch_size=a.batch_size,
                                   max_train=a.items, max_steps=a.steps, packing=True,
                                   max_eval=4, max_input_length=a.seq_len,
                                   no_eval=True, seed=0, output_dir=str(work / "run"), overwrite=True,
                                   precision=a.precision, device=a.device, **opts))
    m = run_training(cfg, log=lambda *x: None, progress=False)
    t = m["totals"]
    sel = json.loads((work / "run" / "selections.json").read_text())["selections"] \
        if (work / "run" / "selections.json").is_file() else []
    trainable = sel[-1]["selected"] if sel and sel[-1].get("selected") else None
    return {"label": label, "flops_fraction_of_full": t["flops_fraction_of_full"],
            "step_s": m["history"][-1]["step_time_median_s"], "steps": t["steps"],
            "peak_memory_gib": t["peak_memory_bytes"] / 2**30, "energy_wh": 1000 * t.get("energy_kwh", 0.0),
            "energy_kind": t.get("energy", {}).get("kind", "off"), "last_selection": trainable}


def plain_loop(a, folder: Path, runs: list[dict]) -> dict:
    """The physical anchor: forward, backward and AdamW on the same shape, only the tensors each run trained
    last (full FT: all; LoRA and SMT are not comparable this way and are left out), interleaved step by step."""
    import torch
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if a.precision == "bf16-true" else torch.float32
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
    model.train()
    sets = {}
    for r in runs:
        if r["label"] == "full FT":
            sets[r["label"]] = None
        elif r["last_selection"] and "over" not in METHODS[r["label"]] and METHODS[r["label"]]["method"] == "greentrainer":
            sets[r["label"]] = set(r["last_selection"])
    ids = torch.randint(0, model.config.vocab_size, (a.batch_size, a.seq_len), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}

    def step(names, opt):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    from greentrainer.flops import FlopCounter
    counted = {}
    for impl in ("sdpa", "eager"):  # the fused kernels are counted like eager attention, on the same batch
        model.config._attn_implementation = impl
        with FlopCounter() as c:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        counted[impl] = c.total
    model.config._attn_implementation = "sdpa"
    opts, times = {}, {k: [] for k in sets}
    for k, names in sets.items():
        params = [p for n, p in model.named_parameters() if names is None or n in names]
        opts[k] = (names, torch.optim.AdamW(params, lr=1e-9))
    for rnd in range(a.plain_rounds + 1):
        for k, (names, opt) in opts.items():
            for n, p in model.named_parameters():
                p.requires_grad_(names is None or n in names)
            dt = step(names, opt)
            if rnd:  # the first round warms up
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}, counted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, a tiny model, 24 steps: the same code in about a minute")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--plain-rounds", type=int, default=20)
    ap.add_argument("--dataset", default="scitldr")
    a = ap.parse_args()
    import torch
    if a.tiny:
        a.steps, a.batch_size, a.seq_len, a.plain_rounds = 24, 2, 512, 3
        a.items = a.steps * a.batch_size  # byte tokens: one item a row
        a.device, a.precision = "cpu", "32-true"
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py needs a CUDA GPU (or --tiny for the CPU check)", file=sys.stderr)
            return 2
        a.device, a.precision = "cuda", "bf16-true"
        a.items = 8 * a.steps * a.batch_size  # enough to fill the rows of every step
    device_name = torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU (--tiny: not a GPU result)"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_model(folder, a.tiny, torch.bfloat16 if a.precision == "bf16-true" else torch.float32)
        runs = []
        for label in METHODS:
            runs.append(run_method(label, a, folder, Path(tmp)))
            print(f"{label}: {runs[-1]['step_s']:.3f} s per step, {100 * runs[-1]['flops_fraction_of_full']:.1f}% "
                  "of full FT's FLOPs", flush=True)
        plain, counted = plain_loop(a, folder, runs)
    full = runs[0]
    rows = []
    for r in runs:
        rows.append({**{k: v for k, v in r.items() if k != "last_selection"},
                     "step_time_ratio_to_full": r["step_s"] / full["step_s"],
                     "plain_step_s": plain.get(r["label"]),
                     "ours_over_plain": r["step_s"] / plain[r["label"]] if r["label"] in plain else None})
    name = "gpu"  # --tiny too, labelled (until a GPU run replaces it)
    shape = "a tiny random Llama (hidden 64, 2 layers)" if a.tiny else \
        "random weights of Llama-3.2-1B's shape (1.24 B parameters)"
    lines = [f"# GPU benchmark: {device_name}", "",
             f"`python bench/gpu.py{' --tiny' if a.tiny else ''}` — {machine()}, {device_name}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {time.perf_counter() - t0:.0f} s in all", "",
             f"{shape}, {a.precision}, SDPA attention, {a.dataset}'s training items packed (--packing) into rows "
             f"of up to {a.seq_len} tokens, {a.steps} steps of {a.batch_size} rows, the same batches for every "
             "method (every batch nearly the plain loop's full shape). Step time: the median over the run's steps (probes included in the steps that make them). "
             "Plain loop: forward, backward and AdamW with only the tensors the run trained last, nothing else, "
             "interleaved; ours over plain: what the tool adds.", "",
             "| method | FLOPs % of full FT | median step s | step time / full FT's | plain loop s | ours / plain | "
             "peak memory GiB | energy Wh (kind) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plain_s = f"{r['plain_step_s']:.3f}" if r["plain_step_s"] else ""
        ratio = f"{r['ours_over_plain']:.2f}" if r["ours_over_plain"] else ""
        lines.append(f"| {r['label']} | {100 * r['flops_fraction_of_full']:.1f} | {r['step_s']:.3f} | "
                     f"{r['step_time_ratio_to_full']:.2f} | {plain_s} | {ratio} | {r['peak_memory_gib']:.2f} | "
                     f"{r['energy_wh']:.3f} ({r['energy_kind']}) |")
    lines += ["", f"Fused attention counted exactly: a full fine-tuning step on one batch counts {counted['sdpa']:,} "
              f"FLOPs with SDPA and {counted['eager']:,} with eager attention"
              + (" (equal)." if counted["sdpa"] == counted["eager"] else " (NOT equal: a kernel is miscounted).")]
    if a.tiny:
        lines += ["", "A CPU run of the GPU benchmark's code on a tiny model: it shows the bench works, not how a "
                  "GPU behaves. On a machine with a CUDA GPU: `python bench/gpu.py` (about 6 minutes on an H100)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    write_json_atomic(RESULTS / f"{name}.json", {"device": device_name, "machine": machine(), "rows": rows,
                                                 "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                                                 "precision": a.precision, "tiny": a.tiny,
                                                 "attention_flops": counted})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
