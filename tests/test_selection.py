import itertools
import random

import numpy as np
import pytest

from greentrainer.flops import profile_config
from greentrainer.selection import (min_feasible_rho, rho_to_backward_budget, select_tensors, selection_cost,
                                    smallest_feasible_cost)


def brute_force(dw, dy, imp, budget, branches=()):
    best = 0.0
    for r in range(1, len(dw) + 1):
        for s in itertools.combinations(range(len(dw)), r):
            if selection_cost(dw, dy, s, branches) <= budget:
                best = max(best, sum(imp[i] for i in s))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_exact_against_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12 if seed % 4 else 16)
    unit = rng.choice([1, 6, 1000])
    dw = [rng.choice([0, rng.randint(1, 60)]) * unit for _ in range(n)]
    dy = [rng.randint(0, 40) * unit for _ in range(n)]
    imp = [rng.uniform(-0.5, 1.0) for _ in range(n)]
    budget = rng.randint(0, sum(dw) + sum(dy))
    sel = select_tensors(dw, dy, imp, budget)
    assert sel.cost <= budget
    assert sel.cost == selection_cost(dw, dy, sel.indices)
    assert sel.value == pytest.approx(max(brute_force(dw, dy, imp, budget), 0.0))


def _random_costs(rng, n, lowest_importance):
    """(unit, t_dw, t_dy, importance) of a random n-tensor instance; FLOPs in multiples of a unit."""
    unit = rng.choice([1, 6, 1000])
    dw = [rng.choice([0, rng.randint(1, 60)]) * unit for _ in range(n)]
    dy = [rng.randint(0, 40) * unit for _ in range(n)]
    imp = [rng.uniform(lowest_importance, 1.0) for _ in range(n)]
    return unit, dw, dy, imp


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("long_tie", [1, 16])  # 1: every long-tied tensor goes through the second table
def test_exact_with_side_branches_against_brute_force(seed, long_tie, monkeypatch):
    import greentrainer.selection
    monkeypatch.setattr(greentrainer.selection, "LONG_TIE", long_tie)
    rng = random.Random(1000 + seed)
    n = rng.randint(2, 11)
    unit, dw, dy, imp = _random_costs(rng, n, -0.5)
    branches = []
    for _ in range(rng.randint(1, 4)):  # sibling-like side branches: 1-3 tensors, joining further down
        group = tuple(sorted(rng.sample(range(n), min(rng.randint(1, 3), n))))
        flops = rng.randint(1, 20) * unit
        branches.append((flops, group, rng.randint(group[-1] + 1, n)))
        dy[group[0]] += flops  # the chain charges a branch where it starts
    budget = rng.randint(0, sum(dw) + sum(dy))
    sel = select_tensors(dw, dy, imp, budget, branches=branches)
    assert sel.cost <= budget
    assert sel.cost == selection_cost(dw, dy, sel.indices, branches)
    assert sel.value == pytest.approx(max(brute_force(dw, dy, imp, budget, branches), 0.0))
    chain = select_tensors(dw, dy, imp, budget)  # paying every branch can only do worse
    assert chain.value <= sel.value + 1e-9


def _nested_branches(rng, n, unit, dy):
    """Side branches like T5's decoder bottom (nested tensor sets of 2-7, joining far below) and Q/K/V
    siblings (1-2 tensors), so that one depth can tie more than four tensors together."""
    branches = []
    top = rng.randint(0, max(0, n - 7))
    nest = list(range(top, min(n - 1, top + rng.randint(4, 7))))
    for _ in range(rng.randint(2, 4)):
        group = tuple(sorted(rng.sample(nest, rng.randint(2, len(nest)))))
        branches.append((rng.randint(5, 60) * unit, group, rng.choice([n, rng.randint(group[-1] + 1, n)])))
    for _ in range(rng.randint(0, 2)):
        group = tuple(sorted(rng.sample(range(n - 1), rng.randint(1, 2))))
        branches.append((rng.randint(1, 20) * unit, group, rng.randint(group[-1] + 1, n)))
    for f, group, _ in branches:
        dy[group[0]] += f  # the chain charges a branch where it starts
    return branches


def _large_group_case(seed):
    rng = random.Random(5000 + seed)
    n = rng.randint(7, 12)
    unit, dw, dy, imp = _random_costs(rng, n, -0.2)
    branches = _nested_branches(rng, n, unit, dy)
    return dw, dy, imp, rng.randint(0, sum(dw) + sum(dy)), branches


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("long_tie", [1, 16])  # 1: tied groups go through the second table
def test_exact_with_more_than_four_tied_tensors_against_brute_force(seed, long_tie, monkeypatch):
    import greentrainer.selection
    monkeypatch.setattr(greentrainer.selection, "LONG_TIE", long_tie)
    dw, dy, imp, budget, branches = _large_group_case(seed)
    sel = select_tensors(dw, dy, imp, budget, branches=branches)
    assert sel.exact and sel.bound_flops == 0
    assert sel.cost <= budget and sel.cost == selection_cost(dw, dy, sel.indices, branches)
    assert sel.value == pytest.approx(max(brute_force(dw, dy, imp, budget, branches), 0.0))


