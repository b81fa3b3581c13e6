"""Exact tensor selector (GreenTrainer §3.3).

maximise Σ_{i∈S} I_i  subject to  Σ_{i∈S} t_dw[i] + Σ_{j≤deepest(S)} t_dy[j] ≤ budget

(less the side-branch work a selection does not need, when the profile's branches are passed).

Once the deepest selected tensor d is fixed, its activation-gradient cost D(d) is fixed, and the rest is a
0/1 knapsack over the t_dw of the tensors above d. One knapsack table, grown tensor by tensor from the
output downwards, answers every d: O(N·T) rather than the paper's O(N²·T). Tensors above d that side
branches tie together (Q/K/V siblings; T5's decoder bottom, needed by the encoder only through the shared
embedding) form multiple-choice groups: every subset of a group is one option, charged the branches it
needs, and only the Pareto-optimal options are kept. Costs are kept as exact integers in units of the
greatest common divisor of the weights (FLOPs share large common factors), so the answer is optimal for the
profile's integer FLOPs and never over budget (``Selection.exact``).

It is not exact (``exact`` False) in two cases, and ``Selection.bound_flops`` then says by how much: a group
of more than ``MAX_GROUP`` tied tensors is charged all its branches whatever is chosen, and a unit coarser
than the GCD (``resolution``, the paper's coarse and faster trade-off, or a table over
``MAX_TABLE_CELLS``) rounds costs up. The answer is still never over budget, and it is at least as good as
the true optimum within ``budget − bound_flops``.
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
    exact: bool = True          # optimal for the profile's FLOPs; else within ``bound_flops`` of budget
    unit: int = 1
    bound_flops: int = 0        # not exact: at least as good as the optimum within budget − bound_flops

    @property
    def deepest(self) -> int:
        return max(self.indices) if self.indices else -1


MAX_GROUP = 12  # tensors tied by side branches at one depth solved exactly as one group (2^MAX_GROUP subsets)
LONG_TIE = 16   # depths a group must stay tied (unchanged) to be kept in a table of its own


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


class _Group:
    """Tensors tied by side branches at some depth (or one free tensor), with their options: the
    Pareto-optimal subsets as (tensors, weight, Σ importance), lighter options strictly less valuable.
    One object per distinct (tensors, branches), shared by every depth where it occurs."""

    __slots__ = ("members", "options", "start", "last", "q")

    def __init__(self, members, options):
        self.members, self.options = members, options
        self.start = self.last = self.q = None


def _pareto_options(items, brs, t_dw, imp):
    """Every non-empty subset of ``items`` with its weight (Σ t_dw plus each branch it needs, once) and
    value, less the dominated ones (another at most as heavy and at least as valuable)."""
    if len(items) == 1:
        return [(items, t_dw[items[0]] + sum(f for f, _ in brs), float(imp[items[0]]))]
    k = len(items)
    big = sum(t_dw[m] for m in items) + sum(f for f, _ in brs) >= 2 ** 62
    dt = object if big else np.int64  # Python integers where int64 could overflow
    bits = (np.arange(1, 1 << k)[:, None] >> np.arange(k)) & 1
    weight = bits.astype(dt) @ np.asarray([t_dw[m] for m in items], dtype=dt)
    pos = {m: i for i, m in enumerate(items)}
    for f, mem in brs:
        bm = sum(1 << pos[m] for m in mem)
        weight = weight + (f * ((np.arange(1, 1 << k) & bm) != 0)).astype(dt)
    value = bits @ np.asarray([imp[m] for m in items], dtype=np.float64)
    out, top = [], -math.inf
    for i in np.lexsort((-value, [int(w) for w in weight]) if big else (-value, weight)):
        if value[i] > top:
            top = value[i]
            out.append((tuple(items[b] for b in range(k) if bits[i, b]), int(weight[i]), float(value[i])))
    return out


def _group(cache, items, brs, t_dw, imp) -> _Group:
    key = (items, brs)
    g = cache.get(key)
    if g is None:
        g = cache[key] = _Group(items, _pareto_options(items, brs, t_dw, imp))
    return g


def _depth_groups(d, D, act, ok, t_dw, imp, cache):
    """When d is the deepest: (fixed cost, groups of the tensors above d tied to it by side branches,
    branch FLOPs charged whatever is chosen because their group exceeds ``MAX_GROUP``). A group's branches
    are paid once if any of its selected tensors needs them."""
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
    groups, slack = [], 0
    for brs in comps.values():
        items = tuple(sorted({m for _, mem in brs for m in mem}))
        if len(items) > MAX_GROUP:  # too many subsets: pay their branches whatever is chosen (never under)
            charged = sum(f for f, _ in brs)
            base += charged
            slack += charged
            groups += [_group(cache, (m,), (), t_dw, imp) for m in items]
            continue
        groups.append(_group(cache, items, tuple(sorted(brs)), t_dw, imp))
    return base, groups, slack


def _row(n_options: int, C: int) -> np.ndarray:
    return np.zeros(C + 1, dtype=np.int8 if n_options < 127 else np.int16)


@dataclasses.dataclass
class _Grid:
    """The knapsack's weight unit: the gcd of every weight (exact), ``budget / resolution`` (the paper's coarse
    DP) or coarser when the table would not fit in memory; capacity ``C`` in units; ``bound``: how far below
    the budget a coarse selection may be charged."""

    unit: int
    C: int
    exact: bool
    bound: int

    def q(self, x: int) -> int:
        return -(-x // self.unit)  # rounding up: exact when the unit divides x


def _grid(budget, resolution, cand, used, t_dw, depth, deepest_ok, slack) -> tuple[_Grid, object]:
    if resolution:
        unit, exact = max(1, budget // resolution), False
    else:
        unit = 0
        for i in cand:
            unit = math.gcd(unit, t_dw[i])
        for g in used:
            for _, wo, _ in g.options:
                unit = math.gcd(unit, wo)
        unit, exact = unit or max(1, budget), True

    def cap(d, unit=None):  # capacity left for the tensors above the deepest one, d
        return (budget - depth[d][0] - t_dw[d]) // unit

    C = max(cap(d, unit) for d in deepest_ok)
    if C * len(cand) > MAX_TABLE_CELLS:  # coarsen conservatively rather than run out of memory
        unit, exact = -(-budget * len(cand) // MAX_TABLE_CELLS), False
        C = max(cap(d, unit) for d in deepest_ok)
    # rounding up: each of a selection's at most len(cand) weights by < unit, the capacity by < unit
    bound = max(0, min(budget, slack + (0 if exact else unit * (len(cand) + 1))))
    grid = _Grid(unit, C, exact and not slack, bound)
    return grid, lambda d: cap(d, grid.unit)


class _Table:
    """Knapsack tables of capacity ``grid.C`` grown one group of options at a time (at most one option of a
    group taken), each step recording its choices in a row for the backtrack."""

    def __init__(self, grid: _Grid):
        self.grid, self.C = grid, grid.C

    def add(self, tab, opts, row) -> None:
        """Knapsack step for a group of options (weight, value), at most one taken; row[c] = option + 1.
        A single option is a plain 0/1 item."""
        C = self.C
        old = tab.copy() if len(opts) > 1 else tab  # one option: ``shifted`` below is already a copy
        for k, (wo, v) in enumerate(opts):
            if wo <= C:
                shifted = old[: C + 1 - wo] + v
                better = shifted > tab[wo:]
                row[wo:][better] = k + 1
                tab[wo:] = np.where(better, shifted, tab[wo:])

    def options(self, g):
        """The group's options with quantised weights."""
        if g.q is None:
            g.q = [(sub, self.grid.q(wo), v) for sub, wo, v in g.options]
        return g.q

    def grow(self, tab, log, g) -> None:
        log.append((self.options(g), _row(len(g.options), self.C)))
        self.add(tab, [(wo, v) for _, wo, v in log[-1][0]], log[-1][1])


