"""Exact selection over sub-matrix blocks and whole tensors under a FLOPs budget (GreenTrainer over SMT's
blocks).

maximise Σ_{m∈S} I_m  subject to  Σ_{m∈S} t_dw[m] + Σ_{j≤deepest(S)} t_dy[j] ≤ budget

where a member m is either a whole tensor (a norm, a bias) or an l×l block of a larger tensor. A block's t_dw
is its share of its tensor's (its weight gradient is that fraction of the matmul), and its depth is its
tensor's: selecting any block of a tensor makes the backward reach that tensor, as selecting it whole would.
This is the paper's chain cost (Eq. 5), without the side-branch refinement of :mod:`greentrainer.selection`
(so the prediction errs high, never low).

Algorithm (exact). Fix the deepest position d: the chain cost is fixed and the rest is a knapsack over the
members at or above d. Blocks of one cost are interchangeable, so for any number k of them the k most
important are best. The members are split into the blocks of the most numerous block cost (filled most
important first, by a prefix sum) and the rest (whole tensors and any other block costs), whose Pareto front
of (cost, importance) is grown position by position from the output down. For each d, each front point is
completed by the most important blocks that fit; the best over all d is the optimum (a selection whose
deepest member is above d is also counted, at a chain cost that errs high, so it never wins wrongly).

Cost: O(N log N) to order the blocks, then per position d holding candidates O(|F| + n log n) where |F| is
the front's size (it grows with the number of distinct costs among the non-block members, a few hundred for
the norms of a 7B model) and n the blocks added at d; bench/block_selector.py measures it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .selection import chain_costs


@dataclasses.dataclass
class BlockSelection:
    members: list[int]     # indices into the candidate list, most important first within each kind
    value: float           # Σ importance
    cost: int              # predicted backward FLOPs: Σ t_dw + chain cost to the deepest member
    budget: int


def _add_to_front(front, cost: int, value: float, member: int):
    """Pareto front (costs ascending, values strictly ascending, member lists) with one more member."""
    costs, values, sets = front
    new_costs = [c + cost for c in costs]
    new_values = [v + value for v in values]
    new_sets = [s + (member,) for s in sets]
    merged = sorted(zip(costs + new_costs, values + new_values, sets + new_sets), key=lambda t: (t[0], -t[1]))
    out_c, out_v, out_s, best = [], [], [], -np.inf
    for c, v, s in merged:
        if v > best:
            out_c.append(c)
            out_v.append(v)
            out_s.append(s)
            best = v
    return out_c, out_v, out_s


def select_members(t_dy, positions, costs, importance, budget: int) -> BlockSelection:
    """The best members (whole tensors and blocks) within ``budget`` backward FLOPs.

    ``t_dy``: every profiled tensor's activation-gradient FLOPs in backward order (the chain); for each
    candidate member m: ``positions[m]`` its tensor's index in that order, ``costs[m]`` its t_dw (a block: its
    share of its tensor's), ``importance[m]``. Members with importance ≤ 0 are never chosen."""
    chain = chain_costs(t_dy)
    positions = np.asarray(positions, dtype=np.int64)
    costs = np.asarray(costs, dtype=np.int64)
    importance = np.asarray(importance, dtype=np.float64)
    useful = np.flatnonzero(importance > 0)
    if len(useful) == 0:
        return BlockSelection([], 0.0, 0, budget)
    # the block cost with the most members is filled greedily; everything else goes into the front
    kinds, counts = np.unique(costs[useful], return_counts=True)
    greedy_cost = int(kinds[np.argmax(counts)])
    greedy = useful[costs[useful] == greedy_cost]
    others = useful[costs[useful] != greedy_cost]
    by_pos_greedy: dict[int, list[int]] = {}
    for m in greedy:
        by_pos_greedy.setdefault(int(positions[m]), []).append(int(m))
    by_pos_other: dict[int, list[int]] = {}
    for m in others:
        by_pos_other.setdefault(int(positions[m]), []).append(int(m))

    front = ([0], [0.0], [()])
    pool_ids = np.empty(0, dtype=np.int64)     # greedy members at or above d, most important first
    pool_values = np.empty(0, dtype=np.float64)
    prefix = np.zeros(1)
    best = (0.0, (), pool_ids, -1)  # value, front members, greedy members, d
    for d in sorted(set(by_pos_greedy) | set(by_pos_other)):
        for m in by_pos_other.get(d, []):
            front = _add_to_front(front, int(costs[m]), float(importance[m]), m)
        new = by_pos_greedy.get(d)
        if new:
            ids = np.concatenate([pool_ids, np.asarray(new, dtype=np.int64)])
            order = np.argsort(-importance[ids], kind="stable")
            pool_ids, pool_values = ids[order], importance[ids][order]
            prefix = np.concatenate([[0.0], np.cumsum(pool_values)])
        room = budget - int(chain[d])
        if room < 0:
            continue
        fc = np.asarray(front[0], dtype=np.int64)
        ok = fc <= room
        if not ok.any():
            continue
        fits = (room - fc[ok]) // greedy_cost if greedy_cost > 0 else np.full(int(ok.sum()), len(pool_ids))
        k = np.minimum(fits, len(pool_ids))
        values = np.asarray(front[1])[ok] + prefix[k]
        i = int(np.argmax(values))
        if values[i] > best[0]:
            # the pool is replaced, never changed in place, when it grows: a view of its head stays valid
            best = (float(values[i]), front[2][int(np.flatnonzero(ok)[i])], pool_ids[: int(k[i])], d)
    value, chosen_other, chosen_greedy, d = best
    if d < 0:
        return BlockSelection([], 0.0, 0, budget)
    members = list(chosen_other) + [int(m) for m in chosen_greedy]
    deepest = int(positions[members].max())
    cost = int(costs[members].sum()) + int(chain[deepest])
    return BlockSelection(sorted(members, key=lambda m: (positions[m], -importance[m])), value, cost, budget)