@pytest.mark.parametrize("seed", range(40))
def test_groups_over_max_group_are_charged_conservatively_and_reported(seed, monkeypatch):
    import greentrainer.selection
    monkeypatch.setattr(greentrainer.selection, "MAX_GROUP", 2)
    dw, dy, imp, budget, branches = _large_group_case(seed)
    sel = select_tensors(dw, dy, imp, budget, branches=branches)
    assert sel.cost <= budget and sel.cost == selection_cost(dw, dy, sel.indices, branches)
    assert sel.exact == (sel.bound_flops == 0)
    assert sel.value <= max(brute_force(dw, dy, imp, budget, branches), 0.0) + 1e-9
    # never worse than the true optimum with bound_flops less budget
    assert sel.value >= max(brute_force(dw, dy, imp, budget - sel.bound_flops, branches), 0.0) - 1e-9
    if sel.exact:
        assert sel.value == pytest.approx(max(brute_force(dw, dy, imp, budget, branches), 0.0))


def milp_optimum(dw, dy, imp, budget, branches=()):
    """Independent solver: x_i selects tensor i, u_j says the gradient must reach j (u_j ≥ x_j, u_j ≥ u_{j+1}),
    y_b pays side branch b (y_b ≥ x_i for its tensors, y_b ≥ u_join)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    n, nb = len(dw), len(branches)
    dy = [int(x) for x in dy]
    for f, g, _ in branches:
        dy[min(g)] -= f  # the chain's charge for the branch moves to y_b
    scale = max(max(dw), max(dy))
    nv = 2 * n + nb
    c = np.concatenate([-np.asarray(imp), np.zeros(n + nb)])
    rows, lo, hi = [], [], []
    rows.append(np.concatenate([np.asarray(dw) / scale, np.asarray(dy) / scale,
                                np.asarray([f for f, _, _ in branches], dtype=float) / scale]))
    lo.append(-np.inf)
    hi.append(budget / scale)

    def geq(a, b):  # variable a ≥ variable b
        r = np.zeros(nv)
        r[a], r[b] = 1, -1
        rows.append(r); lo.append(0); hi.append(np.inf)
    for j in range(n):
        geq(n + j, j)
        if j + 1 < n:
            geq(n + j, n + j + 1)
    for k, (_, g, joins) in enumerate(branches):
        for i in g:
            geq(2 * n + k, i)
        if joins < n:
            geq(2 * n + k, n + joins)
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(nv),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 1e-9})
    return -res.fun


def _realistic(arch):
    from transformers import LlamaConfig, Qwen2Config, T5Config
    if arch == "t5":  # cross-attention K/V tied over the whole decoder
        return T5Config(d_model=512, d_ff=1024, d_kv=64, num_layers=12, num_decoder_layers=12, num_heads=8,
                        feed_forward_proj="gated-gelu", vocab_size=32128, tie_word_embeddings=False,
                        decoder_start_token_id=0)
    if arch == "smollm2":
        return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M
    return Qwen2Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True)  # Q/K/V with biases


@pytest.mark.parametrize("arch,rho", [("smollm2", 0.45), ("smollm2", 0.6), ("smollm2", 0.8), ("qwen2", 0.6),
                                      ("t5", 0.6), ("t5", 0.7)])  # t5 0.7: 0.9998 of optimum with groups ≤ 4
def test_exact_against_milp_on_a_realistic_profile(arch, rho):
    prof = profile_config(_realistic(arch), 4, 512, 128 if arch == "t5" else None)
    assert len(prof.tensors) >= 250 and prof.branches
    dw, dy, br = prof.t_dws, prof.t_dys, prof.branch_tuples
    imp = np.random.default_rng(int(rho * 100)).random(len(dw))
    budget = rho_to_backward_budget(rho, prof.t_fp, prof.t_full)
    sel = select_tensors(dw, dy, imp, budget, branches=br)
    assert sel.exact and sel.bound_flops == 0 and sel.cost <= budget
    assert sel.value == pytest.approx(milp_optimum(dw, dy, imp, budget, br), rel=1e-6)
    chain = select_tensors(dw, dy, imp, budget)  # Eq. 5's pure chain: the paper's model
    assert chain.value == pytest.approx(milp_optimum(dw, dy, imp, budget), rel=1e-6)
    assert chain.value <= sel.value + 1e-9
    coarse = select_tensors(dw, dy, imp, budget, resolution=100, branches=br)
    assert coarse.cost <= budget and coarse.value <= sel.value + 1e-9
    assert not coarse.exact and coarse.bound_flops > 0


def test_all_importances_non_positive_selects_nothing():
    sel = select_tensors([10, 10], [5, 5], [-1.0, 0.0], 100)
    assert sel.indices == [] and sel.value == 0


def test_nothing_fits_the_budget():
    dw, dy = [10, 10], [50, 5]
    assert select_tensors(dw, dy, [1.0, 1.0], 40).indices == []
    assert smallest_feasible_cost(dw, dy) == 60
    assert min_feasible_rho(dw, dy, 100, 300) == pytest.approx(160 / 300)


def test_a_side_branch_is_not_paid_when_its_tensor_is_not_selected():
    # tensor 0 (say V) has 30 FLOPs of branch work that tensor 1 (say Q) does not need; they join at 2
    dw, dy, br = [10, 10, 10], [30 + 5, 5, 5], [(30, (0,), 2)]
    assert selection_cost(dw, dy, [1], br) == 10 + 10          # Q alone: the V branch is skipped
    assert selection_cost(dw, dy, [0, 1], br) == 20 + 40        # both: paid
    assert selection_cost(dw, dy, [2], br) == 10 + 45           # below the join: paid
    assert smallest_feasible_cost(dw, dy, br) == 20 and smallest_feasible_cost(dw, dy) == 45
    sel = select_tensors(dw, dy, [0.1, 1.0, 0.1], 25, branches=br)
    assert sel.indices == [1] and sel.cost == 20
    assert select_tensors(dw, dy, [0.1, 1.0, 0.1], 25).indices == []  # the chain: Q costs 45, V 45


@pytest.fixture(scope="module")
def t5_small_profile():
    from greentrainer.models import tiny_config
    return profile_config(tiny_config("t5", "small"), 4, 512, 128)


def test_t5_decoder_bottom_is_solved_exactly(t5_small_profile, monkeypatch):
    """T5's decoder bottom (eight tensors tied by side branches that join only at the shared embedding) is
    one group at every encoder depth: solved exactly; charged conservatively (exact False, with the bound)
    when groups are capped at four tensors, as before."""
    import greentrainer.selection
    prof = t5_small_profile
    dw, dy, br = prof.t_dws, prof.t_dys, prof.branch_tuples
    imp = np.random.default_rng(455).random(len(dw)) ** 2
    budget = rho_to_backward_budget(0.55, prof.t_fp, prof.t_full)
    sel = select_tensors(dw, dy, imp, budget, branches=br)
    assert prof.names[sel.deepest].startswith("encoder.")  # the decoder-bottom group is active
    assert sel.exact and sel.bound_flops == 0 and sel.cost <= budget
    best = milp_optimum(dw, dy, imp, budget, br)
    assert sel.value == pytest.approx(best, rel=1e-9)
    monkeypatch.setattr(greentrainer.selection, "MAX_GROUP", 4)
    capped = select_tensors(dw, dy, imp, budget, branches=br)
    assert not capped.exact and capped.bound_flops > 0 and capped.cost <= budget
    assert capped.value < best * (1 - 1e-4)  # this case needs the exact group (0.995 of optimum without)
    assert capped.value >= milp_optimum(dw, dy, imp, budget - capped.bound_flops, br) * (1 - 1e-9)


@pytest.mark.parametrize("rho", [0.4, 0.6, 0.8])
def test_llama_profile_is_exact(rho):
    from greentrainer.models import tiny_config
    prof = profile_config(tiny_config("llama", "small"), 4, 512)
    dw, dy, br = prof.t_dws, prof.t_dys, prof.branch_tuples
    imp = np.random.default_rng(int(rho * 100)).random(len(dw))
    sel = select_tensors(dw, dy, imp, rho_to_backward_budget(rho, prof.t_fp, prof.t_full), branches=br)
    assert sel.indices and sel.exact and sel.bound_flops == 0
    assert sel.value == pytest.approx(milp_optimum(dw, dy, imp, sel.budget, br), rel=1e-9)


def test_non_finite_importance_is_refused():
    with pytest.raises(ValueError, match="finite"):
        select_tensors([10, 10], [5, 5], [float("nan"), 1.0], 100)


def test_a_selection_governs_the_steps_to_the_next_selection_point_or_the_run_end():
    from greentrainer.methods.greentrainer import steps_governed
    assert [steps_governed(s, 10, 4) for s in range(10)] == [4, 3, 2, 1, 4, 3, 2, 1, 2, 1]
    assert steps_governed(3, 10, 10) == 7  # once for the whole run (the window is the run)
    assert steps_governed(10, 10, 4) == steps_governed(0, 10, 0) == 1  # never fewer than one step
