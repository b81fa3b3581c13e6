"""Mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE; tiny configs built offline): profiled, trained by every
method from the command line and through the Trainer callback, within ρ, with measured FLOPs. (The profile's
exactness for any routing: tests/test_flops.py.)"""
import json

import pytest
import torch

from conftest import _save_tiny, make_tiny, train_args
from greentrainer.cli import main


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tiny_moe_dir):
    return {"qwen3_moe": tiny_moe_dir, **{arch: _save_tiny(tmp_path_factory, arch) for arch in ("mixtral", "olmoe")}}


def test_profile_lists_the_router_and_the_experts(capsys, moe_dirs):
    assert main(["profile", "--model", moe_dirs["mixtral"], "--json"]) == 0
    names = {t["name"] for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj",
            "model.layers.1.mlp.experts.down_proj"} <= names


@pytest.mark.parametrize("arch,extra", [
    ("mixtral", ["--method", "greentrainer", "--rho", "0.7"]),
    ("olmoe", ["--method", "greentrainer", "--rho", "0.7", "--experts-implementation", "eager"]),
    ("qwen3_moe", ["--method", "greentrainer", "--rho", "0.7"]),
    ("qwen3_moe", ["--method", "greentrainer", "--over", "lora", "--rho", "0.7"]),
    ("qwen3_moe", ["--method", "greentrainer", "--over", "blocks", "--rho", "0.7"]),
    ("qwen3_moe", ["--method", "smt", "--smt-warmup", "2", "--smt-block", "16"]),
])
def test_every_method_trains_a_moe_model_from_the_cli(tmp_path, moe_dirs, jsonl, small_rows, arch, extra):
    out = tmp_path / "run"
    assert main(train_args(moe_dirs[arch], jsonl(small_rows), out, "--epochs", "2", "--no-eval", *extra)) == 0
    t = json.loads((out / "metrics.json").read_text())["totals"]
    assert t["flops_backward"] > 0
    if "greentrainer" in extra:
        assert t["within_budget"] and t["flops_fraction_of_full"] <= 0.7 + 1e-9


def test_the_callback_keeps_rho_on_a_moe_model(tmp_path):
    from test_training import tiny_trainer
    from greentrainer.callback import GreenTrainerCallback
    model = make_tiny("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = GreenTrainerCallback(rho=0.7, full_warmup_steps=0, log=lambda *a: None)
    tiny_trainer(model, tmp_path, 16, [cb], num_train_epochs=2).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set().union(*(s["selected"] for s in cb.selections))
    f = cb.flops
    assert f["steps"] + f["probes"] <= 0.7 * f["full_ft_reference"] * (1 + 1e-9)
