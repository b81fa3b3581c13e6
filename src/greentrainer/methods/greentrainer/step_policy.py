"""What each step spends (``step_policy="frontier"``): skip the batch, a partial backward, or a (nearly) full one.

The probe's importances predict what a step would gain from each trainable set. The best set at every FLOPs
level (the exact selector at a grid of budgets, up to a full backward) and skipping the batch (no FLOPs, no
gain) give points (FLOPs of a step as a fraction of full fine-tuning's, predicted gain). A run that must average
ρ per step gains most by mixing the two points of their upper concave hull that bracket ρ, in the share that
averages ρ: when the partial step at ρ lies on the hull, every step is that partial step (the paper's policy);
when a nearly full step gains more than 1/ρ times as much, the run trains fully on a share of the batches and
skips the rest, so "fewer full steps" is one of GreenTrainer's own choices. Pure functions of a profile and the
importances; the controller applies the mix step by step (:class:`Mix`)."""
from __future__ import annotations

import dataclasses

from ...selection import select_tensors

LEVELS = 16  # backward budgets tried: 1/16, 2/16, … of a full backward, plus the one ρ allows


@dataclasses.dataclass
class Option:
    """One kind of step: its FLOPs as a fraction of a full fine-tuning step, its predicted gain (Σ importance)
    and the tensors it trains (empty: the batch is skipped)."""

    cost: float
    value: float
    names: tuple[str, ...] = ()

    @property
    def skip(self) -> bool:
        return not self.names


def frontier(profile, importance, budget: int, resolution=None) -> list[Option]:
    """Skipping and the best selection at each backward budget (``LEVELS`` of them and ``budget``, the one
    ρ allows), with their costs and values; dominated ones (dearer and not more valuable) left out."""
    backward = profile.t_full - profile.t_fp
    budgets = sorted({int(backward * k / LEVELS) for k in range(1, LEVELS + 1)} | {int(budget)})
    options, seen = [Option(0.0, 0.0)], set()
    for b in budgets:
        sel = select_tensors(profile.t_dws, profile.t_dys, importance, b, resolution, profile.branch_tuples)
        names = tuple(profile.names[i] for i in sel.indices)
        if not names or names in seen:
            continue
        seen.add(names)
        options.append(Option(profile.predict(names) / profile.t_full, float(sel.value), names))
    options.sort(key=lambda o: (o.cost, -o.value))
    out = []
    for o in options:
        if not out or o.value > out[-1].value:
            out.append(o)
    return out


def upper_hull(options: list[Option]) -> list[Option]:
    """The options on the upper concave hull of (cost, value), cheapest first (``options`` sorted by cost)."""
    hull: list[Option] = []
    for o in options:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]  # b lies on or under the chord a→o: drop it
            if (b.value - a.value) * (o.cost - a.cost) <= (o.value - a.value) * (b.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def mix_at(options: list[Option], rho: float) -> tuple[Option, Option, float]:
    """(cheaper option, dearer option, share of steps that take the dearer one) on the hull at cost ``rho``:
    the mix with the largest predicted gain whose mean cost is ``rho``."""
    hull = upper_hull(options)
    if rho >= hull[-1].cost:
        return hull[-1], hull[-1], 1.0
    for lo, hi in zip(hull, hull[1:]):
        if lo.cost <= rho <= hi.cost:
            if hi.cost == lo.cost:
                return lo, hi, 1.0
            return lo, hi, (rho - lo.cost) / (hi.cost - lo.cost)
    return hull[0], hull[0], 1.0


@dataclasses.dataclass
class Mix:
    """The steps of one selection window: ``share`` of them take ``hi``, the others ``lo``, spread evenly
    (an accumulator, so every process and a resumed run make the same choice at the same step)."""

    lo: Option
    hi: Option
    share: float
    acc: float = 0.0

    def next(self) -> Option:
        self.acc += self.share
        if self.acc >= 1.0 - 1e-9:
            self.acc -= 1.0
            return self.hi
        return self.lo

    def state(self) -> dict:
        return {"lo": dataclasses.asdict(self.lo), "hi": dataclasses.asdict(self.hi), "share": self.share,
                "acc": self.acc}

    @classmethod
    def from_state(cls, s: dict) -> "Mix":
        opt = lambda d: Option(d["cost"], d["value"], tuple(d["names"]))  # noqa: E731
        return cls(opt(s["lo"]), opt(s["hi"]), s["share"], s["acc"])
