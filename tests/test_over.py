"""GreenTrainer's budgeted selection over other candidates than the model's tensors: LoRA adapters."""
import json

import pytest
import torch

from conftest import make_tiny, train_args
from greentrainer.cli import main
from greentrainer.config import TrainConfig
from greentrainer.loop import train
from greentrainer.methods import build_method
from greentrainer.methods.greentrainer import GreenTrainerConfig, GreenTrainerMethod
from test_training import TOK, encoded


def run_gt(gradient_checkpointing=False, **gt):
    """Train GreenTrainer (3 epochs, a selection every 4 steps, no warm-up) on a tiny LLaMA; returns the result,
    the method, and every tensor as it was when training started (after the method wrapped the model)."""
    model = make_tiny("llama")
    gt = {"rho": 0.75, "full_warmup_steps": 0, "select_every": 4, **gt}
    cfg = TrainConfig(method="greentrainer", epochs=3, batch_size=4, lr=1e-2, seed=0,
                      gradient_checkpointing=gradient_checkpointing, method_config=GreenTrainerConfig(**gt))
    cfg.validate()
    method = build_method(cfg)
    start = {}
    prepare = method.prepare

    def remember(model, ctx):  # e.g. the adapters as peft initialised them
        wrapped = prepare(model, ctx)
        start.update({n: p.detach().clone() for n, p in wrapped.named_parameters()})
        return wrapped
    method.prepare = remember
    data = encoded(model, 32)
    out = train(model, TOK, method, data, data[:4], cfg, torch.device("cpu"), log=lambda *a: None,
                progress=False, energy_meter=None)
    return out, method, start


def run_over_lora():
    out, method, start = run_gt(over="lora", lora_targets="q_proj,v_proj,o_proj")
    return out, method, {n: p for n, p in start.items() if ".lora_" in n}


def test_over_lora_selects_adapters_within_rho_and_unselected_adapters_keep_their_initial_value():
    out, method, start = run_over_lora()
    t = out["totals"]
    assert t["flops_total"] <= 0.75 * t["flops_full_ft_reference"]  # ρ of full fine-tuning of the base model
    assert method.names == sorted(start, key=method.names.index) and len(method.names) == len(start) == 12
    sels = [s for s in method.selections if s["kind"] == "probe"]
    assert len(sels) >= 3 and all(set(s["selected"]) <= set(start) for s in sels)
    ever = {n for s in method.selections for n in s["selected"]}
    assert ever and ever != set(start)  # a real choice: some adapters never trained
    now = dict(out["model"].named_parameters())
    for n, before in start.items():
        if n not in ever:
            assert torch.equal(now[n], before), n
    assert any(not torch.equal(now[n], start[n]) for n in ever)
    base = [n for n, p in out["model"].named_parameters() if ".lora_" not in n]
    assert base and not any(out["model"].get_parameter(n).requires_grad for n in base)


def test_over_lora_profile_charges_the_base_chain_below_the_adapters():
    model = make_tiny("llama")
    method = GreenTrainerMethod(GreenTrainerConfig(over="lora", lora_targets="q_proj,v_proj"))
    from greentrainer.engine.reference import run_profile
    base = run_profile(model.config, (4, 32, None), False)
    prof = method.controller.candidates.profile(model, base)
    assert prof.t_full == base.t_full  # ρ stays a fraction of full fine-tuning of the base model
    assert all(".lora_" in n for n in prof.names)
    assert prof.names[0].startswith("base_model.model.model.layers.1.")  # the last layer is reached first
    deepest = prof.predict([prof.names[-1]])  # the first layer's adapter: the backward runs through every layer
    shallow = prof.predict([prof.names[0]])
    assert deepest > shallow > prof.t_fp
    assert prof.predict(prof.names) < base.t_full  # every adapter: LoRA's cost, below full fine-tuning


