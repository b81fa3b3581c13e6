"""Memory per process with sharded training (--fsdp): 1 process against 2 (torchrun, gloo), full fine-tuning and
GreenTrainer ρ 0.5, on the default model (SmolLM2-135M, real weights, fp32).

Each setting is one CLI run in its own launch: the same global batches (1 process: --batch-size 2 --grad-accum 2;
2 processes: --batch-size 2 each), SciTLDR items cut at 256 tokens, --max-steps 4, GreenTrainer with no full
fine-tuning warm-up (so its selection governs every step), the deselected tensors' optimizer state dropped (the
default). Reported per process (the mean of the processes): the bytes held in weights and optimizer state at the
run's end (this process's slices under FSDP; exact, from the tensors) and the peak resident-set size during
training (sampled every 20 ms; MALLOC_MMAP_THRESHOLD_ at 1 MiB so freed tensors leave it at once; it includes
torch itself and the activations). One result file per run (results/fsdp_memory/<setting>.json); a rerun skips
finished settings. Memory does not depend on timing, so this may run beside other jobs.

python bench/fsdp_memory.py [--quick]   (--quick: a tiny random model, for the test suite)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_results  # noqa: E402

SETTINGS = [("full", 1), ("full", 2), ("greentrainer", 1), ("greentrainer", 2)]


def command(method: str, procs: int, out: Path, model: str, dataset: str, quick: bool) -> list[str]:
    launch = [sys.executable, "-m", "greentrainer"] if procs == 1 else [
        str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(procs), "--master_port",
        str(32500 + os.getpid() % 1000), "-m", "greentrainer"]
    args = ["train", "--model", model, "--dataset", dataset, "--output-dir", str(out), "--method", method,
            "--max-steps", "4", "--epochs", "1", "--batch-size", "2", "--grad-accum", str(2 // procs),
            "--max-train", "16" if quick else "64", "--max-eval", "4", "--max-input-length", "256",
            "--no-eval", "--no-energy", "--no-progress", "--fsdp"]
    if method == "greentrainer":
        args += ["--rho", "0.5", "--full-warmup-steps", "0"]
    return launch + args


def run_setting(method: str, procs: int, model: str, dataset: str, quick: bool, folder: Path) -> dict:
    out = Path(tempfile.mkdtemp()) / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(2**20))
    proc = subprocess.run(command(method, procs, out, model, dataset, quick), env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{method} on {procs} process(es) failed: {proc.stderr.strip().splitlines()[-1:]}")
    m = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    t = m["totals"]
    row = {"method": "full FT" if method == "full" else "GreenTrainer ρ 0.5", "processes": procs,
           "weights + optimizer MiB": t["weights_and_optimizer_bytes"] / 2**20,
           "peak RSS MiB": t["peak_memory_bytes"] / 2**20, "trainable params (end)": t["trainable_params"],
           "FLOPs fraction": t["flops_fraction_of_full"], "steps": t["steps"]}
    (folder / f"{method}-{procs}proc.json").write_text(json.dumps(row, indent=1))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random model (the test suite's smoke run)")
    a = ap.parse_args()
    model, dataset = "smollm2-135m", "scitldr"
    if a.quick:
        sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
        from conftest import make_tiny
        from greentrainer.models import tiny_tokenizer
        model = tempfile.mkdtemp()
        make_tiny("llama").save_pretrained(model)
        tiny_tokenizer().save_pretrained(model)
    name = "fsdp_memory_quick" if a.quick else "fsdp_memory"
    folder = RESULTS / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, procs in SETTINGS:
        done = folder / f"{method}-{procs}proc.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        print(f"{method} on {procs} process(es) ...", flush=True)
        rows.append(run_setting(method, procs, model, dataset, a.quick, folder))
    for r in rows:  # each against the same method on one process
        one = next(x for x in rows if x["method"] == r["method"] and x["processes"] == 1)
        r["weights + optimizer vs 1 process"] = r["weights + optimizer MiB"] / one["weights + optimizer MiB"]
        r["peak RSS vs 1 process"] = r["peak RSS MiB"] / one["peak RSS MiB"]
    write_results(name, "Memory per process with --fsdp: 1 vs 2 processes", rows,
                  ["method", "processes", "weights + optimizer MiB", "weights + optimizer vs 1 process",
                   "peak RSS MiB", "peak RSS vs 1 process", "trainable params (end)", "FLOPs fraction", "steps"],
                  notes="SmolLM2-135M (fp32), the same global batches (4 items × ≤256 tokens) on 1 process "
                        "(2 micro-batches) and on 2 (one each), 4 steps; GreenTrainer ρ 0.5 without warm-up. "
                        "Per process (mean of the processes): weights + optimizer state held at the end (exact, "
                        "this process's slices) and the peak resident set during training (torch itself, "
                        "activations and FSDP's gathered layer included). 2 gloo CPU processes on one 2-core "
                        "machine; reproduce: `python bench/fsdp_memory.py`." if not a.quick else "tiny model")


if __name__ == "__main__":
    main()
