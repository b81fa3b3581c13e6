"""Memory that is really saved: GreenTrainer keeps optimizer state only for the tensors selected now.

Peak memory of a few training steps on the default model (SmolLM2-135M, real weights, fp32), batch 4 × 256
tokens of SciTLDR text, for full fine-tuning and for GreenTrainer ρ 0.5 with the deselected tensors' AdamW state
dropped (``deselected_state="drop"``, the default), kept in the optimizer (``"keep"``, the behaviour before) and,
with ``--settings`` naming it, moved to host memory (``"cpu"``: on a CPU-only machine that is the same memory).
Each run: select, 2 steps, re-select, 2 steps (GreenTrainer; full FT runs the same 4 steps),
with the loop's own step (:func:`greentrainer.loop._optimizer_step`), the method's own selection, and a nominal
epoch of 250 steps so that each probe's cost is spread as in a real epoch (with 2 real steps per selection ρ 0.5
could not pay for its probes). Every run is a fresh subprocess (settings interleaved, median of the repeats);
the children run with MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB so that freed tensors leave the resident set at once
and the RSS follows the live bytes (glibc's default keeps freed heap pages, which would hide any saving).

Per run: peak RSS over the training part (selections + steps) and separately over the steps and over the
selections (probe), the RSS after the last step, all above the RSS after loading the model; and the optimizer
state bytes at the end (the sum of the state tensors' bytes; "cpu" also reports the bytes held on the host).

``--validation``: what a re-selected tensor should start from, measured: "drop" (fresh moments) against "cpu"
(its own moments back, i.e. exactly the old behaviour) on SmolLM2-135M, SciTLDR train 32 / validation 24,
3 epochs with a selection at each, lr 3e-4, ρ 0.6: validation loss per epoch (bench/results/memory_validation).

python bench/memory.py [--quick] [--repeats 2] [--settings full,drop,keep] | --validation
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

BATCH, SEQ = 4, 256
NOMINAL_EPOCH = 250          # steps per selection the budget assumes (a real epoch's order of magnitude)
LR = 3e-4


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PhasePeaks:
    """RSS sampled every 5 ms, the peak kept per phase (set ``phase`` to switch)."""

    def __init__(self):
        self.phase, self.peaks, self._stop = "idle", {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss())

    def _run(self):
        while not self._stop.wait(0.005):
            self._sample()

    def set(self, phase):
        self._sample()
        self.phase = phase
        self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def load(quick: bool):
    """(model, tokenizer, examples of exactly SEQ tokens): the default model, or 2 random layers of its shape."""
    import types

    import torch
    from greentrainer.data import Encoded
    if quick:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from smt_memory import build_model, smollm2_config
        model = build_model(smollm2_config(2))
        model.config._attn_implementation = "eager"
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, model.config.vocab_size, (SEQ,), generator=g).tolist() for _ in range(16)]
        tok = types.SimpleNamespace(pad_token_id=0)
    else:
        from greentrainer.data import load_examples
        from greentrainer.models import load_model
        model, tok = load_model("smollm2-135m")
        text = " ".join(f"{e.source} {e.target}" for e in load_examples("scitldr", "train", 64, 0))
        ids = tok(text, add_special_tokens=False).input_ids
        rows = [ids[i * SEQ: (i + 1) * SEQ] for i in range(16)]
        assert all(len(r) == SEQ for r in rows)
    return model, tok, [Encoded(input_ids=r, labels=list(r), prompt_ids=[]) for r in rows]


def child(spec: dict) -> dict:
    """The training steps of one setting in this (fresh) process."""
    import torch
    from transformers import get_linear_schedule_with_warmup
    from greentrainer.config import TrainConfig
    from greentrainer.methods.greentrainer import GreenTrainerConfig
    from greentrainer.flops import full_step_flops, meta_model_from_config, profile_config
    from greentrainer.engine.context import TrainContext
    from greentrainer.engine.distributed import build_accelerator
    from greentrainer.loop import _optimizer_step
    from greentrainer.methods.full import FullFineTuning
    from greentrainer.methods.greentrainer import GreenTrainerMethod
    from greentrainer.methods.greentrainer.controller import state_bytes
    torch.manual_seed(0)
    model, tok, data = load(spec["quick"])
    selections, per_selection = spec["selections"], spec["steps"]
    cfg = TrainConfig(method="full" if spec["setting"] == "full" else "greentrainer", batch_size=BATCH, lr=LR,
                      seed=0, method_config=GreenTrainerConfig(rho=spec["rho"], step_policy="select"))
    full = spec["setting"] == "full"
    method = FullFineTuning() if full else GreenTrainerMethod(cfg.method_config, deselected_state=spec["setting"])
    device = torch.device("cpu")
    ctx = TrainContext(model=model, tokenizer=tok, cfg=cfg, device=device, train_data=data,
                       profile=profile_config(model.config, BATCH, SEQ),
                       meta_model=meta_model_from_config(model.config),
                       seq2seq=False, log=lambda *a: None, accelerator=build_accelerator(device))
    ctx.steps_per_epoch = NOMINAL_EPOCH
    ctx.total_steps = NOMINAL_EPOCH * selections
    model = ctx.model = method.prepare(model, ctx)
    model.train()
    ctx.optimizer = torch.optim.AdamW(method.optimizer_parameters(model), lr=LR, weight_decay=cfg.weight_decay)
    ctx.scheduler = get_linear_schedule_with_warmup(ctx.optimizer, 0, ctx.total_steps)
    batches = [ctx.collate(data[i: i + BATCH]) for i in range(0, len(data), BATCH)]
    reference = full_step_flops(ctx.meta_model, batches[0])
    base = rss()
    t0 = time.perf_counter()
    with PhasePeaks() as peaks:
        for s in range(selections):
            if not full:
                peaks.set("select")
                method.controller.select(ctx)
            peaks.set("steps" if s < selections - 1 else "last_steps")
            for k in range(per_selection):
                _optimizer_step(ctx, method, [batches[(s * per_selection + k) % len(batches)]])
                ctx.flops_reference += reference
        peaks.set("after")
        after = rss()
    seconds = time.perf_counter() - t0
    state = ctx.optimizer.state.values()
    res = {"base_rss": base, "after_rss": after, "seconds": seconds, "peaks": peaks.peaks,
           "state_bytes": state_bytes(state),
           "state_tensors": len(ctx.optimizer.state),
           "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "flops_fraction": sum(ctx.flops.values()) / ctx.flops_reference}
    if not full:
        res["offloaded_bytes"] = method.selections[-1]["offloaded_state_bytes"]
        res["selected"] = [len(s["selected"]) for s in method.selections]
        res["ever_selected"] = len({n for s in method.selections for n in s["selected"]})
        res["n_tensors"] = len(method.names)
    return res


def run_child(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


MB = 2 ** 20


def memory(a):
    from common import write_results
    settings = a.settings.split(",")
    rho = a.rho or (0.7 if a.quick else 0.5)  # 2 layers: the tied embedding dominates, ρ 0.5 cannot train it
    repeats = 1 if a.quick else a.repeats
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for r in range(repeats):  # interleaved: every setting once per round, each in a fresh process
        for s in settings:
            res = run_child({"setting": s, "quick": a.quick, "rho": rho, "selections": a.selections,
                             "steps": a.steps})
            runs[s].append(res)
            print(f"round {r + 1}/{repeats} {s}: {json.dumps(res)}", flush=True)
    med = lambda rs, f: statistics.median(f(x) for x in rs)  # noqa: E731
    rows = []
    for s in settings:
        rs = runs[s]
        train_peak = lambda x: max(v for k, v in x["peaks"].items() if k != "idle")  # noqa: E731
        row = {"setting": "full FT" if s == "full" else f"greentrainer ρ {rho} ({s})",
               "peak_MB": med(rs, lambda x: (train_peak(x) - x["base_rss"]) / MB),
               "steps_peak_MB": med(rs, lambda x: (max(x["peaks"].get("steps", 0), x["peaks"]["last_steps"])
                                                   - x["base_rss"]) / MB),
               "last_steps_peak_MB": med(rs, lambda x: (x["peaks"]["last_steps"] - x["base_rss"]) / MB),
               "select_peak_MB": med(rs, lambda x: (x["peaks"]["select"] - x["base_rss"]) / MB)
               if s != "full" else "",
               "after_MB": med(rs, lambda x: (x["after_rss"] - x["base_rss"]) / MB),
               "optimizer_state_MB": med(rs, lambda x: x["state_bytes"] / MB),
               "host_state_MB": med(rs, lambda x: x.get("offloaded_bytes", 0) / MB) if s == "cpu" else "",
               "state_tensors": rs[0]["state_tensors"],
               "selected/ever/all": f"{rs[0]['selected']}/{rs[0]['ever_selected']}/{rs[0]['n_tensors']}"
               if s != "full" else "all",
               "model_RSS_MB": med(rs, lambda x: x["base_rss"] / MB),
               "peak_runs_MB": [round((train_peak(x) - x["base_rss"]) / MB) for x in rs],
               "seconds_min": min(x["seconds"] for x in rs)}
        rows.append(row)
    ref = rows[0] if settings[0] == "full" else None
    if ref is not None:
        for row in rows:
            row["peak_vs_full"] = row["peak_MB"] / ref["peak_MB"]
            row["steps_peak_vs_full"] = row["steps_peak_MB"] / ref["steps_peak_MB"]
    model = "SmolLM2-135M (2 layers, random weights)" if a.quick else "SmolLM2-135M (real weights)"
    param_mb = runs[settings[0]][0]["param_bytes"] / MB
    notes = (f"{model}, fp32 ({param_mb:.0f} MB of weights), AdamW, batch {BATCH} × {SEQ} tokens, CPU. "
             f"Each run: {a.selections} × (selection, {a.steps} optimizer steps); full FT runs the same "
             f"{a.selections * a.steps} steps without selections; the budget assumes {NOMINAL_EPOCH} "
             f"steps per selection. Memory is resident-set size above the RSS after loading the model "
             f"(model_RSS_MB), sampled every 5 ms, in a fresh process per run with MALLOC_MMAP_THRESHOLD_=1 MiB; "
             f"median of {repeats} interleaved run(s) (peak_runs_MB: each run). peak_MB: over selections and steps; "
             f"steps_peak_MB: over the optimizer steps only; last_steps_peak_MB: the steps after the last "
             f"re-selection; select_peak_MB: over the selections (the importance probe); after_MB: after the last "
             f"step; optimizer_state_MB: the AdamW state tensors at the end (host_state_MB: state moved to host "
             f"memory by \"cpu\", the same memory on this CPU-only machine). selected/ever/all: tensors selected at "
             f"each selection / ever / in the model. keep: the state of every tensor ever trained stays (the former "
             f"behaviour); drop: only the selected tensors' state stays (the default). seconds_min: the fastest "
             f"run's wall time (a shared 2-core machine: others' jobs slow some runs).")
    if not a.quick:
        notes += validation_state_note()
    name = "memory" + ("_quick" if a.quick else "")
    write_results(name, f"Peak memory: GreenTrainer ρ {rho} (optimizer state of deselected tensors dropped / kept) "
                  f"vs full fine-tuning", rows,
                  ["setting", "peak_MB", "peak_vs_full", "steps_peak_MB", "steps_peak_vs_full", "last_steps_peak_MB",
                   "select_peak_MB", "after_MB", "optimizer_state_MB", "host_state_MB", "state_tensors",
                   "selected/ever/all", "model_RSS_MB", "seconds_min", "peak_runs_MB"],
                  notes, extra={"runs": runs})


def validation_state_note() -> str:
    """What drop and keep hold over the selections recorded by ``--validation`` (exact: AdamW keeps two fp32
    moments per element of each tensor that has state), when its results exist."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory_validation.json")
    if not os.path.exists(path):
        return ""
    from greentrainer.flops import meta_model_from_config
    from greentrainer.models import load_config
    sizes = {n: p.numel() * 8 for n, p in meta_model_from_config(load_config("smollm2-135m")).named_parameters()}
    sels = [set(s) for s in json.load(open(path))["runs"]["drop"]["selected"]]
    drop = [sum(sizes[n] for n in s) / MB for s in sels]
    keep = [sum(sizes[n] for n in set().union(*sels[: i + 1])) / MB for i in range(len(sels))]
    return (f" In the bench the selection hardly moves between its two selections (the tensors ever selected "
            f"are barely more than those selected now), so drop and keep differ little here. Over the 3 epochs of "
            f"`--validation` (memory_validation.md) it moved: selected {[len(s) for s in sels]}, AdamW state "
            f"during each epoch with drop {[round(x) for x in drop]} MB against keep {[round(x) for x in keep]} MB "
            f"(full FT: {sum(sizes.values()) / MB:.0f} MB), from its recorded selections.")