def test_over_lora_cli_saves_a_peft_adapter_that_eval_loads(capsys, tmp_path, tiny_model_dir, jsonl):
    data = jsonl([{"source": f"the cat number {i} sat on the mat and looked at the dog", "target": f"cat {i}"}
                  for i in range(48)], "d.jsonl")
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--method", "greentrainer", "--over", "lora", "--rho", "0.7",
                           "--select-every", "4", "--lora-r", "4", "--no-energy")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["totals"]["flops_fraction_of_full"] <= 0.7
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and (out / "model" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--dataset", data, "--num-beams", "1", "--max-new-tokens", "4"]) == 0


def test_over_lora_bad_options_are_one_line(capsys, tmp_path, tiny_model_dir, data):
    from test_cli import err
    out = tmp_path / "run"
    gt = ("--method", "greentrainer", "--over", "lora")
    assert "not found" in err(capsys, train_args(tiny_model_dir, data, out, *gt, "--lora-targets", "nope"))
    assert "--lora-r" in err(capsys, train_args(tiny_model_dir, data, out, *gt, "--lora-r", "0"))
    assert "invalid choice" in err(capsys, train_args(tiny_model_dir, data, out, "--method", "greentrainer",
                                                      "--over", "everything"))
    assert not out.exists()


def test_lora_options_are_shared_not_duplicated():
    """--lora-r is one option that LoRA, DoRA and GreenTrainer --over lora read alike."""
    from greentrainer.config import config_from_options
    for method in ("lora", "dora", "greentrainer"):
        assert config_from_options({"method": method, "lora_r": 4}).method_config.lora_r == 4
    with pytest.raises(SystemExit):
        main(["train", "--help"])


# ---------------------------------------------------------------- over blocks

def brute_force(t_dy, positions, costs, importance, budget):
    import itertools
    chain = list(itertools.accumulate(t_dy))
    best = 0.0
    for r in range(1, len(costs) + 1):
        for s in itertools.combinations(range(len(costs)), r):
            cost = sum(costs[m] for m in s) + chain[max(positions[m] for m in s)]
            value = sum(importance[m] for m in s)
            if cost <= budget and value > best:
                best = value
    return best


@pytest.mark.parametrize("seed", range(25))
def test_block_selector_is_exact_against_brute_force(seed):
    import numpy as np
    from greentrainer.block_selection import select_members
    rng = np.random.default_rng(seed)
    n_pos = 5
    t_dy = rng.integers(1, 40, n_pos).tolist()
    positions, costs = [], []
    block = int(rng.integers(0, 8))  # 0: blocks whose share rounds to nothing
    for p in range(n_pos):  # blocks of one cost (several per tensor) and small tensors of other costs
        for _ in range(rng.integers(0, 3)):
            positions.append(p)
            costs.append(block)
        if rng.random() < 0.5:
            positions.append(p)
            costs.append(int(rng.integers(0, 12)))  # 0: a tensor whose weight gradient is free
    importance = rng.normal(0.5, 1.0, len(costs)).tolist()
    budget = int(rng.integers(5, 120))
    sel = select_members(t_dy, positions, costs, importance, budget)
    assert sel.value == pytest.approx(brute_force(t_dy, positions, costs, importance, budget))
    if sel.members:
        chain = np.cumsum(t_dy)
        assert sel.cost == sum(costs[m] for m in sel.members) + chain[max(positions[m] for m in sel.members)]
        assert sel.cost <= budget
        assert sel.value == pytest.approx(sum(importance[m] for m in sel.members))


def test_over_blocks_stays_within_rho_and_trains_only_selected_blocks():
    out, method, before = run_gt(over="blocks", block_size=16, targets="q,k,v")
    t = out["totals"]
    assert t["flops_total"] <= 0.75 * t["flops_full_ft_reference"]
    sels = [s for s in method.selections if "blocks" in s]
    assert len(sels) >= 3 and all(s["n_blocks"] + len(s["whole"]) > 0 for s in sels)
    l = sels[0]["block_size"]
    assert l == 16 and sels[0]["n_candidates"] > 20
    model = method.finalize(out["model"])  # plain linear layers again, the blocks merged in
    from greentrainer.smt_layer import SMTLinear
    assert not any(isinstance(m, SMTLinear) for m in model.modules())
    now = dict(model.named_parameters())
    assert set(now) == set(before)
    ever_blocks: dict = {}
    ever_whole = set()
    for s in sels:
        for name, bl in s["blocks"].items():
            ever_blocks.setdefault(f"{name}.weight", set()).update(map(tuple, bl))
        ever_whole.update(s["whole"])
    changed = 0
    for n, w0 in before.items():
        w = now[n]
        if n in ever_blocks:  # only the selected blocks of a target moved
            mask = torch.zeros_like(w, dtype=torch.bool)
            for r, c in ever_blocks[n]:
                mask[r * l:(r + 1) * l, c * l:(c + 1) * l] = True
            assert torch.equal(w[~mask], w0[~mask]), n
            changed += int(not torch.equal(w[mask], w0[mask]))
        elif n not in ever_whole:
            assert torch.equal(w, w0), n
    assert changed > 0


def test_over_blocks_cli_saves_a_plain_checkpoint(capsys, tmp_path, tiny_model_dir, jsonl):
    data = jsonl([{"source": f"the cat number {i} sat on the mat and looked at the dog", "target": f"cat {i}"}
                  for i in range(48)], "d.jsonl")
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--method", "greentrainer", "--over", "blocks", "--rho", "0.75",
                           "--select-every", "4", "--smt-block", "16", "--full-warmup-steps", "0",
                           "--no-energy")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["totals"]["flops_fraction_of_full"] <= 0.75
    from safetensors.torch import load_file
    keys = set(load_file(out / "model" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any(".blocks" in k or ".linear." in k for k in keys)
    sel = json.loads((out / "selections.json").read_text())["selections"]
    assert any(s.get("n_blocks") for s in sel)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_callback_on_a_lora_model_selects_over_its_adapters(tmp_path, checkpointing):
    """A peft LoRA model handed to the Trainer: the callback selects among its adapters within ρ (also with the
    Trainer's gradient checkpointing, whose recompute the budget charges)."""
    from peft import LoraConfig, get_peft_model
    from greentrainer.callback import GreenTrainerCallback
    from test_training import tiny_trainer
    model = get_peft_model(make_tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                           "o_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = GreenTrainerCallback(rho=0.75, select_every=4, log=lambda *a: None)
    tiny_trainer(model, tmp_path, 32, [cb], num_train_epochs=3, learning_rate=1e-2,
                 gradient_checkpointing=checkpointing).train()
    assert cb.selections and all(all(".lora_" in n for n in s["selected"]) for s in cb.selections)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set().union(*(s["selected"] for s in cb.selections))
    assert cb.flops["steps"] + cb.flops["probes"] <= 0.75 * cb.flops["full_ft_reference"]


@pytest.mark.parametrize("layers", [None, [0]])
def test_over_lora_profile_predicts_the_measured_step_with_activation_checkpointing(layers):
    """Under activation checkpointing a block is recomputed when the backward reaches it: the LoRA profile
    charges that (adapters included) to the first adapter at or below it, also for blocks without adapters
    (``layers``: adapters on the first layer only)."""
    import random
    from peft import LoraConfig, get_peft_model
    from greentrainer.engine.memory import enable_checkpointing
    from greentrainer.methods.greentrainer import lora_profile
    from test_checkpointing import measured
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=layers)
    model = get_peft_model(make_tiny("llama"), config)
    model.train()
    enable_checkpointing(model)
    batch = {"input_ids": torch.randint(0, 250, (2, 32))}
    batch["labels"] = batch["input_ids"].clone()
    base = model.get_base_model().config
    prof = lora_profile(base, config, (2, 32, None), 1, gradient_checkpointing=True)
    plain = lora_profile(base, config, (2, 32, None), 1)
    rng = random.Random(0)
    names = prof.names
    assert names and all(".lora_" in n for n in names)
    for sel in [[names[0]], [names[-1]], names] + [rng.sample(names, rng.randint(1, len(names))) for _ in range(8)]:
        fwd, bwd = measured(model, batch, set(sel))
        assert fwd + bwd == prof.predict(sel), sel
        assert prof.predict(sel) > plain.predict(sel)  # at least the adapters' own block is recomputed


@pytest.mark.parametrize("over", ["lora", "blocks"])
def test_over_lora_and_blocks_stay_within_rho_with_activation_checkpointing(over):
    extra = {"lora_targets": "q_proj,v_proj,o_proj"} if over == "lora" else {"block_size": 16, "targets": "q,k,v"}
    out, method, before = run_gt(gradient_checkpointing=True, over=over, **extra)
    t = out["totals"]
    assert 0 < t["flops_total"] <= 0.75 * t["flops_full_ft_reference"]
    sels = [s for s in method.selections if s["kind"] == "probe"]
    assert len(sels) >= 3
    now = dict(out["model"].named_parameters())
    assert any(not torch.equal(now[n], before[n]) for n in now if n in before)  # it trained


def test_a_probe_over_several_batches_is_paid_within_rho():
    """--probe-batches K: the probe averages K training batches' gradients (less noisy importance); its K-fold
    FLOPs are paid within ρ like a single batch's."""
    overheads = {}
    for k in (1, 3):
        out, method, _ = run_gt(probe_batches=k, select_every=8)
        t = out["totals"]
        assert t["flops_total"] <= 0.75 * t["flops_full_ft_reference"]
        sels = [s for s in method.selections if s["kind"] == "probe"]
        assert sels and all(s["probe_batches"] == k for s in sels)
        overheads[k] = t["flops_overhead"]
    assert overheads[3] > 1.5 * overheads[1]
