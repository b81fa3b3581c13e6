"""The FLOPs budget of a GreenTrainer run: what ρ buys per step, what a probe costs, how an overspend is
repaid, and how long the full fine-tuning warm-up may be. Pure functions of a FLOPs profile, plus the
:class:`FlopsLedger` that keeps the run's account; both tolerances live here."""
from __future__ import annotations

import dataclasses

from ...errors import UsageError
from ...selection import min_feasible_rho, rho_to_backward_budget

# Batch shapes vary around the profiled one, so both sides of the budget keep a margin of the same size:
SAFETY_MARGIN = 0.005     # of t_full per step: the selector plans this far below ρ
BUDGET_TOLERANCE = 0.005  # of full fine-tuning's FLOPs: a finished run this close above its allowance kept it


def within_budget(spent: float, allowed: float, reference: float) -> bool:
    """Whether a run that spent ``spent`` FLOPs kept to its allowance (batch shapes vary a little around the
    profiled one, so up to BUDGET_TOLERANCE of full fine-tuning's ``reference`` above it still counts)."""
    return spent <= allowed + BUDGET_TOLERANCE * reference


@dataclasses.dataclass
class FlopsLedger:
    """The run's FLOPs account: what it may spend is Σ over the selections of the ρ in force × the full
    fine-tuning FLOPs that selection governed, so a ρ that changes (a schedule, carbon-aware ρ) is charged
    for the steps it governed only. ``debt``: FLOPs measured above the allowance, repaid by the next steps."""

    rho: float               # the ρ in force since the last selection
    allowance: float = 0.0   # FLOPs allowed up to ``mark``
    mark: float = 0.0        # full fine-tuning's FLOPs when the ρ in force took over

    def switch(self, reference: float, rho: float) -> None:
        """Close the account of the ρ in force at ``reference`` and open one for ``rho``."""
        self.allowance += self.rho * (reference - self.mark)
        self.mark, self.rho = reference, rho

    def allowed(self, reference: float) -> float:
        return self.allowance + self.rho * (reference - self.mark)

    def debt(self, spent: float, reference: float) -> float:
        return spent - self.allowed(reference)

    def state(self) -> list[float]:
        return [self.allowance, self.mark, self.rho]

    @classmethod
    def from_state(cls, state: list[float]) -> "FlopsLedger":
        allowance, mark, rho = state
        return cls(rho, allowance, mark)

def full_steps_within(references: list[float], rho: float) -> int:
    """Step policy "fewer": how many of the run's first steps can train fully within ρ, given full fine-tuning's
    FLOPs on each step of the run in its order (a full step costs exactly that): the most k with
    Σ_{i<k} r_i ≤ ρ · Σ r_i."""
    allowed, spent = rho * sum(references), 0.0
    for k, r in enumerate(references):
        spent += r
        if spent > allowed * (1 + 1e-12):
            return k
    return len(references)


def probe_cost(profile, probe_upto: int) -> int:
    """Predicted FLOPs of one probe: a forward and a backward to tensor ``probe_upto`` training all above."""
    dws = getattr(profile, "probe_t_dws", None) or profile.t_dws  # over blocks: the probe steps dense tensors
    return profile.t_fp + sum(dw + t.t_dy for dw, t in zip(dws[: probe_upto + 1], profile.tensors))


def deepest_reachable(profile, backward_budget: int) -> int:
    """Index of the deepest tensor that fits the budget on its own (paper Eq. 12), or -1."""
    fits = [j for j, c in enumerate(profile.single_costs) if c <= backward_budget]
    return max(fits, default=-1)


