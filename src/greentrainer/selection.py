"""Exact tensor selector (GreenTrainer §3.3).

maximise Σ_{i∈S} I_i  subject to  Σ_{i∈S} t_dw[i] + Σ_{j≤deepest(S)} t_dy[j] ≤ budget

Once the deepest selected tensor d is fixed, its activation-gradient cost D(d) is fixed, and the rest is a
0/1 knapsack over the t_dw of the tensors above d. One knapsack table, grown tensor by tensor from the
output downwards, answers every d: O(N·T) rather than the paper's O(N²·T). Costs are kept as exact
integers in units of the greatest common divisor of the t_dw (FLOPs share large common factors), so the
answer is optimal for the profile's integer FLOPs and never over budget. ``resolution`` instead uses
budget/resolution as the unit with costs rounded up (the paper's coarse, faster trade-off; still never
over budget).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

MAX_TABLE_CELLS = 400_000_000  # keep bits; beyond this the exact unit is coarsened (reported)


@dataclasses.dataclass
class Selection:
    indices: list[int]          # selected tensors, backward order
    value: float                # Σ importance
    cost: int                   # Σ t_dw + D(deepest): backward FLOPs predicted for the selection
    budget: int                 # backward FLOPs allowed
    exact: bool = True          # False when a coarser unit than the GCD had to be used
    unit: int = 1

    @property
    def deepest(self) -> int:
        return max(self.indices) if self.indices else -1


def selection_cost(t_dw, t_dy, indices) -> int:
    """Backward FLOPs of a selection under the chain model (Eq. 5 without t_fp)."""
    if not len(indices):
        return 0
    d = max(indices)
    return int(sum(int(t_dw[i]) for i in indices) + sum(int(x) for x in t_dy[: d + 1]))


def smallest_feasible_cost(t_dw, t_dy) -> int:
    """Backward FLOPs of the cheapest non-empty selection (one tensor, the cheapest to reach and train)."""
    D = np.cumsum(np.asarray(t_dy, dtype=object))
    return int(min(int(t_dw[j]) + int(D[j]) for j in range(len(t_dw))))


def select_tensors(t_dw, t_dy, importance, budget: int, resolution: int | None = None) -> Selection:
    """Best selection within ``budget`` backward FLOPs. Tensors with importance ≤ 0 are never chosen."""
    n = len(t_dw)
    t_dw = [int(x) for x in t_dw]
    imp = np.asarray(importance, dtype=np.float64)
    D = [0] * n
    acc = 0
    for j in range(n):
        acc += int(t_dy[j])
        D[j] = acc
    cand = [i for i in range(n) if imp[i] > 0 and t_dw[i] + D[i] <= budget]
    if not cand:
        return Selection([], 0.0, 0, budget)
    if resolution:
        unit = max(1, budget // resolution)
        exact = False
    else:
        unit = 0
        for i in cand:
            unit = math.gcd(unit, t_dw[i])
        unit = unit or max(1, budget)
        exact = True
    cap = lambda d: (budget - D[d] - t_dw[d]) // unit  # noqa: E731
    C = max(cap(d) for d in cand)
    if C * len(cand) > MAX_TABLE_CELLS:  # coarsen conservatively rather than run out of memory
        unit = -(-budget * len(cand) // MAX_TABLE_CELLS)
        exact = False
        C = max(cap(d) for d in cand)
    w = {i: -(-t_dw[i] // unit) for i in cand}  # exact when unit divides t_dw
    table = np.zeros(C + 1)
    keep = np.zeros((len(cand), C + 1), dtype=bool)
    best = (0.0, -1, 0)
    for k, i in enumerate(cand):
        c = cap(i)
        if c >= 0:
            v = imp[i] + table[min(c, C)]
            if v > best[0]:
                best = (v, k, min(c, C))
        wi = w[i]
        if wi <= C:
            shifted = table[: C + 1 - wi] + imp[i]
            better = shifted > table[wi:]
            keep[k, wi:] = better
            table[wi:] = np.where(better, shifted, table[wi:])
    value, kd, c = best
    if kd < 0:
        return Selection([], 0.0, 0, budget, exact, unit)
    chosen = [cand[kd]]
    for k in range(kd - 1, -1, -1):
        if keep[k, c]:
            chosen.append(cand[k])
            c -= w[cand[k]]
    chosen.sort()
    cost = selection_cost(t_dw, t_dy, chosen)
    assert cost <= budget, "selector exceeded its budget"
    return Selection(chosen, float(imp[chosen].sum()), cost, budget, exact, unit)


def rho_to_backward_budget(rho: float, t_fp: int, t_full: int, overhead_per_step: float = 0.0) -> int:
    """Paper Eq. 4/13: a step may cost ρ·t_full; what is left after the forward pass (and the amortised
    probe overhead) is the backward budget."""
    return int(math.floor(rho * t_full - t_fp - overhead_per_step))


def min_feasible_rho(t_dw, t_dy, t_fp: int, t_full: int, overhead_per_step: float = 0.0) -> float:
    """Smallest ρ at which at least one tensor can train."""
    return (t_fp + smallest_feasible_cost(t_dw, t_dy) + overhead_per_step) / t_full
