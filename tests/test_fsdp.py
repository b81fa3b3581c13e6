"""Sharded training (--fsdp, torch's FSDP2) on 2 gloo processes: the same global batches give the weights of one
unsharded process, every process takes the same selections, tensors never selected keep their initial values
bit for bit, optimizer state exists only for trained tensors and only as this process's slices, and a run
killed with -9 resumes bit-exact (and on another number of processes)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny, one_line, wait_for_checkpoint
from greentrainer.cli import main

TORCHRUN = Path(sys.executable).parent / "torchrun"
DRIVER = Path(__file__).parent / "dist_driver.py"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")


def port() -> str:
    return str(31500 + os.getpid() % 1000)


def driver(tmp_path, name, method, batch, procs=1, fsdp=False, epochs=2):
    out = tmp_path / name
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    cmd = [sys.executable] if procs == 1 else [str(TORCHRUN), "--nproc_per_node", str(procs), "--master_port", port()]
    proc = subprocess.run(cmd + [str(DRIVER), str(out), method, str(batch), "1", str(epochs), "uniform"]
                          + (["fsdp"] if fsdp else []), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(procs)]


def initial_of(key, value, initial):
    """A tensor's value before training (peft's names too: a LoRA B starts at 0; None: unknown, a LoRA A)."""
    if "lora_B" in key:
        return torch.zeros_like(value)
    return initial.get(key.removeprefix("base_model.model.").replace(".base_layer", ""))


def distance(a, b):
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


@pytest.mark.parametrize("method", ["full", "greentrainer", "smt"] + [pytest.param(m, marks=pytest.mark.slow) for m in
                                    ("greentrainer-lora", "greentrainer-blocks", "lora", "top2", "prefix")])
def test_sharded_two_processes_match_one_unsharded_process(tmp_path, method):
    initial = {k: v.detach().clone() for k, v in make_tiny("llama").state_dict().items()}
    r0, r1 = driver(tmp_path, "sharded", method, batch=2, procs=2, fsdp=True)
    (one,) = driver(tmp_path, "one", method, batch=4)
    # the same global batches: the same training up to rounding (FSDP sums the gradients in another order)
    assert set(r0["state"]) == set(one["state"])
    start = {k: initial_of(k, v, initial) for k, v in one["state"].items()}
    start = {k: v for k, v in start.items() if v is not None}
    moved = distance({k: one["state"][k] for k in start}, start)
    if method == "prefix":  # only its prefix trains (start unknown here): relative to its size
        unknown = {k: v for k, v in one["state"].items() if k not in start}
        moved = 1e-2 * distance(unknown, {k: torch.zeros_like(v) for k, v in unknown.items()})
    assert moved > 0 and distance(r0["state"], one["state"]) <= 1e-3 * moved
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # one model
    assert r0["selections"] == r1["selections"] == one["selections"]
    t = r0["totals"]
    assert t["world_size"] == 2 and t["effective_batch_size"] == 4
    assert t["flops_full_ft_reference"] == one["totals"]["flops_full_ft_reference"]  # (24 items: no stand-ins)
    # optimizer state: only for tensors that trained, each process holding its slice of each (l×l blocks,
    # installed after sharding and a few % of the weights, are whole on every process, their gradients summed)
    assert r0["optimizer_state"]
    for name, states in r0["optimizer_state"].items():
        if name.startswith("(blocks"):
            assert method in ("smt", "greentrainer-blocks")
            continue
        for key, mine, whole in states:
            assert 0 < mine < whole or whole < 2, (name, key)
    if method.startswith("greentrainer"):
        ever = {n for s in r0["selections"] for n in s}
        assert {n for n in r0["optimizer_state"] if not n.startswith("(blocks")} <= ever
        never = [k for k in r0["state"] if k not in ever and initial_of(k, r0["state"][k], initial) is not None]
        assert never and all(torch.equal(r0["state"][k], initial_of(k, r0["state"][k], initial)) for k in never)
        assert t["flops_total"] <= 0.75 * t["flops_full_ft_reference"] and t["within_budget"]


def cli(model, data, out, method="greentrainer"):
    extra = ["--rho", "0.8"] if method == "greentrainer" else ["--smt-warmup", "4", "--smt-block", "16"]
    return ["train", "--model", model, "--dataset", data, "--output-dir", str(out), "--epochs", "12",
            "--save-every", "3", "--no-progress", "--no-eval", "--no-energy", "--lr", "1e-3", "--method", method,
            "--batch-size", "2", "--fsdp", *extra]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def torchrun(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", port(), "-m", "greentrainer",
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


@pytest.mark.parametrize("method", ["greentrainer", pytest.param("smt", marks=pytest.mark.slow)])  # smt: a checkpoint
# in its warm-up, one after it
def test_sharded_cli_kill_9_then_resume_bit_exact_also_on_one_process(tmp_path, tiny_model_dir, jsonl, method):
    rows = [{"source": f"the cat number {i} sat on the mat and looked at the dog", "target": f"cat {i} sat"}
            for i in range(24)]  # 20 training items: 5 whole global batches of 4 (no stand-in pass)
    data = jsonl(rows)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = torchrun(cli(tiny_model_dir, data, straight, method))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    a = json.loads((straight / "metrics.json").read_text())
    assert a["status"] == "complete" and a["world_size"] == 2 and a["totals"].get("within_budget", True)
    # the merged model is an ordinary safetensors folder
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(straight / "model")
    assert sorted(p.name for p in (straight / "model").glob("*.safetensors")) == ["model.safetensors"]
    assert sum(p.numel() for p in merged.parameters()) == a["totals"]["total_params"]

    proc = torchrun(cli(tiny_model_dir, data, killed, method))
    wait_for_checkpoint(killed, proc, step=9)  # a mid-epoch checkpoint at step 9 or later
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both workers (their own process groups)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (killed / "checkpoint" / "shards").is_dir()  # torch.distributed.checkpoint's folder
    elsewhere = tmp_path / "one-process"
    shutil.copytree(killed, elsewhere)

    proc = torchrun(["train", "--resume", str(killed), "--no-progress"])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    b = json.loads((killed / "metrics.json").read_text())
    assert b["status"] == "complete" and b["resumed_from_step"] >= 9
    assert (straight / "model" / "model.safetensors").read_bytes() == (killed / "model" / "model.safetensors").read_bytes()
    for k in ("flops_total", "flops_forward", "flops_backward", "flops_overhead", "flops_full_ft_reference"):
        assert a["totals"][k] == b["totals"][k], k
    chosen = (lambda d: [s["selected"] for s in json.loads((d / "selections.json").read_text())["selections"]]) \
        if method == "greentrainer" else (lambda d: json.loads((d / "metrics.json").read_text())["history"][0]["smt"])
    assert chosen(straight) == chosen(killed)

    # the same checkpoint on one process: --grad-accum 2 keeps the global batch; the same run up to rounding
    assert main(["train", "--resume", str(elsewhere), "--no-progress"]) == 0
    c = json.loads((elsewhere / "metrics.json").read_text())
    assert c["status"] == "complete" and c["world_size"] == 1 and c["effective_batch_size"] == 4
    from safetensors.torch import load_file
    wa, wc = (load_file(d / "model" / "model.safetensors") for d in (straight, elsewhere))
    start = {k: v for k, v in load_file(Path(tiny_model_dir) / "model.safetensors").items() if k in wa}
    assert distance(wa, wc) <= 0.01 * distance(wa, start)
    assert chosen(straight) == chosen(elsewhere)
    assert c["totals"]["flops_full_ft_reference"] == a["totals"]["flops_full_ft_reference"]


@pytest.mark.parametrize("extra,needle", [(["--precision", "16-mixed"], "--fsdp does not work with --precision"),
                                          (["--deselected-state", "cpu"], "--fsdp does not work with --deselected")])
def test_what_fsdp_cannot_do_is_refused_in_one_line(capsys, tmp_path, tiny_model_dir, data, extra, needle):
    out = tmp_path / "run"
    line = one_line(capsys, ["train", "--model", tiny_model_dir, "--dataset", data, "--output-dir", str(out),
                             "--fsdp", *extra])
    assert needle in line and not out.exists()


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_accelerate_deepspeed_and_fsdp_configs_are_refused_pointing_to_fsdp(capsys, monkeypatch, tmp_path,
                                                                            tiny_model_dir, data, flag):
    monkeypatch.setenv(flag, "true")  # what `accelerate launch` sets for such a config
    out = tmp_path / "run"
    line = one_line(capsys, ["train", "--model", tiny_model_dir, "--dataset", data, "--output-dir", str(out),
                             "--no-eval"])
    assert "pass --fsdp" in line and not out.exists()


def test_a_trainer_under_fsdp_is_refused_by_the_callback_in_one_line():
    """The callback on several processes takes over DDP's gradient sync; a Trainer that wrapped the model in
    FSDP (or DeepSpeed) did so before any selection exists: refused, pointing to `greentrainer train --fsdp`."""
    from types import SimpleNamespace
    from greentrainer.callback import GreenTrainerCallback
    from greentrainer.errors import UsageError
    cb = GreenTrainerCallback(rho=0.5, energy=False)
    model = make_tiny("llama")
    cb._trainer = SimpleNamespace(model_wrapped=torch.nn.Sequential(model))  # not DDP: what FSDP leaves there
    with pytest.raises(UsageError, match="greentrainer train --fsdp") as e:
        cb._take_over_gradient_sync(model)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_mixture_of_experts_model_trains_sharded_within_rho(tmp_path, tiny_moe_dir, data):
    """Qwen3-MoE (experts fused per layer, sharded with their decoder layer): GreenTrainer within ρ, one merged
    model."""
    out = tmp_path / "run"
    proc = torchrun(["train", "--model", tiny_moe_dir, "--dataset", data, "--output-dir", str(out), "--epochs", "2",
                     "--batch-size", "2", "--no-progress", "--no-eval", "--no-energy", "--rho", "0.8", "--fsdp"])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["world_size"] == 2 and m["totals"]["within_budget"]
    assert m["totals"]["flops_total"] <= 0.8 * m["totals"]["flops_full_ft_reference"]
    from transformers import AutoModelForCausalLM
    assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out / "model").parameters()) == \
        m["totals"]["total_params"]


def test_resuming_on_another_number_of_processes_keeps_the_global_batch_or_refuses():
    from greentrainer.config import TrainConfig
    from greentrainer.errors import UsageError
    from greentrainer.run import _match_processes
    said = []
    cfg = TrainConfig(method="full", batch_size=2, grad_accum=1)
    _match_processes(cfg, {"world_size": 2, "grad_accum": 1}, 1, said.append)  # 2 × 1 micro-batches → 1 × 2
    assert cfg.grad_accum == 2 and "global batch of 4 items" in said[0]
    cfg = TrainConfig(method="full", batch_size=2, grad_accum=3)
    _match_processes(cfg, {"world_size": 1, "grad_accum": 3}, 3, said.append)
    assert cfg.grad_accum == 1
    with pytest.raises(UsageError, match="divides 2") as e:
        _match_processes(TrainConfig(method="full"), {"world_size": 2, "grad_accum": 1}, 3, said.append)
    assert "\n" not in str(e.value)


def test_bf16_weights_train_sharded_and_the_probe_steps_a_float32_stand_in(tmp_path, tiny_model_dir, data):
    """--precision bf16-true: a sharded tensor's .data cannot change dtype, so the probe steps a float32 stand-in
    (its Δw would round to 0 in bf16); the run completes within ρ and its optimizer state stays bf16."""
    out = tmp_path / "run"
    proc = torchrun(["train", "--model", tiny_model_dir, "--dataset", data, "--output-dir", str(out), "--epochs", "2",
                     "--batch-size", "2", "--no-progress", "--no-eval", "--no-energy", "--rho", "0.8", "--fsdp",
                     "--precision", "bf16-true", "--full-warmup-steps", "0"])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["totals"]["within_budget"] and m["totals"]["precision"] == "bf16-true"
    sels = json.loads((out / "selections.json").read_text())["selections"]
    assert len(sels) == 2 and all(0 < s["n_selected"] < len(sels[0]["importance"]) for s in sels)
    assert all(any(x != 0 for x in s["importance"]) for s in sels)  # Δw did not round to 0
