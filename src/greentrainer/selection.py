"""Exact tensor selector (GreenTrainer §3.3).

maximise Σ_{i∈S} I_i  subject to  Σ_{i∈S} t_dw[i] + Σ_{j≤deepest(S)} t_dy[j] ≤ budget

(less the side-branch work a selection does not need, when the profile's branches are passed).

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


MAX_GROUP = 4   # tensors tied by side branches at one depth, solved as one multiple-choice group
LONG_TIE = 16   # depths a tensor must stay tied (at one weight) to be kept in a table of its own


def chain_costs(t_dy) -> list[int]:
    """D[d] = Σ_{j≤d} t_dy[j]: Eq. 5's activation-gradient cost when d is the deepest selected tensor."""
    out, acc = [], 0
    for x in t_dy:
        acc += int(x)
        out.append(acc)
    return out


def active_branches(n: int, branches=()) -> list[list[tuple[int, tuple[int, ...]]]]:
    """For every deepest tensor d: the side branches the chain charges but that are needed only if one of
    their tensors above d is selected, as (flops, those tensors)."""
    out: list[list[tuple[int, tuple[int, ...]]]] = [[] for _ in range(n)]
    for flops, group, joins in branches:
        group = sorted(group)
        members = set(group)
        for d in range(group[0] + 1, min(joins, n)):
            if d not in members:
                out[d].append((int(flops), tuple(g for g in group if g < d)))
    return out


def selection_cost(t_dw, t_dy, indices, branches=()) -> int:
    """Backward FLOPs of a selection (Eq. 5 without t_fp). With ``branches``: side branches are paid only
    when one of their tensors is selected or the deepest selected tensor lies at or below their join."""
    if not len(indices):
        return 0
    idx = {int(i) for i in indices}
    d = max(idx)
    cost = sum(int(t_dw[i]) for i in idx) + sum(int(x) for x in t_dy[: d + 1])
    for flops, group, joins in branches:
        if min(group) <= d < joins and not idx.intersection(group):
            cost -= int(flops)
    return int(cost)


def single_costs(t_dw, t_dy, branches=()) -> list[int]:
    """Backward FLOPs of training tensor j alone, for every j."""
    D, act = chain_costs(t_dy), active_branches(len(t_dw), branches)
    return [int(t_dw[j]) + D[j] - sum(f for f, _ in act[j]) for j in range(len(t_dw))]


def smallest_feasible_cost(t_dw, t_dy, branches=()) -> int:
    """Backward FLOPs of the cheapest non-empty selection (one tensor, the cheapest to reach and train)."""
    return min(single_costs(t_dw, t_dy, branches))


def _depth_groups(d, D, act, ok, t_dw):
    """Fixed cost when d is the deepest, and the tensors above d tied to it by side branches, as groups of
    options (tensors, weight): a group's branches are paid once if any of its selected tensors needs them."""
    base = D[d] - sum(f for f, _ in act)
    parent: dict[int, int] = {}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    live = []
    for f, mem in act:
        mem = tuple(m for m in mem if ok[m])
        if not mem:
            continue  # none of its tensors can be chosen: never paid
        live.append((f, mem))
        for m in mem:
            parent.setdefault(m, m)
        for m in mem[1:]:
            parent[find(m)] = find(mem[0])
    comps: dict[int, list] = {}
    for f, mem in live:
        comps.setdefault(find(mem[0]), []).append((f, mem))
    groups = []
    for brs in comps.values():
        items = sorted({m for _, mem in brs for m in mem})
        if len(items) > MAX_GROUP:  # too many ties: pay their branches whatever is chosen (never under)
            base += sum(f for f, _ in brs)
            groups += [[((m,), t_dw[m])] for m in items]
            continue
        opts = []
        for mask in range(1, 1 << len(items)):
            sub = tuple(items[i] for i in range(len(items)) if mask >> i & 1)
            ss = set(sub)
            opts.append((sub, sum(t_dw[m] for m in sub) + sum(f for f, mem in brs if ss.intersection(mem))))
        groups.append(opts)
    return base, groups