def validation(a):
    """Validation loss per epoch, "drop" against "cpu" (= the former behaviour), SmolLM2-135M on SciTLDR."""
    import torch
    from common import write_results
    from greentrainer.config import TrainConfig
    from greentrainer.methods.greentrainer import GreenTrainerConfig
    from greentrainer.data import encode_all, load_examples, resolve_dataset
    from greentrainer.loop import train
    from greentrainer.methods.greentrainer import GreenTrainerMethod
    from greentrainer.models import load_model
    rows, runs = [], {}
    for mode in a.modes.split(","):
        model, tok = load_model("smollm2-135m")
        cfg = TrainConfig(method="greentrainer", epochs=a.epochs, batch_size=4, lr=a.lr, seed=42,
                          method_config=GreenTrainerConfig(rho=a.rho or 0.6, step_policy="select"))
        spec, _ = resolve_dataset("scitldr")
        tr = encode_all(load_examples("scitldr", "train", a.max_train, 42), tok, spec.task, False, 512)
        va = encode_all(load_examples("scitldr", "validation", a.max_eval, 42), tok, spec.task, False, 512)
        method = GreenTrainerMethod(cfg.method_config, deselected_state=mode)
        t0 = time.perf_counter()
        out = train(model, tok, method, tr, va, cfg, torch.device("cpu"), log=print, progress=False)
        h = out["history"]
        sels = [set(s["selected"]) for s in method.selections]
        runs[mode] = {"history": [{k: v for k, v in e.items() if k != "selections"} for e in h],
                      "selected": [sorted(s) for s in sels]}
        rows.append({"deselected_state": mode, **{f"val_loss_e{e['epoch']}": e["val_loss"] for e in h},
                     **{f"train_loss_e{e['epoch']}": e["train_loss"] for e in h},
                     "selected": [len(s) for s in sels],
                     "reselected": [len((b - a_) & set().union(*sels[:i + 1])) for i, (a_, b) in
                                    enumerate(zip(sels, sels[1:]))],
                     "deselected": [len(a_ - b) for a_, b in zip(sels, sels[1:])],
                     "flops_fraction": out["totals"]["flops_fraction_of_full"],
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    load = open("/proc/loadavg").read().split()[:3]
    notes = (f"SmolLM2-135M (real weights, fp32) on SciTLDR: {a.max_train} train / {a.max_eval} validation items, "
             f"{a.epochs} epochs, batch 4, lr {a.lr:g} (linear decay), ρ {a.rho or 0.6}, a selection at each "
             f"epoch start, "
             f"seed 42. drop: a tensor's AdamW state leaves with its deselection, a re-selected tensor starts with "
             f"zero moments and step 0; cpu: its state is kept on the host and comes back (training identical to "
             f"keeping it in the optimizer, the former behaviour). reselected: tensors selected that had trained "
             f"before (at each re-selection); deselected: tensors leaving. Load average at the end: "
             f"{' '.join(load)} (2 cores, shared).")
    cols = ["deselected_state", *[f"val_loss_e{e + 1}" for e in range(a.epochs)],
            *[f"train_loss_e{e + 1}" for e in range(a.epochs)], "selected", "deselected", "reselected",
            "flops_fraction", "seconds"]
    write_results("memory_validation", "What a re-selected tensor starts from: dropped state vs state kept (cpu)",
                  rows, cols, notes, extra={"runs": runs})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--settings", default="full,drop,keep", help="any of full, drop, keep, cpu")
    ap.add_argument("--validation", action="store_true")
    ap.add_argument("--modes", default="drop,cpu")
    ap.add_argument("--max-train", type=int, default=32)
    ap.add_argument("--max-eval", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rho", type=float, default=None, help="memory: 0.5 (--quick: 0.7); --validation: 0.6")
    ap.add_argument("--selections", type=int, default=2, help="memory: selections per run")
    ap.add_argument("--steps", type=int, default=2, help="memory: optimizer steps after each selection")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
    elif a.validation:
        validation(a)
    else:
        memory(a)


if __name__ == "__main__":
    main()