def budget_for(profile, rho: float, steps_per_selection: int, debt: float = 0.0,
               probe_paid: bool = False, step_scale: float = 1.0, probe_batches: int = 1,
               repay_steps: int | None = None) -> tuple[int, int]:
    """(backward budget per step, probe depth) for ρ, paying for the probe, and for any FLOPs measured
    above ρ × full fine-tuning so far (``debt``), out of the same budget over the next steps.
    ``probe_paid``: the probe has run and its measured FLOPs are already in ``debt``. ``step_scale``: a
    real step's full fine-tuning FLOPs over the profile's ``t_full`` (batches shorter than the profiled
    shape leave less room to repay a fixed overhead). ``repay_steps``: spread the debt over this many steps
    instead of the next selection's (the rest of the run, after a full fine-tuning warm-up)."""
    upto = deepest_reachable(profile, rho_to_backward_budget(rho, profile.t_fp, profile.t_full))
    scale = min(max(step_scale, 0.05), 1.0)
    steps = max(steps_per_selection, 1) * scale
    repay = steps if repay_steps is None else max(repay_steps, 1) * scale
    for _ in range(1 if probe_paid else 3):  # the probe is cheaper when it stops higher; a few rounds settle it
        probe = 0 if probe_paid else probe_cost(profile, max(upto, 0)) * probe_batches
        overhead = probe / steps + max(debt, 0.0) / repay + SAFETY_MARGIN * profile.t_full
        budget = rho_to_backward_budget(rho, profile.t_fp, profile.t_full, overhead)
        upto = deepest_reachable(profile, budget)
    return budget, upto


def step_allowance(profile, rho: float, steps_per_selection: int, debt: float = 0.0, step_scale: float = 1.0,
                   repay_steps: int | None = None) -> float:
    """FLOPs each of the next steps may spend, as a fraction of a full fine-tuning step: ρ less the share of the
    overspend (``debt``, the probe's measured FLOPs included) they repay and the safety margin; 0 when skipping
    every step is what repays it (the frontier step policy can skip; a selection cannot). :func:`budget_for`'s
    backward budget with the forward added back."""
    budget, _ = budget_for(profile, rho, steps_per_selection, debt, probe_paid=True, step_scale=step_scale,
                           repay_steps=repay_steps)
    return max((profile.t_fp + budget) / profile.t_full, 0.0)


def steps_governed(step: int, total_steps: int, window: int) -> int:
    """Steps a selection made at ``step`` governs, so its probe is paid by those alone: to the next selection
    point (one every ``window`` steps) or the run's end, whichever comes first."""
    window = max(window, 1)
    return max(min(window - step % window, total_steps - step), 1)


def can_pay_probe(profile, rho: float, steps: int, micro_batches: int = 1, probe_steps: int = 1) -> bool:
    """Whether ``steps`` steps (of ``micro_batches`` each) at ρ can pay for a probe over ``probe_steps`` steps'
    batches and still train something; when not, a selection keeps the current one instead of probing."""
    return budget_for(profile, rho, steps * micro_batches, probe_batches=micro_batches * probe_steps)[1] >= 0


def smallest_feasible_rho(profile, steps_per_selection: int, probe_batches: int = 1) -> float | None:
    """The smallest ρ at which something can train and the probe is paid for (None: not even ρ = 1)."""
    if budget_for(profile, 1.0, steps_per_selection, probe_batches=probe_batches)[1] < 0:
        return None
    lo = min_feasible_rho(profile.t_dws, profile.t_dys, profile.t_fp, profile.t_full,
                          branches=profile.branch_tuples)
    hi = 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if budget_for(profile, mid, steps_per_selection,
                                         probe_batches=probe_batches)[1] >= 0 else (mid, hi)
    return hi


def check_budget(profile, rho: float, steps_per_selection: int, probe_batches: int = 1, flag: str = "--rho") -> None:
    """Stop early, stating the smallest feasible ρ, when nothing can train within ρ."""
    budget, upto = budget_for(profile, rho, steps_per_selection, probe_batches=probe_batches)
    if upto < 0:
        lowest = smallest_feasible_rho(profile, steps_per_selection, probe_batches)
        if lowest is None:
            raise UsageError(f"the importance probe ({probe_batches} batch(es) forward and backward) cannot be "
                             f"paid for when it is spread over only {steps_per_selection} batch(es) per selection; "
                             f"select less often (--select-every K, --select-once), probe fewer batches "
                             f"(--probe-batches) or train on more data")
        raise UsageError(f"{flag} {rho} is below what the forward pass plus the cheapest useful selection "
                         f"(and the probe, spread over {steps_per_selection} steps) costs for this model and "
                         f"batch shape; the smallest feasible rho is {lowest:.4f}")