def select_tensors(t_dw, t_dy, importance, budget: int, resolution: int | None = None,
                   branches=()) -> Selection:
    """Best selection within ``budget`` backward FLOPs. Tensors with importance ≤ 0 are never chosen.

    For each deepest tensor d the cost is fixed (``D[d]`` less the side branches not needed) plus the
    ``t_dw`` of the tensors above d, plus the side branches that selected tensors need. Tensors no side
    branch ties to any deeper d ("settled") live in one knapsack table grown from the output down; the few
    still tied at d are added to a copy of it as multiple-choice groups."""
    n = len(t_dw)
    t_dw = [int(x) for x in t_dw]
    imp = np.asarray(importance, dtype=np.float64)
    ok = [bool(imp[i] > 0 and t_dw[i] <= budget) for i in range(n)]
    cand = [i for i in range(n) if ok[i]]
    D, act = chain_costs(t_dy), active_branches(n, branches)
    depth = {d: _depth_groups(d, D, act[d], ok, t_dw) for d in cand}
    deepest_ok = [d for d in cand if t_dw[d] + depth[d][0] <= budget]
    if not deepest_ok:
        return Selection([], 0.0, 0, budget)
    last_tie = [-1] * n  # the deepest d at which tensor j is still tied by a side branch
    for d in cand:
        for opts in depth[d][1]:
            for m in opts[-1][0]:
                last_tie[m] = max(last_tie[m], d)
    if resolution:
        unit = max(1, budget // resolution)
        exact = False
    else:
        unit = 0
        for i in cand:
            unit = math.gcd(unit, t_dw[i])
        for d in deepest_ok:
            for opts in depth[d][1]:
                for _, wo in opts:
                    unit = math.gcd(unit, wo)
        unit = unit or max(1, budget)
        exact = True
    cap = lambda d: (budget - depth[d][0] - t_dw[d]) // unit  # noqa: E731
    C = max(cap(d) for d in deepest_ok)
    if C * len(cand) > MAX_TABLE_CELLS:  # coarsen conservatively rather than run out of memory
        unit = -(-budget * len(cand) // MAX_TABLE_CELLS)
        exact = False
        C = max(cap(d) for d in deepest_ok)
    q = lambda x: -(-x // unit)  # noqa: E731  (exact when unit divides x)
    table = np.zeros(C + 1)
    keep = np.zeros((len(cand), C + 1), dtype=np.int8)
    settled: list[tuple[int, int]] = []  # (tensor, weight) in the order they entered ``table``

    def add(tab, opts, row):
        """Knapsack step for a group of options (weight, value), at most one taken; row[c] = option + 1.
        A single option is a plain 0/1 item."""
        old = tab.copy() if len(opts) > 1 else tab  # one option: ``shifted`` below is already a copy
        for k, (wo, v) in enumerate(opts):
            if wo <= C:
                shifted = old[: C + 1 - wo] + v
                better = shifted > tab[wo:]
                row[wo:][better] = k + 1
                tab[wo:] = np.where(better, shifted, tab[wo:])

    # A tensor tied with one constant weight until it settles, for at least LONG_TIE more depths (T5's
    # cross-attention K/V: tied over the whole decoder), goes into a second table, ``long``, grown like the
    # first and rebuilt from it when one of its tensors settles, instead of being re-added at every d.
    weight_at: dict[int, dict[int, int | None]] = {}  # d -> tensor -> its single weight there (None: in a group)
    for d in deepest_ok:
        wd: dict[int, int | None] = {}
        for opts in depth[d][1]:
            members = opts[-1][0]
            for m in members:
                wd[m] = opts[0][1] if len(members) == 1 else None
        weight_at[d] = wd
    steady_from = {}  # tensor -> first depth from which its weight stays constant until it settles
    for j in cand:
        if last_tie[j] < 0:
            continue
        start, w0 = last_tie[j] + 1, "unset"
        for d in range(last_tie[j], j, -1):
            if d in weight_at:
                w = weight_at[d].get(j, t_dw[j])
                if w is None or (w0 != "unset" and w != w0):
                    break
                w0 = w
            start = d
        steady_from[j] = (start, w0 if w0 != "unset" else t_dw[j])

    def goes_long(j, d):  # from d + 1 on, j keeps one weight until it settles, at least LONG_TIE depths away
        return j in steady_from and steady_from[j][0] <= d + 1 and last_tie[j] - d >= LONG_TIE

    def grow_long(j, wj):
        long_log.append((j, wj, np.zeros(C + 1, dtype=np.int8)))
        add(long_tab, [(wj, imp[j])], long_log[-1][2])

    long_w: dict[int, int] = {}    # tensor -> weight in ``long``
    long_tab, long_log, long_count = None, [], 0  # table, its additions since built, settled count then
    best = (0.0, -1, 0, 0, [], [], None)  # value, d, capacity, settled count, long additions, groups, rows
    pending: list[int] = []  # candidates above d that a side branch still ties to this or a deeper d
    ok_d = set(deepest_ok)
    for d in range(n):
        if d in ok_d:
            c = min(cap(d), C)
            base_tab = table if long_tab is None else long_tab
            short = [j for j in pending if j not in long_w]
            groups = None
            if imp[d] + base_tab[c] + sum(imp[j] for j in short) > best[0]:  # else it cannot win
                groups = [[(sub, q(wo), float(imp[list(sub)].sum())) for sub, wo in opts]
                          for opts in depth[d][1] if not (len(opts) == 1 and opts[0][0][0] in long_w)]
                tied = {m for opts in groups for m in opts[-1][0]}
                groups += [[((j,), q(t_dw[j]), float(imp[j]))] for j in short if j not in tied]
                tab, rows = base_tab, None
                if groups:
                    tab = base_tab.copy()
                    rows = np.zeros((len(groups), C + 1), dtype=np.int8)
                    for k, opts in enumerate(groups):
                        add(tab, [(wo, v) for _, wo, v in opts], rows[k])
                v = imp[d] + tab[c]
                if v > best[0]:
                    count = len(settled) if long_tab is None else long_count
                    best = (v, d, c, count, list(long_log), groups, rows)
        newly = [j for j in pending if last_tie[j] <= d]  # no longer tied from d + 1 on
        pending = [j for j in pending if last_tie[j] > d]
        if ok[d]:
            (newly if last_tie[d] <= d else pending).append(d)
        for j in newly:
            wj = q(t_dw[j])
            add(table, [(wj, imp[j])], keep[len(settled)])
            settled.append((j, wj))
        left = [j for j in newly if j in long_w]
        for j in left:
            del long_w[j]
        if left or (long_tab is None and any(goes_long(j, d) for j in pending)):
            long_tab, long_log, long_count = table.copy(), [], len(settled)  # (re)build from the settled table
            for j, wj in long_w.items():
                grow_long(j, wj)
        elif long_tab is not None:
            for j in newly:
                grow_long(j, q(t_dw[j]))
        if long_tab is not None:
            for j in pending:
                if j not in long_w and goes_long(j, d):
                    long_w[j] = q(steady_from[j][1])
                    grow_long(j, long_w[j])
            if not long_w:
                long_tab, long_log = None, []
    value, d, c, count, added, groups, rows = best
    if d < 0:
        return Selection([], 0.0, 0, budget, exact, unit)
    chosen = [d]
    for k in range(len(groups) - 1, -1, -1):
        o = rows[k, c]
        if o:
            sub, wo, _ = groups[k][o - 1]
            chosen += list(sub)
            c -= wo
    for j, wj, row in reversed(added):
        if row[c]:
            chosen.append(j)
            c -= wj
    for k in range(count - 1, -1, -1):
        if keep[k, c]:
            chosen.append(settled[k][0])
            c -= settled[k][1]
    chosen.sort()
    cost = selection_cost(t_dw, t_dy, chosen, branches)
    assert cost <= budget, "selector exceeded its budget"
    return Selection(chosen, float(imp[chosen].sum()), cost, budget, exact, unit)


def rho_to_backward_budget(rho: float, t_fp: int, t_full: int, overhead_per_step: float = 0.0) -> int:
    """Paper Eq. 4/13: a step may cost ρ·t_full; what is left after the forward pass (and the amortised
    probe overhead) is the backward budget."""
    return int(math.floor(rho * t_full - t_fp - overhead_per_step))


def min_feasible_rho(t_dw, t_dy, t_fp: int, t_full: int, overhead_per_step: float = 0.0, branches=()) -> float:
    """Smallest ρ at which at least one tensor can train."""
    return (t_fp + smallest_feasible_cost(t_dw, t_dy, branches) + overhead_per_step) / t_full
