"""Peak memory of a transformers.Trainer run with GreenTrainerCallback at ρ 0.5 against full fine-tuning.

The default model (SmolLM2-135M, real weights, fp32), batch 4 × 256 tokens of SciTLDR text, AdamW built by the
Trainer over every tensor (as in any Trainer script). Settings, each in a fresh subprocess, interleaved over the
repeats: full fine-tuning (no callback); the callback at ρ 0.5 with the deselected tensors' AdamW state dropped
(``deselected_state="drop"``, the default, the loop's behaviour since the one controller); and with it kept
(``"keep"``, what the callback did before: state for every tensor ever selected). The callback selects every
``--select-every`` steps (no warm-up), so the selection changes during the run and "keep" accumulates state.
Memory: resident-set size above the RSS after loading the model, sampled every 5 ms, with
MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB so that freed tensors leave the resident set at once.

python bench/callback_memory.py [--quick] [--repeats 2] [--steps 16] [--select-every 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

SETTINGS = ("full", "drop", "keep")


def child(setting: str, steps: int, select_every: int, quick: bool) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from greentrainer.callback import GreenTrainerCallback
    from greentrainer.data import Encoded, collate, encode_all, load_examples, resolve_dataset, resolve_prompt_format
    from greentrainer.engine.memory import PeakMemory
    from greentrainer.models import load_model, tiny_config, tiny_tokenizer
    torch.manual_seed(0)
    if quick:
        from transformers import AutoModelForCausalLM
        model, tok = AutoModelForCausalLM.from_config(tiny_config("llama")), tiny_tokenizer()
    else:
        model, tok = load_model("smollm2-135m")
    spec, _ = resolve_dataset("scitldr")
    fmt = resolve_prompt_format("auto", tok, False, spec.instruction)
    ex = load_examples("scitldr", "train", 4 * steps * 2, 0, None)
    data = [dict(input_ids=e.input_ids, labels=e.labels)
            for e in encode_all(ex, tok, spec.task, False, 1024 if quick else 256, fmt)]
    rss0 = PeakMemory.rss()

    class Probe(TrainerCallback):  # peak RSS from the first step to the end of training
        def on_train_begin(self, *a, **k):
            self.mem = PeakMemory(torch.device("cpu")).__enter__()

        def on_train_end(self, *a, **k):
            self.mem.__exit__(None, None, None)

    probe = Probe()
    callbacks = [probe]
    cb = None
    if setting != "full":
        cb = GreenTrainerCallback(rho=0.5, select_every=select_every, full_warmup_steps=0, energy=False,
                                  deselected_state=setting, log=lambda *a: None)
        callbacks.insert(0, cb)
    args = TrainingArguments(output_dir="/tmp/gt-callback-memory", per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=3e-4, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True, optim="adamw_torch")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks,
                      data_collator=lambda b: collate([Encoded(i["input_ids"], i["labels"], []) for i in b],
                                                      tok.pad_token_id, False))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    out = {"setting": setting, "peak_MB": (probe.mem.peak - rss0) / 2**20, "model_RSS_MB": rss0 / 2**20,
           "optimizer_state_MB": state_bytes / 2**20, "state_tensors": len(opt.state), "seconds": seconds}
    if cb is not None:
        sel = [len(s["selected"]) for s in cb.selections]
        ever = len(set().union(*(s["selected"] for s in cb.selections)))
        out.update(selected=sel, ever=ever, flops_fraction=(cb.flops["steps"] + cb.flops["probes"])
                   / cb.flops["full_ft_reference"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny random model (the test suite's smoke run)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--select-every", type=int, default=8)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.steps, a.select_every, a.quick)))
        return
    runs = {s: [] for s in SETTINGS}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    for _ in range(a.repeats):
        for s in SETTINGS:  # interleaved
            cmd = [sys.executable, __file__, "--child", s, "--steps", str(a.steps), "--select-every",
                   str(a.select_every)] + (["--quick"] if a.quick else [])
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{s}: the child run failed:\n{res.stderr[-2000:]}")
            runs[s].append(json.loads(line[7:]))
    full = statistics.median(r["peak_MB"] for r in runs["full"])
    rows = []
    for s in SETTINGS:
        r = dict(runs[s][-1])
        r["peak_MB"] = statistics.median(x["peak_MB"] for x in runs[s])
        r["peak_vs_full"] = r["peak_MB"] / full
        r["peak_runs_MB"] = [round(x["peak_MB"]) for x in runs[s]]
        r["setting"] = {"full": "full FT (Trainer, no callback)", "drop": "callback ρ 0.5, drop (default)",
                        "keep": "callback ρ 0.5, keep"}[s]
        rows.append(r)
    sys.path.insert(0, os.path.dirname(__file__))
    from common import write_results
    model = "a tiny random LLaMA (--quick)" if a.quick else "SmolLM2-135M (real weights, fp32)"
    write_results("callback_memory" + ("_quick" if a.quick else ""),
                  "Peak memory: a Trainer run with GreenTrainerCallback at ρ 0.5 vs full fine-tuning",
                  rows, ["setting", "peak_MB", "peak_vs_full", "optimizer_state_MB", "state_tensors", "selected",
                         "ever", "flops_fraction", "model_RSS_MB", "seconds", "peak_runs_MB"],
                  notes=f"{model}, batch 4 × 256 tokens of SciTLDR, {a.steps} optimizer steps, AdamW built by the "
                        f"Trainer over every tensor; the callback selects every {a.select_every} steps (no warm-up). "
                        f"peak_MB: resident set above the RSS after loading (model_RSS_MB), from the first step "
                        f"to the end of training, median of {a.repeats} interleaved run(s) (peak_runs_MB: each), each "
                        f"in a fresh process with MALLOC_MMAP_THRESHOLD_=1 MiB. optimizer_state_MB: the AdamW "
                        f"state at the end; selected: tensors per selection; ever: tensors selected at least once; "
                        f"flops_fraction: measured FLOPs (steps and probes) over full fine-tuning's on the same "
                        f"batches. keep: every tensor ever selected keeps its state (the callback before the one "
                        f"controller); drop: only the selected tensors' state stays.")


if __name__ == "__main__":
    main()