class _Ties:
    """Which group a pending tensor belongs to when d is the deepest selected tensor, and from which depth a
    group stays unchanged (for the separate table of long ties)."""

    def __init__(self, cache, t_dw, imp, depth, deepest_ok, last_tie):
        self.cache, self.t_dw, self.imp, self.last_tie = cache, t_dw, imp, last_tie
        self.ok_d = set(deepest_ok)
        self.group_at = {d: {m: g for g in depth[d][1] for m in g.members} for d in deepest_ok}

    def single(self, j):
        return _group(self.cache, (j,), (), self.t_dw, self.imp)

    def group_of(self, d, j):  # j's group when d is the deepest (j pending: above d, tied at d or deeper)
        return self.group_at[d].get(j) or self.single(j)

    def steady_from(self, g):  # the first depth from which g is unchanged until its first tensor settles
        if g.start is None:
            g.last = min(self.last_tie[m] for m in g.members)
            g.start = g.last + 1
            for d in range(g.last, max(g.members), -1):
                if d in self.ok_d and self.group_of(d, g.members[0]) is not g:
                    break
                g.start = d
        return g.start


def select_tensors(t_dw, t_dy, importance, budget: int, resolution: int | None = None,
                   branches=()) -> Selection:
    """Best selection within ``budget`` backward FLOPs. Tensors with importance ≤ 0 are never chosen.

    For each deepest tensor d the cost is fixed (``D[d]`` less the side branches not needed) plus the
    ``t_dw`` of the tensors above d, plus the side branches that selected tensors need. Tensors no side
    branch ties to any deeper d ("settled") live in one knapsack table grown from the output down; the few
    still tied at d are added to a copy of it as multiple-choice groups. The result is never over budget;
    see the module docstring for when it is not exact (``exact``, ``bound_flops``)."""
    n = len(t_dw)
    t_dw = [int(x) for x in t_dw]
    imp = np.asarray(importance, dtype=np.float64)
    if not np.isfinite(imp).all():  # NaN > 0 is False: it would pass as "not important"
        raise ValueError(f"importance must be finite ({int((~np.isfinite(imp)).sum())} of {n} are not)")
    ok = [bool(imp[i] > 0 and t_dw[i] <= budget) for i in range(n)]
    cand = [i for i in range(n) if ok[i]]
    D, act = chain_costs(t_dy), active_branches(n, branches)
    cache: dict = {}
    depth = {d: _depth_groups(d, D, act[d], ok, t_dw, imp, cache) for d in cand}
    slack = max((depth[d][2] for d in cand), default=0)  # any deepest d, feasible once charged exactly or not
    deepest_ok = [d for d in cand if t_dw[d] + depth[d][0] <= budget]
    if not deepest_ok:
        return Selection([], 0.0, 0, budget, not slack, 1, max(0, min(slack, budget)))
    last_tie = [-1] * n  # the deepest d at which tensor j is still tied by a side branch
    for d in cand:
        for g in depth[d][1]:
            for m in g.members:
                last_tie[m] = max(last_tie[m], d)
    used = {id(g): g for d in deepest_ok for g in depth[d][1]}.values()
    grid, cap = _grid(budget, resolution, cand, used, t_dw, depth, deepest_ok, slack)
    best = _search(n, grid, cap, imp, ok, depth, deepest_ok, last_tie, _Ties(cache, t_dw, imp, depth, deepest_ok,
                                                                             last_tie))
    if best is None:
        return Selection([], 0.0, 0, budget, grid.exact, grid.unit, grid.bound)
    chosen = sorted(best)
    cost = selection_cost(t_dw, t_dy, chosen, branches)
    assert cost <= budget, "selector exceeded its budget"
    return Selection(chosen, float(imp[chosen].sum()), cost, budget, grid.exact, grid.unit, grid.bound)


