"""GreenTrainer keeps optimizer state only for the tensors selected now (``deselected_state``)."""
import pytest
import torch

from conftest import make_tiny
from greentrainer.config import TrainConfig
from greentrainer.methods.greentrainer import GreenTrainerConfig
from greentrainer.data import Example, encode_all
from greentrainer.errors import UsageError
from greentrainer.loop import train
from greentrainer.methods.greentrainer import GreenTrainerController, GreenTrainerMethod
from greentrainer.models import tiny_tokenizer

TOK = tiny_tokenizer()


def encoded(model, n=16):
    exs = [Example(source=f"the quick brown fox {i} jumps over the lazy dog", target=f"fox {i % 3}",
                   targets=[f"fox {i % 3}"]) for i in range(n)]
    return encode_all(exs, TOK, "summarization", model.config.is_encoder_decoder, 64)


class Watched(GreenTrainerController):
    """Records, after each selection and each optimizer step, which tensors hold optimizer state or a grad."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.after_select, self.after_step = [], []

    def _look(self, ctx):
        ids = {id(p): n for n, p in ctx.model.named_parameters()}
        return {"selected": set(self.current), "state": {ids[id(p)] for p in ctx.optimizer.state},
                "grads": {n for n, p in ctx.model.named_parameters() if p.grad is not None},
                "offloaded": set(self.offloaded),
                "devices": {t.device.type for s in self.offloaded.values() for t, _ in s.values()
                            if isinstance(t, torch.Tensor)},
                "steps": {ids[id(p)]: int(s["step"]) for p, s in ctx.optimizer.state.items()}}

    def select(self, ctx):
        chosen = super().select(ctx)
        self.after_select.append(self._look(ctx))
        return chosen

    def after_optimizer_step(self, ctx):
        self.after_step.append(self._look(ctx))


def run(mode, epochs=3, rho=0.7, **gt):
    model = make_tiny("llama")
    cfg = TrainConfig(method="greentrainer", epochs=epochs, batch_size=4, lr=1e-3, seed=0,
                      method_config=GreenTrainerConfig(rho=rho, **{"full_warmup_steps": 0, **gt}))
    method = GreenTrainerMethod(cfg.method_config)
    method.controller = watched = Watched(cfg.method_config, deselected_state=mode)
    data = encoded(model)
    out = train(model, TOK, method, data, data[:4], cfg, torch.device("cpu"), log=lambda *a: None, progress=False)
    return out, watched, model


def test_drop_keeps_state_only_for_the_selected_tensors():
    out, method, model = run("drop", epochs=4, rho=0.7)
    assert len(method.after_select) == 4
    for look in method.after_select + method.after_step:
        assert look["state"] <= look["selected"]   # nothing for deselected tensors, before or after a step
        assert look["grads"] <= look["selected"]
        assert not look["offloaded"]
    for look in method.after_step:  # every selected tensor trains: it has state after its first step
        assert look["state"] == look["selected"]
    t = out["totals"]
    assert t["flops_total"] <= 0.7 * t["flops_full_ft_reference"]
    never = {n for n, _ in model.named_parameters()} - {n for s in method.selections for n in s["selected"]}
    assert never  # at ρ 0.7 the bottom of the tiny model cannot train
    assert all(p.grad is None for n, p in model.named_parameters() if n in never)
    assert not never & method.after_step[-1]["state"]
    # the selection changed at least once, so some state was really dropped
    sels = [look["selected"] for look in method.after_select]
    assert any(a - b for a, b in zip(sels, sels[1:]))
    assert all(s["offloaded_state_bytes"] == 0 for s in method.selections)
    assert method.selections[-1]["optimizer_state_bytes"] > 0


def test_drop_restarts_a_reselected_tensor_from_step_zero():
    out, method, model = run("drop", epochs=4, rho=0.7)
    steps_per_selection = 4  # 16 items, batch 4, one selection per epoch
    sels = [look["selected"] for look in method.after_select]
    assert any(b - a for a, b in zip(sels, sels[1:]))  # some tensor is newly selected after training others
    for k in range(1, len(method.after_select)):
        prev, now = method.after_select[k - 1]["selected"], method.after_select[k]["selected"]
        first_step = method.after_step[k * steps_per_selection]
        for n in now:
            # a tensor kept selected continues its count; a newly (or re-)selected one starts at step 1
            expected = (method.after_step[k * steps_per_selection - 1]["steps"][n] + 1) if n in prev else 1
            assert first_step["steps"][n] == expected


def test_cpu_offload_is_the_old_behaviour_bit_for_bit_with_state_off_the_device():
    _, keep, m_keep = run("keep")
    _, cpu, m_cpu = run("cpu")
    assert [s["selected"] for s in keep.selections] == [s["selected"] for s in cpu.selections]
    assert [s["importance"] for s in keep.selections] == [s["importance"] for s in cpu.selections]
    for (n, a), (_, b) in zip(m_keep.named_parameters(), m_cpu.named_parameters()):
        assert torch.equal(a, b), n
    for look in cpu.after_select + cpu.after_step:
        assert look["state"] <= look["selected"]
        assert not look["offloaded"] & look["selected"]
        assert look["devices"] <= {"cpu"}
    # what was trained and then deselected is held on the host, and all of it: nothing is lost
    trained_before = set().union(*(look["state"] for look in cpu.after_step))
    last = cpu.after_step[-1]
    assert last["offloaded"] | last["state"] == trained_before
    assert any(look["offloaded"] for look in cpu.after_select)
    # "keep" holds everything ever trained in the optimizer
    assert keep.after_step[-1]["state"] == trained_before


def test_cpu_offload_round_trip_restores_the_moments_and_step():
    model = make_tiny("llama")
    method = GreenTrainerController(GreenTrainerConfig(), deselected_state="cpu")
    method.params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    names = list(method.params)
    a, b = names[:3], names[3:6]
    batch = {"input_ids": torch.randint(0, 250, (2, 8))}
    batch["labels"] = batch["input_ids"]

    def step(sel):
        for n, p in model.named_parameters():
            p.requires_grad_(n in sel)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(a)
    step(a)
    saved = {n: {k: v.clone() for k, v in opt.state[method.params[n]].items()} for n in a}
    method.follow_selection(model, opt, b)
    assert set(method.offloaded) == set(a) and not any(method.params[n] in opt.state for n in a)
    step(b)
    method.follow_selection(model, opt, a)
    assert set(method.offloaded) == set(b)
    for n in a:
        back = opt.state[method.params[n]]
        assert set(back) == set(saved[n]) and all(torch.equal(back[k], saved[n][k]) for k in back)
        assert int(back["step"]) == 2
    step(a)
    assert int(opt.state[method.params[a[0]]]["step"]) == 3


def test_unknown_mode_is_refused():
    with pytest.raises(UsageError, match="deselected_state"):
        GreenTrainerMethod(GreenTrainerConfig(), deselected_state="gpu")


def test_default_is_drop_and_a_config_field_is_honoured():
    assert GreenTrainerMethod(GreenTrainerConfig()).deselected_state == "drop"
    cfg = GreenTrainerConfig()
    cfg.deselected_state = "cpu"  # once the config exposes it, build_method needs no change
    assert GreenTrainerMethod(cfg).deselected_state == "cpu"


def test_host_copies_travel_with_the_method_state(tmp_path):
    """A checkpoint (torch.save, loaded with weights_only) keeps what "cpu" moved to the host."""
    _, cpu, model = run("cpu")
    assert cpu.offloaded
    torch.save(cpu.state_dict(), tmp_path / "m.pt")
    again = GreenTrainerController(GreenTrainerConfig(), deselected_state="cpu")
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert set(again.offloaded) == set(cpu.offloaded)
    for n, s in cpu.offloaded.items():
        for k, (v, dev) in s.items():
            w, dev2 = again.offloaded[n][k]
            assert torch.equal(v, w) and dev == dev2
