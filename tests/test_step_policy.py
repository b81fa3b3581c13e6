"""GreenTrainer's frontier step policy: per step, skip the batch, a partial backward or a (nearly) full one, in
the mix the probe's importances predict gains most at ρ; the run stays within ρ and skipped batches change
nothing."""
import numpy as np
import pytest
import torch

from conftest import make_tiny
from greentrainer.config import TrainConfig
from greentrainer.errors import UsageError
from greentrainer.flops import profile_model
from greentrainer.loop import train
from greentrainer.methods.greentrainer import GreenTrainerConfig, GreenTrainerMethod
from greentrainer.methods.greentrainer import controller as controller_module
from greentrainer.methods.greentrainer.step_policy import Mix, Option, frontier, mix_at, upper_hull
from test_controller import TOK, _data


def test_the_mix_follows_the_upper_hull():
    skip, part, full = Option(0.0, 0.0), Option(0.4, 5.0, ("a",)), Option(1.0, 6.0, ("a", "b"))
    # diminishing returns: the partial step at ρ is on the hull, so every step takes it (and the dearer one
    # uses what the selection leaves of ρ)
    lo, hi, share = mix_at([skip, part, full], 0.4)
    assert (lo, hi) == (skip, part) and share == pytest.approx(1.0)
    lo, hi, share = mix_at([skip, part, full], 0.5)
    assert (lo, hi) == (part, full) and share == pytest.approx(0.1 / 0.6)
    # a full step gains more than 1/ρ times the partial one: full steps on ρ of the batches, the rest skipped
    weak = Option(0.4, 1.0, ("a",))
    assert upper_hull([skip, weak, full]) == [skip, full]
    lo, hi, share = mix_at([skip, weak, full], 0.5)
    assert (lo, hi) == (skip, full) and share == pytest.approx(0.5)
    # nothing dearer than ρ: the dearest option every step
    assert mix_at([skip, part], 0.9)[1:] == (part, 1.0)


def test_the_mix_spreads_the_dearer_steps_evenly_and_resumes_where_it_stopped():
    lo, hi = Option(0.0, 0.0), Option(1.0, 1.0, ("a",))
    mix = Mix(lo, hi, 0.3)
    taken = [mix.next() is hi for _ in range(10)]
    assert sum(taken) == 3 and not (taken[0] and taken[1])
    resumed = Mix.from_state(mix.state())
    assert [resumed.next().names for _ in range(7)] == [mix.next().names for _ in range(7)]


def test_the_frontier_holds_the_best_selection_at_every_budget_and_the_skip():
    model = make_tiny("llama")
    prof = profile_model(model, 4, 32)
    imp = np.random.default_rng(0).random(len(prof.names))
    budget = (prof.t_full - prof.t_fp) // 3
    opts = frontier(prof, imp, budget)
    assert opts[0].skip and opts[0].cost == 0
    costs, values = [o.cost for o in opts], [o.value for o in opts]
    assert costs == sorted(costs) and values == sorted(values) and len(set(values)) == len(values)
    assert all(o.cost == pytest.approx(prof.predict(o.names) / prof.t_full) for o in opts[1:])
    assert any(o.cost <= (prof.t_fp + budget) / prof.t_full for o in opts[1:])
    assert opts[-1].cost <= 1.0 and len(opts[-1].names) == len(prof.names)  # all positive: all of them


def test_frontier_is_refused_where_it_cannot_work():
    with pytest.raises(UsageError, match="--over lora"):
        GreenTrainerConfig(over="lora", step_policy="frontier").validate()


def _run(step_policy, data, monkeypatch=None, options=None, epochs=2):
    cfg = TrainConfig(method="greentrainer", epochs=epochs, batch_size=4, lr=1e-3, weight_decay=0.0, seed=0,
                      method_config=GreenTrainerConfig(rho=0.6, step_policy=step_policy, select_every=4,
                                                       full_warmup_steps=0))
    method = GreenTrainerMethod(cfg.method_config)
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = train(model, TOK, method, data, [], cfg, torch.device("cpu"), log=lambda *a: None, progress=False)
    return out, method, model, before


def test_skipped_batches_change_nothing_and_the_run_stays_within_rho(monkeypatch):
    """Forced convex gains (a full step worth far more than a partial one): full steps on about ρ of the
    batches, the rest skipped at no FLOPs; the run keeps ρ and a skipped step moves no weight."""
    def convex(profile, importance, budget, resolution=None):
        return [Option(0.0, 0.0), Option(profile.predict(profile.names) / profile.t_full, 1.0, tuple(profile.names))]
    monkeypatch.setattr(controller_module, "frontier", convex)
    data = _data(32)
    out, method, model, _ = _run("frontier", data)
    hist = out["history"]
    kinds = {k: sum(h["steps_by_kind"][k] for h in hist) for k in ("skip", "partial", "full")}
    assert kinds["skip"] and kinds["full"] and not kinds["partial"]
    assert sum(kinds.values()) == sum(h["steps"] for h in hist)
    assert out["totals"]["within_budget"]
    recs = [s for s in method.selections if s.get("kind") == "probe"]
    assert all(0 < r["step_policy"]["share_hi"] < 1 for r in recs)
    assert all(h["train_loss"] is not None and np.isfinite(h["train_loss"]) for h in hist)


def test_a_skipped_step_spends_nothing_and_moves_nothing(monkeypatch):
    """Step by step: the weights before and after each skipped step are identical, and no FLOPs are counted."""
    from greentrainer import loop

    def convex(profile, importance, budget, resolution=None):
        return [Option(0.0, 0.0), Option(1.0, 1.0, tuple(profile.names))]
    monkeypatch.setattr(controller_module, "frontier", convex)
    seen = []
    real = loop._optimizer_step

    def watched(ctx, method, batches, stand_ins=frozenset()):
        skip = method.skips_step(ctx)
        w0 = [p.detach().clone() for p in ctx.model.parameters()]
        f0 = sum(ctx.flops.values())
        out = real(ctx, method, batches, stand_ins)
        moved = any(not torch.equal(a, p) for a, p in zip(w0, ctx.model.parameters()))
        seen.append((skip, moved, sum(ctx.flops.values()) - f0))
        return out
    monkeypatch.setattr(loop, "_optimizer_step", watched)
    _run("frontier", _data(32), epochs=1)
    skipped = [s for s in seen if s[0]]
    assert skipped and all(not moved and flops == 0 for _, moved, flops in skipped)
    assert all(moved and flops > 0 for skip, moved, flops in seen if not skip)


def test_frontier_on_real_importances_stays_within_rho_and_logs_its_choice():
    out, method, _, _ = _run("frontier", _data(32))
    assert out["totals"]["within_budget"]
    recs = [s for s in method.selections if s.get("kind") == "probe"]
    assert recs and all("step_policy" in r and 0 <= r["step_policy"]["share_hi"] <= 1 for r in recs)
    for r in recs:
        front = r["step_policy"]["frontier"]
        assert front[0][:2] == [0.0, 0.0] and [c for c, _, _ in front] == sorted(c for c, _, _ in front)