def _search(n, grid, cap, imp, ok, depth, deepest_ok, last_tie, ties) -> list[int] | None:
    """The dynamic programme over the deepest selected tensor d, from the output down; returns the best
    selection's tensors (None: nothing is worth selecting).

    A group (often one tensor) tied unchanged at every depth until its tensors settle, for at least LONG_TIE
    more depths (T5's cross-attention K/V, tied over the whole decoder, and its decoder bottom, tied over the
    whole encoder), goes into a second table, ``long``, grown like the first and rebuilt from it when one of
    its groups settles, instead of being re-added at every d."""
    C, q, tables = grid.C, grid.q, _Table(grid)
    table = np.zeros(C + 1)
    keep = np.zeros((sum(ok), C + 1), dtype=np.int8)
    settled: list[tuple[int, int]] = []  # (tensor, weight) in the order they entered ``table``
    ok_d = ties.ok_d
    next_ok = [None] * n  # the next deepest candidate after d
    for d in range(n - 2, -1, -1):
        next_ok[d] = d + 1 if d + 1 in ok_d else next_ok[d + 1]
    long_groups: dict[_Group, None] = {}  # groups in ``long`` (insertion-ordered)
    long_members: set[int] = set()
    long_tab, long_log, long_count = None, [], 0  # table, its additions since built, settled count then
    best = (0.0, -1, 0, 0, [], [])  # value, d, capacity, settled count, long additions, group rows
    pending: list[int] = []  # candidates above d that a side branch still ties to this or a deeper d
    for d in range(n):
        if d in ok_d:
            c = min(cap(d), C)
            base_tab = table if long_tab is None else long_tab
            short = [j for j in pending if j not in long_members]
            if imp[d] + base_tab[c] + sum(imp[j] for j in short) > best[0]:  # else it cannot win
                groups = [g for g in depth[d][1] if g not in long_groups]
                tied = {m for g in groups for m in g.members}
                groups += [ties.single(j) for j in short if j not in tied]
                tab, rows = base_tab, []
                if groups:
                    tab = base_tab.copy()
                    for g in groups:
                        tables.grow(tab, rows, g)
                v = imp[d] + tab[c]
                if v > best[0]:
                    count = len(settled) if long_tab is None else long_count
                    best = (v, d, c, count, list(long_log), rows)
        newly = [j for j in pending if last_tie[j] <= d]  # no longer tied from d + 1 on
        pending = [j for j in pending if last_tie[j] > d]
        if ok[d]:
            (newly if last_tie[d] <= d else pending).append(d)
        for j in newly:
            wj = q(ties.t_dw[j])
            tables.add(table, [(wj, imp[j])], keep[len(settled)])
            settled.append((j, wj))
        gone = set(newly)
        left = [g for g in long_groups if gone.intersection(g.members)]
        for g in left:
            del long_groups[g]
            long_members.difference_update(g.members)
        fresh: dict[_Group, None] = {}
        nd = next_ok[d]
        if nd is not None:
            for j in pending:
                if j not in long_members:
                    g = ties.group_of(nd, j)
                    if ties.steady_from(g) <= d + 1 and g.last - d >= LONG_TIE:
                        fresh[g] = None
        if left or (long_tab is None and fresh):
            long_tab, long_log, long_count = table.copy(), [], len(settled)  # (re)build from the settled table
            for g in long_groups:
                tables.grow(long_tab, long_log, g)
        elif long_tab is not None:
            for j in newly:
                tables.grow(long_tab, long_log, ties.single(j))
        for g in fresh:
            long_groups[g] = None
            long_members.update(g.members)
            tables.grow(long_tab, long_log, g)
        if not long_groups:
            long_tab, long_log = None, []
    return _backtrack(best, keep, settled)


def _backtrack(best, keep, settled) -> list[int] | None:
    """The tensors of the best entry: d itself, the groups' options recorded in their rows, then the settled
    tensors from the knapsack table's keep bits."""
    value, d, c, count, added, rows = best
    if d < 0:
        return None
    chosen = [d]
    for opts, row in reversed(added + rows):
        o = row[c]
        if o:
            sub, wo, _ = opts[o - 1]
            chosen += list(sub)
            c -= wo
    for k in range(count - 1, -1, -1):
        if keep[k, c]:
            chosen.append(settled[k][0])
            c -= settled[k][1]
    return chosen


def rho_to_backward_budget(rho: float, t_fp: int, t_full: int, overhead_per_step: float = 0.0) -> int:
    """Paper Eq. 4/13: a step may cost ρ·t_full; what is left after the forward pass (and the amortised
    probe overhead) is the backward budget."""
    return int(math.floor(rho * t_full - t_fp - overhead_per_step))


def min_feasible_rho(t_dw, t_dy, t_fp: int, t_full: int, overhead_per_step: float = 0.0, branches=()) -> float:
    """Smallest ρ at which at least one tensor can train."""
    return (t_fp + smallest_feasible_cost(t_dw, t_dy, branches) + overhead_per_step) / t_full
