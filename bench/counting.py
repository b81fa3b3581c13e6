"""What FLOPs counting costs per training step: no counting, live counting (a dispatch mode on every
operation), and the loop's cached counting (each batch shape and trainable set counted once).

    python bench/counting.py           # SmolLM2-135M (real weights), full FT, batch 4 x 256, 5 rounds
    python bench/counting.py --quick   # a 2-layer random config, 2 rounds

Settings are interleaved within each round; medians and ratios to "none" are reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    a = ap.parse_args()
    from greentrainer.engine.context import TrainContext
    from greentrainer.loop import step_key
    from greentrainer.models import load_model
    torch.manual_seed(0)
    if a.quick:
        from transformers import AutoModelForCausalLM
        from greentrainer.models import load_config
        cfg = load_config("smollm2-135m")
        cfg.num_hidden_layers = 2
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    else:
        model, _ = load_model("smollm2-135m")
    rounds = a.rounds or (2 if a.quick else 5)
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (4, 256))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["labels"] = batch["input_ids"].clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ctx = TrainContext(model=model, tokenizer=None, cfg=None, device=torch.device("cpu"), train_data=[],
                       profile=None, meta_model=None, seq2seq=False)

    def step(mode):
        key = step_key(model, batch) if mode == "cached" else None
        counted = mode != "none"
        t0 = time.perf_counter()
        with (ctx.count("forward", key) if counted else _null()):
            loss = model(**batch).loss
        with (ctx.count("backward", key) if counted else _null()):
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    modes = ("none", "live", "cached")
    for m in modes:  # warm-up; fills the cache (its one live count is not timed again)
        step(m)
    times = {m: [] for m in modes}
    for r in range(rounds):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            times[m].append(step(m))
    base = statistics.median(times["none"])
    rows = [{"counting": m, "median_step_s": statistics.median(times[m]),
             "ratio_to_none": statistics.median(times[m]) / base, "rounds": rounds} for m in modes]
    name = "counting_quick" if a.quick else "counting"
    write_results(name, "FLOPs counting overhead per training step (full FT, batch 4 x 256)", rows,
                  ["counting", "median_step_s", "ratio_to_none", "rounds"],
                  notes="`live`: FlopCounterMode's formulas applied by a dispatch mode to every operation; "
                        "`cached`: the loop's counting, which counts each (batch shape, trainable set) once "
                        "and then only looks the count up. Interleaved rounds, medians.")
    return 0


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
