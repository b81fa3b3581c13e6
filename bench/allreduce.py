"""Keeping a changing trainable set consistent across processes: what it costs.

    torchrun --nproc_per_node 2 bench/allreduce.py          # writes bench/results/allreduce.{md,json}
    torchrun --nproc_per_node 2 bench/allreduce.py --quick

Two ways, on 2 gloo processes, for the same trainable set (GreenTrainer-like: the top half of the tensors in
backward order, and all of them): (ours) no wrapper, after the backward the gradients of exactly the trainable
tensors are summed over processes in flattened 32 MiB buckets (greentrainer.engine.distributed.sync_gradients); (DDP)
torch's DistributedDataParallel rebuilt at each re-selection (its construction broadcasts the weights and
builds buckets for the tensors that require grad), its hooks overlapping the all-reduce with the backward.
Reported per step (median of interleaved rounds) and DDP's rebuild time, on a SmolLM2-135M-shaped config
(4 layers, random weights) at batch 2 × 256 per process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM
    from greentrainer.flops import profile_config
    from greentrainer.engine.distributed import sync_gradients
    from greentrainer.models import load_config
    acc = Accelerator(cpu=True)
    cfg = load_config("smollm2-135m")
    cfg.num_hidden_layers = 1 if a.quick else 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    seq = 64 if a.quick else 256
    torch.manual_seed(1 + acc.process_index)
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (2, seq))}
    batch["labels"] = batch["input_ids"].clone()
    names = profile_config(cfg, 2, seq).names
    params = dict(model.named_parameters())
    rounds = 2 if a.quick else 5

    def reduce_sum(t):
        dist.all_reduce(t)
        return t

    rows = []
    for label, chosen in (("top half of the tensors", names[: len(names) // 2]), ("all tensors", names)):
        keep = set(chosen)
        for n, p in params.items():
            p.requires_grad_(n in keep)
        trainable = [params[n] for n in chosen]
        times = {"ours": [], "DDP": [], "DDP rebuild": []}
        for r in range(rounds + 1):
            for way in (("ours", "DDP") if r % 2 == 0 else ("DDP", "ours")):
                dist.barrier()
                t0 = time.perf_counter()
                if way == "ours":
                    model(**batch).loss.backward()
                    sync_gradients(trainable, reduce_sum)
                else:
                    b0 = time.perf_counter()
                    ddp = torch.nn.parallel.DistributedDataParallel(model)
                    rebuild = time.perf_counter() - b0
                    t0 = time.perf_counter()
                    ddp(**batch).loss.backward()
                dist.barrier()
                elapsed = time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
                if r:  # the first round warms up
                    times[way].append(elapsed)
                    if way == "DDP":
                        times["DDP rebuild"].append(rebuild)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"trainable": f"{label} ({len(chosen)})", "ours_step_s": med["ours"],
                     "ddp_step_s": med["DDP"], "ddp_rebuild_s": med["DDP rebuild"],
                     "ours/ddp": med["ours"] / med["DDP"], "rounds": rounds})
    if acc.is_main_process:
        from common import write_results
        write_results("allreduce_quick" if a.quick else "allreduce",
                      "Consistent trainable set across 2 processes: our all-reduce vs a rebuilt DDP wrapper", rows,
                      ["trainable", "ours_step_s", "ddp_step_s", "ddp_rebuild_s", "ours/ddp", "rounds"],
                      notes="Forward + backward + gradient sum per step (the optimizer step is the same for both "
                            "and left out); `ddp_rebuild_s`: constructing DDP for the new trainable set, paid at "
                            "every re-selection. gloo on 2 CPU processes sharing 2 cores, so communication and "
                            "compute compete; on GPUs with nccl, DDP's overlap of all-reduce and backward matters "
                            "more.")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
