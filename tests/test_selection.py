import itertools
import random

import numpy as np
import pytest

from greentrainer.flops import profile_config
from greentrainer.selection import (min_feasible_rho, rho_to_backward_budget, select_tensors, selection_cost,
                                    smallest_feasible_cost)


def brute_force(dw, dy, imp, budget):
    best = 0.0
    for r in range(1, len(dw) + 1):
        for s in itertools.combinations(range(len(dw)), r):
            if selection_cost(dw, dy, s) <= budget:
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


def milp_optimum(dw, dy, imp, budget):
    """Independent solver: x_i selects tensor i, u_j says the gradient must reach j (u_j ≥ x_j, u_j ≥ u_{j+1})."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    n = len(dw)
    scale = max(max(dw), max(dy))
    c = np.concatenate([-np.asarray(imp), np.zeros(n)])
    rows, lo, hi = [], [], []
    rows.append(np.concatenate([np.asarray(dw) / scale, np.asarray(dy) / scale]))
    lo.append(-np.inf)
    hi.append(budget / scale)
    for j in range(n):
        r = np.zeros(2 * n)
        r[n + j], r[j] = 1, -1
        rows.append(r); lo.append(0); hi.append(np.inf)
        if j + 1 < n:
            r = np.zeros(2 * n)
            r[n + j], r[n + j + 1] = 1, -1
            rows.append(r); lo.append(0); hi.append(np.inf)
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(2 * n),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 1e-9})
    return -res.fun


@pytest.mark.parametrize("rho", [0.45, 0.6, 0.8])
def test_exact_against_milp_on_a_realistic_profile(rho):
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M
    prof = profile_config(cfg, 4, 512)
    assert len(prof.tensors) >= 250
    dw = [t.t_dw for t in prof.tensors]
    dy = [t.t_dy for t in prof.tensors]
    imp = np.random.default_rng(int(rho * 100)).random(len(dw))
    budget = rho_to_backward_budget(rho, prof.t_fp, prof.t_full)
    sel = select_tensors(dw, dy, imp, budget)
    assert sel.exact and sel.cost <= budget
    assert sel.value == pytest.approx(milp_optimum(dw, dy, imp, budget), rel=1e-6)
    coarse = select_tensors(dw, dy, imp, budget, resolution=100)
    assert coarse.cost <= budget and coarse.value <= sel.value + 1e-9


def test_all_importances_non_positive_selects_nothing():
    sel = select_tensors([10, 10], [5, 5], [-1.0, 0.0], 100)
    assert sel.indices == [] and sel.value == 0


def test_nothing_fits_the_budget():
    dw, dy = [10, 10], [50, 5]
    assert select_tensors(dw, dy, [1.0, 1.0], 40).indices == []
    assert smallest_feasible_cost(dw, dy) == 60
    assert min_feasible_rho(dw, dy, 100, 300) == pytest.approx(160 / 300)
