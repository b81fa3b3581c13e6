"""SMT's saved activations: one shared copy of a module input's columns (q/k/v of one attention, gate/up of one
MLP) against one copy per projection. SmolLM2-135M's shapes with random weights, batch 4 × 512, block 192,
blocks drawn at random (fixed seed) up to the parameter budget; the same blocks for both variants.

Per setting: bytes the SMT layers save for backward during the forward (distinct storages, from
``saved_tensors_hooks``) and the process's peak RSS over one forward + backward, each run in a fresh
subprocess (settings interleaved, median over the repeats). The children run with MALLOC_MMAP_THRESHOLD_ fixed
at 1 MiB so that freed tensors leave the RSS at once and the peak follows the live bytes.

python bench/smt_memory.py [--quick] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

# (targets, % of the model's parameters); the dense row shows the effect where q, k and v pick the same columns
SETTINGS = [("q,k,v", 1.0), ("q,k,v,o,gate,up,down", 1.0), ("q,k,v", 10.0)]
BLOCK = 192
BATCH, SEQ = 4, 512


def smollm2_config(layers: int | None = None):
    try:
        from greentrainer.models import load_config
        cfg = load_config("smollm2-135m")
    except Exception:  # no cached config: its sizes, built in code
        from transformers import LlamaConfig
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64,
                          max_position_embeddings=8192, rms_norm_eps=1e-5)
    if layers:
        cfg.num_hidden_layers = layers
    return cfg


def build_model(cfg, seed: int = 0):
    """Random weights without transformers' (slow) initialisation: N(0, 0.02) matrices, unit norms."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        for m in model.modules():  # non-persistent buffers (rotary frequencies) are recomputed
            if type(m).__name__.endswith("RotaryEmbedding"):
                m.__init__(cfg)
    model.tie_weights()
    return model


def random_blocks(model, kinds: list[str], percent: float, l: int, seed: int = 0):
    """{target name: [(row, col), ...]}: blocks drawn uniformly over all target blocks, up to the budget."""
    from greentrainer.methods.smt import find_targets
    targets = find_targets(model, kinds)
    modules = dict(model.named_modules())
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    pool = [(n, r, c) for n in sorted(targets) for r in range(modules[n].weight.shape[0] // l)
            for c in range(modules[n].weight.shape[1] // l)]
    n_blocks = min(len(pool), max(1, int(percent / 100 * total) // (l * l)))
    chosen: dict[str, list] = {}
    for n, r, c in sorted(random.Random(seed).sample(pool, n_blocks)):
        chosen.setdefault(n, []).append((r, c))
    return targets, chosen, n_blocks, len(pool)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """One forward + backward of one setting in this (fresh) process."""
    import torch
    from greentrainer.methods.smt import install_layers
    from greentrainer.smt_layer import saved_activation_bytes
    model = build_model(smollm2_config(spec["layers"]))
    for p in model.parameters():
        p.requires_grad_(False)
    targets, chosen, n_blocks, _ = random_blocks(model, spec["targets"].split(","), spec["percent"], BLOCK)
    layers = install_layers(model, chosen, BLOCK, targets, share_inputs=spec["shared"])
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    before = rss_mb()
    t0 = time.perf_counter()
    loss, smt_b, all_b = saved_activation_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert all(layer.blocks.grad is not None for layer in layers.values())
    return {"smt_saved_bytes": smt_b, "all_saved_bytes": all_b, "rss_before_mb": before, "peak_rss_mb": peak,
            "seconds": seconds, "n_blocks": n_blocks, "groups": len({id(m.share) for m in layers.values()}),
            "layers": len(layers)}


def run_child(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    from common import write_results
    layers = 2 if a.quick else None
    repeats = 1 if a.quick else a.repeats
    specs = [{"targets": t, "percent": p, "shared": s, "layers": layers} for t, p in SETTINGS for s in (False, True)]
    runs: dict[int, list[dict]] = {i: [] for i in range(len(specs))}
    for r in range(repeats):  # interleaved: every setting once per round, each in a fresh process
        for i, spec in enumerate(specs):
            res = run_child(spec)
            runs[i].append(res)
            print(f"round {r + 1}/{repeats} {spec}: {res}", flush=True)
    rows = []
    for i, spec in enumerate(specs):
        rs = runs[i]
        first = rs[0]
        assert all(x["smt_saved_bytes"] == first["smt_saved_bytes"] for x in rs)  # deterministic
        row = {"targets": spec["targets"], "params_%": spec["percent"], "blocks": first["n_blocks"],
               "saved inputs": "shared" if spec["shared"] else "one per layer",
               "layers/groups": f"{first['layers']}/{first['groups']}",
               "smt_saved_MB": first["smt_saved_bytes"] / 2**20, "all_saved_MB": first["all_saved_bytes"] / 2**20,
               "peak_rss_MB": statistics.median(x["peak_rss_mb"] for x in rs),
               "step_peak_MB": statistics.median(x["peak_rss_mb"] - x["rss_before_mb"] for x in rs),
               "peak_rss_runs_MB": [round(x["peak_rss_mb"], 1) for x in rs],
               "step_s": statistics.median(x["seconds"] for x in rs)}
        if spec["shared"]:
            base = rows[-1]
            row["smt_saved_ratio"] = base["smt_saved_MB"] / row["smt_saved_MB"]
            row["peak_drop_MB"] = base["peak_rss_MB"] - row["peak_rss_MB"]
        rows.append(row)
    cfg = smollm2_config(layers)
    n_layers = cfg.num_hidden_layers
    name = "smt_memory" + ("_quick" if a.quick else "")
    notes = (f"SmolLM2-135M shapes ({n_layers} layers), random weights, fp32, batch {BATCH} × {SEQ}, block "
             f"{BLOCK}, blocks drawn at random (seed 0) up to params_% of the model's parameters, the same blocks "
             "for both rows of a pair. smt_saved_MB: what the SMT layers save for backward (distinct storages); "
             "all_saved_MB: everything the forward saves. Peak RSS: one forward + backward in a fresh process, "
             f"median of {repeats} interleaved run(s) (each run's value in peak_rss_runs_MB); step_peak_MB: peak "
             "minus the RSS just before the forward. smt_saved_ratio: one-per-layer over shared. layers/groups: "
             "SMT layers and the input-share groups they form. At 1% the random blocks seldom put two projections "
             "of one module on the same input columns, so sharing saves little there; at 10% of q,k,v it does.")
    write_results(name, "SMT: one saved input per module input, against one per projection", rows,
                  ["targets", "params_%", "blocks", "saved inputs", "layers/groups", "smt_saved_MB",
                   "smt_saved_ratio", "all_saved_MB", "peak_rss_MB", "peak_drop_MB", "step_peak_MB", "step_s",
                   "peak_rss_runs_MB"], notes, extra={"runs": {str(i): runs[i] for i in runs}, "specs": specs})


if __name__ == "__main__":
    main()