WARMUP_SHARE = 8  # default warm-up: 1/8 of the run's steps (bench/results/learning_speed.md)


def warmup_steps(profile, rho: float, total_steps: int, requested: int | None = None,
                 select_every: int | None = None, scheduled: bool = False, flag: str = "--full-warmup-steps",
                 window: int | None = None, probe_batches: int = 1) -> int:
    """Steps of full fine-tuning before the first selection: ``requested``, or 1/8 of the run (none with a ρ
    schedule), at most what the rest of the run can repay within ρ: each later step at least the cheapest useful
    step, and each later selection's probe (one every ``window`` steps, default ``select_every`` or the whole
    run, of ``probe_batches`` batches each) at least its cost at that cheapest depth. The warm-up ends on a
    selection point (a probe is not worth a window of one step)."""
    if requested == 0 or (requested is None and scheduled):
        return 0
    lo = min_feasible_rho(profile.t_dws, profile.t_dys, profile.t_fp, profile.t_full, branches=profile.branch_tuples)
    depth = max(deepest_reachable(profile, rho_to_backward_budget(lo, profile.t_fp, profile.t_full)), 0)
    probe = probe_batches * probe_cost(profile, depth) / profile.t_full  # in full steps
    window = max(window or select_every or total_steps, 1)

    def cost(warm: int) -> float:  # the run in full steps, at the cheapest selections after the warm-up
        probes = 1 + len(range((warm // window + 1) * window, total_steps, window))  # right after it, then each window
        return warm + (total_steps - warm) * lo + (probes if warm else 0) * probe

    most = next((w for w in range(total_steps, 0, -1) if cost(w) <= rho * total_steps), 0)
    if requested is None:
        warm = min(total_steps // WARMUP_SHARE, most)
        return warm - warm % select_every if select_every else warm
    if requested > most:
        raise UsageError(f"{flag} {requested}: the other {max(total_steps - requested, 0)} steps of the run cannot "
                         f"repay it and their probes within ρ {rho}; at most {most} of its {total_steps} steps")
    return requested


def probe_within_budget(profile, rho, steps_per_selection, debt, batch, step_scale, repay_steps, run_probe,
                        probe_all: bool = False):
    """(backward budget, probe depth, probe result): the probe runs as deep as ρ allows once the overspend
    (``debt``) is repaid, then the budget is computed again with the probe's measured FLOPs. ``probe_all``: it
    scores every tensor (a full backward; the frontier step policy weighs full steps too), its measured cost
    paid the same way.

    ``debt``: a number, or a callable asked again after the probe (the probe batch's length varies, so its
    measured cost is paid rather than its prediction). ``run_probe(depth)`` runs the probe on ``batch``."""
    before = debt() if callable(debt) else debt
    k = len(batch[0]) if isinstance(batch, tuple) else 1  # micro-batches the probe runs
    budget, upto = budget_for(profile, rho, steps_per_selection, before, step_scale=step_scale, probe_batches=k,
                              repay_steps=repay_steps)
    cheapest = min(profile.single_costs)  # the backward of the cheapest useful selection
    if upto < 0:  # cannot repay the overspend yet: train the cheapest useful selection, which repays the most
        budget, upto = cheapest, deepest_reachable(profile, cheapest)
    if probe_all:
        upto = len(profile.tensors) - 1
    probe = run_probe(upto)
    if callable(debt):  # overspend (no credit for underspend, as before the probe) plus the measured probe
        paid = max(before, 0.0) + (debt() - before)
        after, _ = budget_for(profile, rho, steps_per_selection, paid, probe_paid=True, step_scale=step_scale,
                              repay_steps=repay_steps)
        budget = after if deepest_reachable(profile, after) >= 0 else cheapest
    return budget, upto, probe
