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
from greentrainer.methods.greentrainer.budget import full_steps_within
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


def _full(data, epochs=1, max_steps=None):
    """Full fine-tuning with the settings of :func:`_run` (its own schedule over its own steps)."""
    cfg = TrainConfig(method="full", epochs=epochs, max_steps=max_steps, batch_size=4, lr=1e-3, weight_decay=0.0,
                      seed=0)
    from greentrainer.methods.full import FullFineTuning
    model = make_tiny("llama")
    out = train(model, TOK, FullFineTuning(), data, [], cfg, torch.device("cpu"), log=lambda *a: None, progress=False)
    return out, model


def _fewer(data, rho, epochs=2, val=(), eval_steps=None):
    cfg = TrainConfig(method="greentrainer", epochs=epochs, batch_size=4, lr=1e-3, weight_decay=0.0, seed=0,
                      eval_steps=eval_steps,
                      method_config=GreenTrainerConfig(rho=rho, step_policy="fewer"))
    method = GreenTrainerMethod(cfg.method_config)
    model = make_tiny("llama")
    out = train(model, TOK, method, data, list(val), cfg, torch.device("cpu"), log=lambda *a: None, progress=False)
    return out, method, model


def _even(n=32):
    """Items of one length: every batch costs full FT the same FLOPs, so ρ of the FLOPs is ρ of the steps."""
    from greentrainer.data import Example, encode_all
    exs = [Example(source=f"word word word fox {i % 10}", target=f"fox {i % 3}", targets=[f"fox {i % 3}"])
           for i in range(n)]
    data = encode_all(exs, TOK, "summarization", False, 64)
    assert len({len(e.input_ids) for e in data}) == 1
    return data


def test_fewer_is_full_fine_tuning_for_the_first_rho_of_the_steps_bit_for_bit():
    """Step policy "fewer" over 2 epochs at ρ 0.5 trains exactly as full FT for 1 epoch (the same batches, its
    schedule over its own steps): the same weights bit for bit; the other epoch is skipped at no FLOPs, and the
    run reports ρ of full FT's FLOPs over all the batches it was given."""
    data = _even(32)
    out, method, model = _fewer(data, 0.5)
    ref_out, ref = _full(data, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    hist = out["history"]
    assert [h["steps_by_kind"] for h in hist] == [{"skip": 0, "partial": 0, "full": 8}, {"skip": 8, "partial": 0, "full": 0}]
    assert hist[1]["flops_total"] == 0 and hist[1]["flops_full_ft_reference"] > 0
    assert out["totals"]["flops_total"] == ref_out["totals"]["flops_total"]
    assert out["totals"]["flops_fraction_of_full"] == 0.5 and out["totals"]["within_budget"]
    assert [s["kind"] for s in method.selections] == ["fewer"] and out["totals"]["step_policy"] == "fewer"


def test_fewer_inside_an_epoch_matches_full_ft_stopped_by_max_steps():
    """ρ 0.7 of 16 steps: 11 full steps, as ``--max-steps 11`` (the schedule spanning them), then 5 skipped."""
    data = _even(32)
    out, _, model = _fewer(data, 0.7)
    _, ref = _full(data, epochs=2, max_steps=11)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert sum(h["steps_by_kind"]["full"] for h in out["history"]) == 11


def test_a_skipped_epoch_keeps_its_validation_loss_without_a_pass(monkeypatch):
    """An epoch in which every step was skipped changed no weight: its validation loss is the last one, not
    recomputed."""
    from greentrainer import loop
    passes = []
    real = loop.eval_loss
    monkeypatch.setattr(loop, "eval_loss", lambda *a, **k: passes.append(1) or real(*a, **k))
    data = _data(32)
    out, _, _ = _fewer(data, 0.5, val=data[:8])
    assert len(passes) == 1 and out["history"][0]["val_loss"] == out["history"][1]["val_loss"]


def test_validation_inside_the_run_is_not_repeated_on_unchanged_weights(monkeypatch):
    """--eval-steps at skipped steps: the weights are those of the last trained step, so is the loss; one pass
    per weights that differ (the start and every validated point inside the trained steps, once)."""
    from greentrainer import loop
    passes = []
    real = loop.eval_loss
    monkeypatch.setattr(loop, "eval_loss", lambda *a, **k: passes.append(1) or real(*a, **k))
    data = _even(32)
    out, _, _ = _fewer(data, 0.5, val=data[:8], eval_steps=2)  # 16 steps, the first 8 trained
    curve = [pt for h in out["history"] for pt in h["val_curve"]]
    assert [pt[0] for pt in curve] == list(range(0, 17, 2))
    assert len(passes) == 5  # steps 0, 2, 4, 6, 8; steps 10 to 16 share step 8's
    assert len({pt[1] for pt in curve[4:]}) == 1 and len({pt[1] for pt in curve[:5]}) == 5


def test_fewer_is_refused_where_it_makes_no_sense():
    for kw, flag in (({"select_every": 4}, "--select-every"), ({"select_once": True}, "--select-once"),
                     ({"full_warmup_steps": 3}, "--full-warmup-steps"), ({"carbon_aware": True}, "--carbon-aware")):
        with pytest.raises(UsageError, match=flag):
            GreenTrainerConfig(step_policy="fewer", **kw).validate()
    with pytest.raises(UsageError, match="--over lora"):
        GreenTrainerConfig(over="lora", step_policy="fewer").validate()
    with pytest.raises(UsageError, match="no full step"):
        _fewer(_data(8), 0.3, epochs=1)  # 2 steps × 0.3


def test_fewer_counts_its_full_steps_on_the_runs_own_batches():
    """The most first steps whose full fine-tuning FLOPs fit ρ of the whole run's: long batches first buy fewer."""
    assert full_steps_within([1.0] * 10, 0.5) == 5
    assert full_steps_within([3.0, 3.0, 1.0, 1.0, 1.0, 1.0], 0.5) == 1   # 3 ≤ 5 < 6
    assert full_steps_within([1.0, 1.0, 1.0, 1.0, 3.0, 3.0], 0.5) == 4   # 4 ≤ 5 < 7
    assert full_steps_within([2.0, 1.0], 0.4) == 0 and full_steps_within([1.0, 2.0], 1.0) == 2
