"""--gradient-checkpointing: the backward still stops at the deepest selected tensor, the recompute is
counted, and the profile (with each block's recompute) predicts the measured step exactly."""
import random

import pytest
import torch

from conftest import make_tiny
from greentrainer.flops import (FlopCounter, layer_forward_flops, meta_model_from_config, profile_config,
                                with_recompute)
from greentrainer.engine.memory import enable_checkpointing


def measured(model, batch, selected):
    for n, p in model.named_parameters():
        p.requires_grad_(n in selected)
    with FlopCounter() as f:
        loss = model(**batch).loss
    with FlopCounter() as b:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return f.total, b.total


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_measured_step_equals_the_prediction_with_recompute(arch):
    model = make_tiny(arch)
    model.train()
    batch = {"input_ids": torch.randint(0, 250, (2, 32))}
    batch["labels"] = batch["input_ids"].clone()
    plain = profile_config(model.config, 2, 32, cache=False)
    meta = meta_model_from_config(model.config)
    layers = layer_forward_flops(meta, 2, 32)
    assert len(layers) == model.config.num_hidden_layers and all(v > 0 for v in layers.values())
    prof = with_recompute(plain, meta, layers)
    enable_checkpointing(model)
    rng = random.Random(0)
    names = prof.names
    selections = [[names[0]], [names[-1]]] + [rng.sample(names, rng.randint(1, 6)) for _ in range(20)]
    for sel in selections:
        fwd, bwd = measured(model, batch, set(sel))
        assert fwd + bwd == prof.predict(sel), sel
        assert fwd + bwd >= plain.predict(sel)  # the recompute is on top of the plain step
    # the top tensor alone: no block is recomputed, the embedding output is not made to require grad
    top = [names[0]]
    assert sum(measured(model, batch, set(top))) == plain.predict(top)
    # full fine-tuning recomputes every block
    assert sum(measured(model, batch, set(names))) == prof.t_full == plain.t_full + sum(layers.values())


def test_a_run_with_checkpointing_stays_within_rho_and_full_ft_is_its_own_reference(tmp_path, tiny_model_dir,
                                                                                    jsonl, small_rows):
    import json
    from greentrainer.cli import main
    data = jsonl(small_rows)
    for method, extra in (("full", []), ("greentrainer", ["--rho", "0.8"])):
        out = tmp_path / method
        assert main(["train", "--model", tiny_model_dir, "--dataset", data, "--output-dir", str(out), "--epochs",
                     "2", "--no-progress", "--no-eval", "--method", method, "--gradient-checkpointing", *extra]) == 0
        t = json.loads((out / "metrics.json").read_text())["totals"]
        if method == "full":
            assert t["flops_total"] == t["flops_full_ft_reference"]
        else:
            assert t["flops_total"] <= 0.8 * t["flops_full_ft_reference"]
