"""Eager vs fused (SDPA) attention: full fine-tuning step time, and the FLOPs our counter measures for each.

SmolLM2-135M's real config with random weights (same seed for both), one model and one AdamW per attention
implementation; a right-padded batch from greentrainer.data.collate (so transformers passes a padding mask,
as in training). Each round times one step (forward, backward, AdamW step) of each implementation, the order
alternating round by round; round 0 warms up and measures the step's FLOPs (FlopCounter, not timed).

python bench/attention.py [--quick] [--repeats N]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from common import write_results
from greentrainer.data import Encoded, collate
from greentrainer.flops import FlopCounter
from greentrainer.models import load_config

IMPLS = ("eager", "sdpa")


def padded_batch(cfg, batch: int, seq: int) -> dict:
    """``batch`` sequences of lengths seq, 7/8 seq, 3/4 seq, …, right-padded to ``seq`` as in training."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(batch):
        n = seq - i * seq // 8
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
        items.append(Encoded(ids, [-100] * (n // 2) + ids[n // 2:], ids))
    return collate(items, cfg.pad_token_id if cfg.pad_token_id is not None else 0, False)


def step(model, opt, batch, counter=None):
    t0 = time.perf_counter()
    with counter if counter is not None else torch.enable_grad():
        loss = model(**batch).loss
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 layers, 1 timed round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up round")
    ap.add_argument("--shapes", default="4x256,4x512")
    a = ap.parse_args()
    repeats = 1 if a.quick else a.repeats
    cfg = load_config("smollm2-135m")
    if a.quick:
        cfg.num_hidden_layers = 2
    from transformers import AutoModelForCausalLM
    models, opts = {}, {}
    for impl in IMPLS:
        torch.manual_seed(0)
        models[impl] = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).train()
        assert models[impl].config._attn_implementation == impl
        opts[impl] = torch.optim.AdamW(models[impl].parameters(), lr=1e-5)
    load_before = os.getloadavg()
    rows = []
    for shape in a.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        batch = padded_batch(cfg, b, s)
        times = {k: [] for k in IMPLS}
        flops, loss0 = {}, {}
        for r in range(repeats + 1):
            for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
                if r == 0:
                    counter = FlopCounter()
                    _, loss0[impl] = step(models[impl], opts[impl], batch, counter)
                    flops[impl] = counter.total
                else:
                    times[impl].append(step(models[impl], opts[impl], batch)[0])
            print(shape, "round", r, {k: v[-1:] for k, v in times.items()}, flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"shape": f"{b}x{s}", "repeats": repeats,
                     "eager_median_s": med["eager"], "sdpa_median_s": med["sdpa"],
                     "sdpa/eager_time": med["sdpa"] / med["eager"], "speedup": med["eager"] / med["sdpa"],
                     "eager_min_max_s": f"{min(times['eager']):.3f}–{max(times['eager']):.3f}",
                     "sdpa_min_max_s": f"{min(times['sdpa']):.3f}–{max(times['sdpa']):.3f}",
                     "eager_GFLOPs": flops["eager"] / 1e9, "sdpa_GFLOPs": flops["sdpa"] / 1e9,
                     "flops_equal": flops["eager"] == flops["sdpa"],
                     "first_loss_abs_diff": abs(loss0["eager"] - loss0["sdpa"]),
                     "eager_times_s": times["eager"], "sdpa_times_s": times["sdpa"]})
        print(rows[-1], flush=True)
    load_after = os.getloadavg()
    load = (f"load average (1/5/15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before "
            f"timing, {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after, on "
            f"{os.cpu_count()} CPUs")
    layers = cfg.num_hidden_layers
    write_results("attention" + ("_quick" if a.quick else ""), "Attention implementation: eager vs SDPA",
                  rows, ["shape", "repeats", "eager_median_s", "sdpa_median_s", "sdpa/eager_time", "speedup",
                         "eager_min_max_s", "sdpa_min_max_s", "eager_GFLOPs", "sdpa_GFLOPs", "flops_equal",
                         "first_loss_abs_diff"],
                  f"SmolLM2-135M config ({layers} layers), random weights, float32 on the CPU; one full fine-tuning "
                  f"step (forward, backward, AdamW) per implementation per round, {repeats} rounds interleaved "
                  "(order alternating) after a warm-up round; median shown. Right-padded batch (lengths s, 7s/8, "
                  "3s/4, 5s/8), so a padding mask is passed; SDPA runs `_scaled_dot_product_flash_attention_for_cpu`"
                  " and its backward. FLOPs: our FlopCounter on the warm-up step, SDPA counted as eager attention "
                  f"(QKᵀ and PV matmuls; backward the four matmuls eager runs). Machine: {load}.",
                  extra={"load_before": load_before, "load_after": load_after, "layers": layers})


if __name__ == "__main__":
    main()
