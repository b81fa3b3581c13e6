"""The importance probe: base learning rate under warm-up, float32 Δw for bf16 weights, non-finite scores."""
import copy

import numpy as np
import pytest
import torch

from conftest import make_tiny
from greentrainer.data import Example, collate, encode_all
from greentrainer.errors import NonFiniteError
from greentrainer.importance import importance_scores, probe_importance
from greentrainer.models import tiny_tokenizer

TOK = tiny_tokenizer()


def _batch(model, n=4, offset=0):
    ex = [Example(source=f"the quick brown fox {i} jumps over the lazy dog", target=f"fox {i % 3}",
                  targets=[f"fox {i % 3}"]) for i in range(offset, offset + n)]
    return collate(encode_all(ex, TOK, "summarization", model.config.is_encoder_decoder, 64), TOK.pad_token_id,
                   model.config.is_encoder_decoder)


def _order(model):
    return [n for n, _ in model.named_parameters()][::-1]  # backward order, output first


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _bits(t):
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same_weights(model, before):  # bit for bit, NaN included
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(_bits(p), _bits(before[n])), n


def _assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, v in a["state"][k].items():
            w = b["state"][k][key]
            assert v.dtype == w.dtype and torch.equal(v, w), (k, key)


def _train_steps(model, opt, sched, steps):
    for i in range(steps):
        model(**_batch(model, 4, 100 + 4 * i)).loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)


def test_probe_under_warm_up_uses_the_base_learning_rate():
    from transformers import get_linear_schedule_with_warmup
    model = make_tiny("llama")
    names, batch = _order(model), _batch(model)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    expected = probe_importance(model, plain, None, batch, names, len(names) - 1)["importance"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, 10, 100)
    assert opt.param_groups[0]["lr"] == 0.0  # step 0 of the warm-up
    opt_before, sched_before, w_before = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()), \
        _weights(model)
    imp = probe_importance(model, opt, sched, batch, names, len(names) - 1)["importance"]
    assert np.count_nonzero(imp) == len(names)
    assert imp == pytest.approx(expected, rel=1e-6, abs=1e-9)
    _assert_same_state(opt.state_dict(), opt_before)
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[0]["initial_lr"] == 1e-3
    assert sched.state_dict() == sched_before and sched.get_last_lr() == [0.0]
    _assert_same_weights(model, w_before)


def test_probe_mid_warm_up_restores_optimizer_and_scheduler_exactly():
    from transformers import get_linear_schedule_with_warmup
    model = make_tiny("llama")
    names = _order(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, 10, 100)
    _train_steps(model, opt, sched, 3)
    lr = opt.param_groups[0]["lr"]
    assert 0 < lr < 1e-3
    opt_before, sched_before, w_before = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()), \
        _weights(model)
    imp = probe_importance(model, opt, sched, _batch(model), names, len(names) - 1)["importance"]
    assert np.count_nonzero(imp) == len(names)
    _assert_same_state(opt.state_dict(), opt_before)
    assert opt.param_groups[0]["lr"] == lr and sched.state_dict() == sched_before
    _assert_same_weights(model, w_before)


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_bf16_weights_are_probed_in_float32():
    """At a fine-tuning learning rate a bf16 step rounds most updates to 0; the probe steps float32 copies,
    so the scores are non-zero and rank the tensors as the float32 model does, and the bf16 weights and
    optimizer state come back bit for bit."""
    lr = 2e-5
    ref = make_tiny("llama")
    bf = make_tiny("llama").to(torch.bfloat16)
    with torch.no_grad():  # the same weights: the bf16 ones, exactly, in float32
        for p32, p16 in zip(ref.parameters(), bf.parameters()):
            p32.copy_(p16.float())
    names = _order(bf)
    opt = torch.optim.AdamW(bf.parameters(), lr=lr, weight_decay=0.01)
    _train_steps(bf, opt, None, 1)  # bf16 moments in the optimizer state
    with torch.no_grad():
        for p32, p16 in zip(ref.parameters(), bf.parameters()):
            p32.copy_(p16.float())
    opt32 = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.01)
    opt32.load_state_dict(opt.state_dict())  # the same moments, cast to float32
    state = {k: v for k, v in opt.state_dict()["state"][0].items()}
    assert state["exp_avg"].dtype == torch.bfloat16

    # what a bf16 step does to Δw: mostly exact zeros
    p = dict(bf.named_parameters())[names[5]]
    assert (((p.detach() - lr * torch.sign(p.detach())) - p.detach()) == 0).float().mean() > 0.5

    batch = _batch(bf, 4, 50)
    opt_before, w_before = copy.deepcopy(opt.state_dict()), _weights(bf)
    imp = probe_importance(bf, opt, None, batch, names, len(names) - 1)["importance"]
    _assert_same_state(opt.state_dict(), opt_before)
    _assert_same_weights(bf, w_before)
    assert all(q.dtype == torch.bfloat16 for q in bf.parameters())
    assert np.count_nonzero(imp) == len(names)  # in bf16: 15 of 20 (layer norms at 1.0 never move)

    expected = probe_importance(ref, opt32, None, batch, names, len(names) - 1)["importance"]
    assert _spearman(imp, expected) > 0.99 and np.abs(imp - expected).max() < 0.01  # bf16 Δw: 0.98, 0.03
    top = set(np.argsort(-expected)[:5])
    assert len(top & set(np.argsort(-imp)[:5])) >= 4
    big = np.abs(expected) > 0.05
    assert (np.sign(imp[big]) == np.sign(expected[big])).all()


def test_non_finite_scores_raise_and_name_the_tensors():
    dw = [torch.tensor([1.0, 2.0]), torch.tensor([float("nan"), 0.0]), torch.tensor([float("inf"), 1.0])]
    g = [torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])]
    with pytest.raises(NonFiniteError, match=r"non-finite importance for 2 of 3 tensors \(b\.weight, c\.weight\)"):
        importance_scores(dw, g, "dw_grad", ["a.weight", "b.weight", "c.weight"])
    with pytest.raises(NonFiniteError, match=r"#1"):
        importance_scores(dw, g, "dw")


def _nan_model():
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def test_probe_with_nan_weights_raises_and_restores():
    model = _nan_model()
    names = _order(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    w_before = _weights(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteError) as e:
        probe_importance(model, opt, None, _batch(model), names, len(names) - 1)
    msg = str(e.value)
    assert "\n" not in msg and f"of {len(names)} tensors" in msg and names[0] in msg and "loss" in msg
    _assert_same_weights(model, w_before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_importance_never_reaches_the_selector():
    from greentrainer.flops import profile_config
    from greentrainer.methods.greentrainer import select_step
    model = _nan_model()
    prof = profile_config(model.config, 4, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logs = []
    with pytest.raises(NonFiniteError, match="non-finite importance"):
        select_step(model, opt, None, _batch(model), prof, 0.8, 100, log=logs.append)
    assert not any("every importance" in line for line in logs)


def test_selection_record_carries_exact_and_bound():
    from greentrainer.flops import profile_config
    from greentrainer.methods.greentrainer import select_step
    model = make_tiny("llama")
    prof = profile_config(model.config, 4, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    chosen, rec = select_step(model, opt, None, _batch(model), prof, 0.8, 100, log=lambda *_: None)
    assert chosen and rec["exact"] is True and rec["bound_flops"] == 0
