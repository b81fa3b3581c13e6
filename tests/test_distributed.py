"""Several processes (2, gloo) and gradient accumulation: one consistent trainable set, the same training
as one process on the same global batches."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny

DRIVER = Path(__file__).parent / "dist_driver.py"
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                                reason="torchrun not installed")


def run(tmp_path, name, method, batch, accum=1, procs=1, epochs=2, uniform=False):
    out = tmp_path / name
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    if procs == 1:
        cmd = [sys.executable, str(DRIVER)]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(procs), "--master_port",
               str(29500 + os.getpid() % 1000), str(DRIVER)]
    args = [str(out), method, str(batch), str(accum), str(epochs)] + (["uniform"] if uniform else [])
    proc = subprocess.run(cmd + args, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(procs)]


def distance(a, b):
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


@pytest.fixture(scope="module")
def initial():
    return {k: v.detach().clone() for k, v in make_tiny("llama").state_dict().items()}


@pytest.mark.parametrize("method", ["full", "greentrainer", "greentrainer-warmup", "greentrainer-blocks"])
def test_two_processes_agree_and_match_one_process(tmp_path, initial, method):
    r0, r1 = run(tmp_path, "two", method, batch=2, procs=2)
    # (a) both processes end with the same weights and the same selections
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert r0["selections"] == r1["selections"]
    assert r0["totals"]["world_size"] == 2 and r0["totals"]["effective_batch_size"] == 4
    if method.startswith("greentrainer"):
        ever = {n for s in r0["selections"] for n in s}
        never = [k for k in initial if k not in ever and k in r0["state"]]
        if method != "greentrainer-warmup":  # (the warm-up trains every tensor)
            assert never and all(torch.equal(r0["state"][k], initial[k]) for k in never)
        assert r0["totals"]["flops_total"] <= 0.75 * r0["totals"]["flops_full_ft_reference"]
    # (b) the same global batches in one process: the same training, up to rounding
    (one,) = run(tmp_path, "one", method, batch=4)
    moved = distance(one["state"], initial)
    assert moved > 0
    assert distance(r0["state"], one["state"]) <= 0.01 * moved
    if method.startswith("greentrainer"):
        assert r0["selections"] == one["selections"]
    assert r0["totals"]["flops_full_ft_reference"] == pytest.approx(one["totals"]["flops_full_ft_reference"], rel=0.1)


@pytest.mark.parametrize("method", ["full", "greentrainer"])
def test_gradient_accumulation_matches_the_larger_batch(tmp_path, initial, method):
    (acc,) = run(tmp_path, "accum", method, batch=2, accum=2, uniform=True)
    (one,) = run(tmp_path, "one", method, batch=4, uniform=True)
    assert acc["totals"]["grad_accum"] == 2 and acc["totals"]["effective_batch_size"] == 4
    assert distance(acc["state"], one["state"]) <= 0.01 * distance(one["state"], initial)
    if method == "greentrainer":
        assert acc["selections"] == one["selections"]
        assert acc["totals"]["flops_total"] <= 0.75 * acc["totals"]["flops_full_ft_reference"]


def test_torchrun_cli_writes_one_complete_run_folder(tmp_path, tiny_model_dir, jsonl, small_rows):
    data = jsonl(small_rows)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
           str(30500 + os.getpid() % 1000), "-m", "greentrainer", "train", "--model", tiny_model_dir,
           "--dataset", data, "--output-dir", str(out), "--epochs", "1", "--batch-size", "2", "--no-progress",
           "--num-beams", "1", "--max-new-tokens", "2", "--method", "greentrainer", "--rho", "0.8",
           "--carbon-intensity", "100"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["world_size"] == 2 and m["effective_batch_size"] == 4
    assert m["totals"]["flops_total"] <= 0.8 * m["totals"]["flops_full_ft_reference"]
    t = m["totals"]  # each process meters itself; the sums are over both
    assert t["energy_kwh"] > 0 and t["co2_g"] == pytest.approx(100 * t["energy_kwh"])
    assert proc.stdout.count("epoch 1:") == 1  # one process logs



@pytest.mark.parametrize("accum,warmup", [(1, "default"), (2, "0")])
def test_trainer_callback_on_two_processes_trains_one_model(tmp_path, accum, warmup):
    """A user's own Trainer script with GreenTrainerCallback under torchrun: DDP's reducer cannot follow a
    changing trainable set, so the callback averages exactly the trainable gradients itself. The two processes
    see different batches and must still end with the same weights, the same selections, and nothing trained
    outside them (without that sync the processes' weights differ); with the full fine-tuning warm-up (every
    tensor's gradient averaged) too."""
    import json
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
           str(28500 + os.getpid() % 1000 + accum), str(Path(__file__).parent / "trainer_ddp_driver.py"), str(tmp_path),
           str(accum), warmup]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a["steps"] == 16 // accum
    assert a["kinds"] == (["warm-up", "probe", "probe"] if warmup == "default" else ["probe", "probe"])
    assert a["digest"] == b["digest"] and a["selections"] == b["selections"]
    assert a["changed"] == sorted(set().union(*map(set, a["selections"])))
    assert 0 < a["flops"]["steps"] + a["flops"]["probes"] <= 0.7 * a["flops"]["full_ft_reference"]
    # the report sums both processes: FLOPs and energy (each process meters its own use)
    assert a["report"] == b["report"]
    assert a["report"]["flops"] == sum(r["flops"]["steps"] + r["flops"]["probes"] for r in (a, b))
    assert a["report"]["energy_kwh"] > 0
