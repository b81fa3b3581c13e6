"""GreenTrainer: adaptive backpropagation under a FLOPs budget (ICLR 2024).

At every selection point (each epoch by default) a probe scores each tensor's importance, the exact
selector picks the most important set whose backward FLOPs fit ρ·t_full − t_fp (less the probe's own cost
spread over the steps it governs), and only those tensors train until the next selection.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from ...config import Options, option
from ...errors import UsageError
from ...importance import probe_importance
from ...selection import min_feasible_rho, rho_to_backward_budget, select_tensors
from ...loop import mean_padded_size
from ..base import Method
from ..peft_methods import LoraOptions, save_adapter
from ..registry import register_method
from ..smt import BlockOptions

OVER = ("tensors", "lora", "blocks")


@dataclasses.dataclass
class GreenTrainerConfig(LoraOptions, BlockOptions):
    """GreenTrainer (adaptive backpropagation) knobs; the LoRA ones apply with ``over="lora"``, the block ones
    (--smt-targets, --smt-block) with ``over="blocks"``."""

    over: str = option("tensors", "what the selection picks from: tensors (the paper: the model's own tensors); "
                                  "lora (the adapters of a peft LoRA model, --lora-r/--lora-alpha/--lora-targets: "
                                  "the backward stops at the deepest selected adapter); blocks (the l×l blocks of "
                                  "--smt-targets, as SMT, and the norms and biases whole)", choices=OVER)
    rho: float = option(0.6, "fraction of full fine-tuning FLOPs per step")
    rho_schedule: str | None = option(None, "file: JSON {step: rho} or lines 'step rho'; the latest entry at or "
                                            "before a selection applies")
    select_every: int | None = option(None, "re-select every K optimizer steps (default: at every epoch start)")
    select_once: bool = option(False, "select once at the start and keep that selection")
    importance: str = option("dw_grad", "paper Table 4: dw_grad (-Σ Δw·g), dw (Σ|Δw|), grad (Σ g²)",
                             choices=("dw_grad", "dw", "grad"))
    probe_batches: int = option(1, "the probe's batch, in training batches: its gradient averages that many (a "
                                   "larger probe scores importance with less noise and costs that many probe "
                                   "steps of FLOPs, paid within ρ)")
    resolution: int | None = option(None, "coarse DP resolution (paper Table 7); default: the exact selector",
                                    flag="selector_resolution")
    full_warmup_steps: int | None = option(None, "optimizer steps of full fine-tuning before the first selection; "
                                                 "the selections after them repay the extra FLOPs, so the whole run "
                                                 "stays within ρ. Default: 1/8 of the run's steps, at most what the "
                                                 "rest can repay (bench/results/learning_speed.md); 0: the paper's")
    carbon_aware: bool = option(False, "set ρ at each selection from the grid intensity along --carbon-trace: "
                                       "--rho-max where the trace is at its cleanest, --rho-min at its dirtiest, "
                                       "linear between")
    rho_min: float | None = option(None, "carbon-aware ρ at the dirtiest grid (default: --rho − 0.2, at least the "
                                         "smallest feasible ρ)")
    rho_max: float | None = option(None, "carbon-aware ρ at the cleanest grid (default: --rho + 0.2, at most 1)")
    deselected_state: str = option("drop", "optimizer state of tensors that leave the selection: drop it (a "
                                           "re-selected tensor starts afresh; frees memory), keep a host copy "
                                           "(cpu), or keep it in place", choices=("drop", "cpu", "keep"))

    def validate(self) -> None:
        self.check_options()
        if self.over == "lora":
            self.check_lora()
        if self.over == "blocks":
            self.check_blocks()
        if self.select_once and self.select_every is not None:
            raise UsageError("--select-once and --select-every contradict each other; give one of them")
        if not 0 < self.rho <= 1:
            raise UsageError(f"--rho must be in (0, 1], got {self.rho}")
        if self.select_every is not None and self.select_every <= 0:
            raise UsageError(f"--select-every must be a positive number of steps, got {self.select_every}")
        if self.full_warmup_steps is not None and self.full_warmup_steps < 0:
            raise UsageError(f"--full-warmup-steps must be ≥ 0, got {self.full_warmup_steps}")
        if self.probe_batches < 1:
            raise UsageError(f"--probe-batches must be at least 1, got {self.probe_batches}")
        if self.resolution is not None and self.resolution < 2:
            raise UsageError(f"--selector-resolution must be at least 2, got {self.resolution}")
        if self.rho_schedule is not None:
            load_rho_schedule(self.rho_schedule)
        for name in ("rho_min", "rho_max"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
            if v is not None and not self.carbon_aware:
                raise UsageError(f"--{name.replace('_', '-')} is the carbon-aware range; it needs --carbon-aware")
        if self.rho_min is not None and self.rho_max is not None and self.rho_min > self.rho_max:
            raise UsageError(f"--rho-min {self.rho_min} is above --rho-max {self.rho_max}")
        if self.carbon_aware and (self.rho_schedule is not None or self.select_once):
            raise UsageError(f"--carbon-aware sets ρ at each selection; it contradicts "
                             f"{'--rho-schedule' if self.rho_schedule is not None else '--select-once'}")


def load_rho_schedule(path: str) -> dict[int, float]:
    """Read a ρ schedule: JSON object {"0": 0.5, "100": 0.4} or lines "step rho"."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"ρ schedule file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"ρ schedule {path} is not a UTF-8 text file") from None
    except OSError as e:
        raise UsageError(f"cannot read ρ schedule {path}: {e.strerror}") from None
    try:
        raw = json.loads(text)
        items = list(raw.items()) if isinstance(raw, dict) else None
    except ValueError:
        items = [ln.replace(",", " ").split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not items:
        raise UsageError(f"ρ schedule {path}: expected JSON {{step: rho}} or lines 'step rho'")
    sched = {}
    for item in items:
        try:
            step, rho = int(item[0]), float(item[1])
        except (ValueError, IndexError, TypeError):
            raise UsageError(f"ρ schedule {path}: cannot read entry {item!r}") from None
        if not math.isfinite(rho) or step < 0 or not 0 < rho <= 1:
            raise UsageError(f"ρ schedule {path}: step must be ≥ 0 and rho in (0, 1], got {step} → {rho}")
        sched[step] = rho
    return dict(sorted(sched.items()))


def lora_profile(config, lora_config, shape, t_full: int, gradient_checkpointing: bool = False):
    """The adapters of a LoRA model as the candidates: each adapter tensor's t_dw and t_dy and the base chain's
    backward it forces, profiled on a weightless copy; ``t_full`` stays full fine-tuning's of the base model, so
    ρ keeps its meaning (a fraction of full fine-tuning). With activation checkpointing, each block's recompute
    (adapters included) is charged where the backward first reaches it."""
    from peft import get_peft_model
    from ...flops import layer_forward_flops, meta_model_from_config, profile_model, with_recompute
    meta = get_peft_model(meta_model_from_config(config), copy.deepcopy(lora_config))
    adapters = [n for n, _ in meta.named_parameters() if ".lora_" in n]
    prof = profile_model(meta, *shape, candidates=adapters)
    if gradient_checkpointing:
        prof = with_recompute(prof, meta, layer_forward_flops(meta, *shape))
    return dataclasses.replace(prof, t_full=t_full)


def probe_cost(profile, probe_upto: int) -> int:
    """Predicted FLOPs of one probe: a forward and a backward to tensor ``probe_upto`` training all above."""
    dws = getattr(profile, "probe_t_dws", None) or profile.t_dws  # over blocks: the probe steps dense tensors
    return profile.t_fp + sum(dw + t.t_dy for dw, t in zip(dws[: probe_upto + 1], profile.tensors))


def deepest_reachable(profile, backward_budget: int) -> int:
    """Index of the deepest tensor that fits the budget on its own (paper Eq. 12), or -1."""
    fits = [j for j, c in enumerate(profile.single_costs) if c <= backward_budget]
    return max(fits, default=-1)


SAFETY_MARGIN = 0.005  # of t_full per step: batch shapes vary around the profiled one


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


def probe_within_budget(profile, rho, steps_per_selection, debt, batch, step_scale, repay_steps, run_probe):
    """(backward budget, probe depth, probe result): the probe runs as deep as ρ allows once the overspend
    (``debt``) is repaid, then the budget is computed again with the probe's measured FLOPs.

    ``debt``: a number, or a callable asked again after the probe (the probe batch's length varies, so its
    measured cost is paid rather than its prediction). ``run_probe(depth)`` runs the probe on ``batch``."""
    before = debt() if callable(debt) else debt
    k = len(batch[0]) if isinstance(batch, tuple) else 1  # micro-batches the probe runs
    budget, upto = budget_for(profile, rho, steps_per_selection, before, step_scale=step_scale, probe_batches=k,
                              repay_steps=repay_steps)
    cheapest = min(profile.single_costs)  # the backward of the cheapest useful selection
    if upto < 0:  # cannot repay the overspend yet: train the cheapest useful selection, which repays the most
        budget, upto = cheapest, deepest_reachable(profile, cheapest)
    probe = run_probe(upto)
    if callable(debt):  # overspend (no credit for underspend, as before the probe) plus the measured probe
        paid = max(before, 0.0) + (debt() - before)
        after, _ = budget_for(profile, rho, steps_per_selection, paid, probe_paid=True, step_scale=step_scale,
                              repay_steps=repay_steps)
        budget = after if deepest_reachable(profile, after) >= 0 else cheapest
    return budget, upto, probe


def select_step(model, optimizer, scheduler, batch, profile, rho, steps_per_selection, importance="dw_grad",
                resolution=None, previous=None, count=None, autocast=None, log=print, debt=0.0,
                step_scale=1.0, reduce_grads=None, agree=None, repay_steps=None):
    """Probe importance, select within ρ, and make exactly the selected tensors trainable.

    ``debt``: FLOPs measured above ρ × full fine-tuning so far, or a callable giving it; a callable is asked
    again after the probe, so the budget pays the probe's measured cost rather than its prediction (the
    probe batch's length varies). ``steps_per_selection`` counts profiled batches (micro-batches).
    Several processes: ``reduce_grads`` sums the probe's gradients, ``agree`` makes every process take the
    first one's selection. Returns (selected names, a record of the selection for logs)."""
    names = profile.names
    t0 = time.perf_counter()
    budget, upto, probe = probe_within_budget(
        profile, rho, steps_per_selection, debt, batch, step_scale, repay_steps,
        lambda upto: probe_importance(model, optimizer, scheduler, batch, names, upto, importance, count, autocast,
                                      reduce_grads))
    t1 = time.perf_counter()
    imp = probe["importance"]
    dw, dy, br = profile.t_dws, profile.t_dys, profile.branch_tuples
    sel = select_tensors(dw, dy, imp, budget, resolution, br)
    t2 = time.perf_counter()
    note = ""
    if sel.indices:
        chosen = [names[i] for i in sel.indices]
    elif previous:
        note = "every importance ≤ 0 (the probe step made no progress): keeping the previous selection"
        chosen = list(previous)
    else:
        note = "every importance ≤ 0: selecting by |importance| instead"
        sel = select_tensors(dw, dy, np.abs(imp) + 1e-12, budget, resolution, br)
        chosen = [names[i] for i in sel.indices]
    if note:
        log(f"GreenTrainer: {note}")
    if agree is not None:
        chosen = agree(chosen)
    keep = set(chosen)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    predicted = profile.predict(chosen)
    rec = {"rho": rho, "n_selected": len(chosen), "selected": chosen, "predicted_step_flops": predicted,
           "predicted_fraction_of_full": predicted / profile.t_full, "backward_budget": budget,
           "probe_depth": upto, "probe_grad_bytes": probe["grad_bytes"],
           "probe_grad_bytes_full_backward": probe["grad_bytes_full"], "exact": sel.exact,
           "bound_flops": sel.bound_flops,  # not exact: as good as the optimum with this much less budget
           "probe_time_s": t1 - t0, "selector_time_s": t2 - t1, "importance": [float(x) for x in imp]}
    if note:
        rec["note"] = note
    log(f"GreenTrainer: rho {rho}: {len(chosen)}/{len(names)} tensors, predicted "
        f"{100 * predicted / profile.t_full:.1f}% of a full step; probe stopped at depth {upto} "
        f"({probe['grad_bytes'] / 2**20:.1f} of {probe['grad_bytes_full'] / 2**20:.1f} MiB gradient memory)")
    return chosen, rec


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


def warmup_record(names, step: int, **extra) -> dict:
    """The selection record of the full fine-tuning warm-up: every candidate trains, no probe."""
    return {"rho": 1.0, "n_selected": len(names), "selected": list(names), "step": step, **extra,
            "kind": "warm-up", "note": "full fine-tuning warm-up"}


def in_warmup(selections: list[dict]) -> bool:
    """Whether the last selection record is the warm-up's (the next selection ends it, whatever ρ allows)."""
    return bool(selections) and selections[-1].get("kind") == "warm-up"


@register_method("greentrainer", config_cls=GreenTrainerConfig)
class GreenTrainerMethod(Method):
    """GreenTrainer: the most important tensors whose backward fits ρ of full FT's FLOPs train.

    Optimizer state follows the selection: the optimizer is built once over every tensor, but after each
    selection the AdamW state (moments and step count) of each tensor that is no longer selected leaves the
    optimizer, and its ``.grad`` is freed, so between selections the training device holds state only for
    the tensors that train (a tensor never selected never gets any). ``deselected_state``:

    * ``"drop"`` (default): the state is discarded; a re-selected tensor starts afresh like a newly
      selected one (zero moments, step 0: the bias correction of its first step is that of a fresh
      AdamW, which is exact for fresh moments). The probe scores deselected tensors with the same fresh
      moments, i.e. the step they would really take.
    * ``"cpu"``: the state moves to host memory and comes back when the tensor is selected again, so
      training is exactly that of ``"keep"`` (bit for bit) without the device holding it in between;
      before each probe the stored states of the tensors the probe can reach come back so that it scores
      them with their own moments, and those not selected leave again after it. (On a CPU-only run host
      memory *is* the training memory: it saves nothing there.)
    * ``"keep"``: the former behaviour, every tensor's state stays in the optimizer once created (for
      comparisons).

    What a re-selected tensor starts from, measured (``python bench/memory.py --validation``,
    bench/results/memory_validation.md): SmolLM2-135M, SciTLDR 32 train / 24 validation items, 3 epochs with
    a selection at each, lr 3e-4, ρ 0.6; 41 tensors left at the second selection and 39 of them came back at
    the third. Validation loss after epoch 3: "drop" 2.8322, "cpu" (= "keep") 2.8297; training loss of that
    epoch 1.502 vs 1.454 (one seed; epochs 1-2 are identical by construction). Keeping the moments helps a
    little (0.1% of the validation loss); "drop" is the default because it saves the memory on every device,
    CPU-only runs included, and moves nothing between devices. The option for the CLI/config:
    ``deselected_state`` (also read from ``cfg.deselected_state`` when the constructor is not given one).
    """

    default_lr = 1e-4  # the validation sweep's winner at rho 0.5 (bench/results/accuracy_sweep_scitldr.md)
    DESELECTED_STATE = ("drop", "cpu", "keep")

    def __init__(self, cfg, deselected_state: str | None = None, base_model: str | None = None):
        self.cfg = cfg
        self.base_model = base_model  # --over lora: the name saved with the adapter
        self._profiles: dict = {}
        self.schedule = load_rho_schedule(cfg.rho_schedule) if cfg.rho_schedule else {}
        self.selections: list[dict] = []
        self._epoch_selections: list[dict] = []
        self.current: list[str] | None = None
        self._selected_at: int | None = None
        self.warmup = 0  # steps of full fine-tuning first (set by check() from the run's length)
        mode = deselected_state or getattr(cfg, "deselected_state", None) or "drop"
        if mode not in self.DESELECTED_STATE:
            raise UsageError(f"deselected_state must be one of {', '.join(self.DESELECTED_STATE)}, got {mode!r}")
        self.deselected_state = mode
        self._offloaded: dict[str, dict] = {}  # "cpu": name -> {state key: (host tensor, original device)}
        # FLOPs allowed so far: Σ over past selections of the ρ in force × the full fine-tuning FLOPs it governed
        self._allowance, self._ref_mark, self._rho_in_force = 0.0, 0.0, cfg.rho
        self.rho_range = (cfg.rho, cfg.rho)  # carbon-aware: (ρ at the dirtiest grid, ρ at the cleanest)
        self.gradient_checkpointing = False  # set by prepare() from the run's options

    @classmethod
    def from_config(cls, train_config):
        return cls(train_config.method_config, base_model=train_config.model)

    @property
    def over(self) -> str:
        return getattr(self.cfg, "over", "tensors")

    def candidates(self, model, profile):
        """The profile the selection works on: the model's (``over="tensors"``), its LoRA adapters' or its
        blocks' (folded to one row per tensor)."""
        if self.over == "tensors":
            return profile
        found = self._candidates_for(model, profile)
        return found if self.over == "lora" else found.profile

    def _candidates_for(self, model, profile):
        """The LoRA profile or the BlockCandidates for this batch shape (built once per shape)."""
        key = (profile.batch_size, profile.seq_len, profile.target_len or None)
        if key not in self._profiles:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            if self.over == "lora":
                self._profiles[key] = lora_profile(base.config, self.cfg.lora_config(base), key, profile.t_full,
                                                   self.gradient_checkpointing)
            else:
                from .blocks import block_candidates
                self._profiles[key] = block_candidates(base, profile, self.cfg.target_kinds(), self.cfg.block_size)
        return self._profiles[key]

    # -- the plug-in interface ------------------------------------------------------------------
    def check(self, model, profile, steps_per_epoch, total_steps, micro_batches=1):
        profile = self.candidates(model, profile)
        steps = self._steps(steps_per_epoch, total_steps) * micro_batches
        probe = micro_batches * self.cfg.probe_batches  # micro-batches one probe runs
        for rho in {self.cfg.rho, *self.schedule.values()}:
            check_budget(profile, rho, steps, probe)
        if self.cfg.carbon_aware:
            lo, hi = self.cfg.rho_min, self.cfg.rho_max
            if lo is None:
                lo = max(self.cfg.rho - 0.2, smallest_feasible_rho(profile, steps, probe) or 1.0)
            hi = min(self.cfg.rho + 0.2, 1.0) if hi is None else hi
            self.rho_range = (min(lo, hi), hi)
            check_budget(profile, self.rho_range[0], steps, probe, "--rho-min")
        self.warmup = warmup_steps(profile, self.cfg.rho, total_steps, self.cfg.full_warmup_steps,
                                   self.cfg.select_every, bool(self.schedule),
                                   window=self._steps(steps_per_epoch, total_steps),
                                   probe_batches=self.cfg.probe_batches)

    def prepare(self, model, ctx):
        self.gradient_checkpointing = ctx.cfg.gradient_checkpointing  # the profile charges the recompute
        if self.over == "lora":
            from peft import get_peft_model
            model = get_peft_model(model, self.cfg.lora_config(model))
        self.profile = self.candidates(model, ctx.profile)
        names = set(self.profile.names)
        self.params = {n: p for n, p in model.named_parameters() if self.over == "tensors" or n in names}
        self.names = self.profile.names
        if self.over == "blocks":
            from .blocks import BlockTraining
            self.cands = self._candidates_for(model, ctx.profile)
            self.block_training = BlockTraining(self.cands)
            if self.cands.l != self.cfg.block_size:
                ctx.log(f"GreenTrainer: block size {self.cfg.block_size} does not divide the target shapes; "
                        f"using {self.cands.l}")
        missing = [n for n in self.names if n not in self.params]
        if missing:
            raise RuntimeError(f"profile names not found in the model: {missing[:3]}")
        self.check(model, ctx.profile, ctx.steps_per_epoch, ctx.total_steps, ctx.micro_batches_per_step)
        if self.warmup:
            ctx.log(f"GreenTrainer: full fine-tuning for the first {self.warmup} of {ctx.total_steps} steps, repaid by "
                    f"the selections after them (the run stays within ρ {self.cfg.rho})")
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def optimizer_parameters(self, model):
        return list(self.params.values())  # frozen tensors have no grad, so AdamW skips them

    def flops_allowed(self, reference: float) -> float:
        """Σ over the selections of the ρ in force × the full fine-tuning FLOPs it governed."""
        return self._allowance + self._rho_in_force * (reference - self._ref_mark)

    def on_epoch_start(self, ctx):
        self._epoch_selections = []
        if self.cfg.select_every is None and (not self.cfg.select_once or self.current is None):
            self._select_or_warm_up(ctx)

    def on_step_start(self, ctx):
        warm = self.warmup
        if warm and ctx.global_step == warm and self._selected_at != warm:
            self.select(ctx)  # the first selection, right after the warm-up
        elif self.cfg.select_every is not None and ctx.global_step % self.cfg.select_every == 0:
            self._select_or_warm_up(ctx)

    def _select_or_warm_up(self, ctx):
        if ctx.global_step < self.warmup:
            self._train_everything(ctx)
        else:
            self.select(ctx)

    def _train_everything(self, ctx) -> None:
        """The full fine-tuning warm-up: every tensor trains, no probe (its extra FLOPs are repaid later)."""
        for p in self.params.values():
            p.requires_grad_(True)
        rec = warmup_record(self.names, ctx.global_step, epoch=ctx.epoch + 1)
        rec.update(self._follow_selection(ctx.model, ctx.optimizer, self.names))
        self.current, self._selected_at = list(self.names), ctx.global_step
        self.selections.append(rec)
        self._epoch_selections.append(rec)

    def epoch_report(self):
        return {"selections": self._epoch_selections}

    # -- selection ----------------------------------------------------------------------------
    def _steps_per_selection(self, ctx) -> int:
        """Steps this selection governs, until the next selection point or the run's end (its probe is paid by
        those alone): a selection after the warm-up, or the last one, may govern fewer than usual."""
        cfg = self.cfg
        window = ctx.total_steps if cfg.select_once else cfg.select_every or ctx.steps_per_epoch
        return steps_governed(ctx.global_step, ctx.total_steps, window)

    def _steps(self, steps_per_epoch, total_steps) -> int:
        if self.cfg.select_once:
            return total_steps or 1
        if self.cfg.select_every is not None:
            return min(self.cfg.select_every, total_steps or self.cfg.select_every)
        return steps_per_epoch or 1

    def rho_now(self, ctx) -> float:
        """ρ for a selection now: carbon-aware from the grid intensity at the run's clock, else the schedule's."""
        if not self.cfg.carbon_aware:
            return self.rho_at(ctx.global_step)
        from ...energy import carbon_aware_rho
        g = ctx.grid.intensity_at(ctx.train_seconds)
        return ctx.broadcast(round(carbon_aware_rho(g, ctx.grid.lo, ctx.grid.hi, *self.rho_range), 4))

    def rho_at(self, step: int) -> float:
        rho = self.cfg.rho
        for s, r in self.schedule.items():
            if s <= step:
                rho = r
        return rho

    def select(self, ctx) -> list[str]:
        """Probe and select; with several processes the FLOPs are summed over them and each repays its
        share, the probe measures the global step, and all take the first process's selection."""
        rho = self.rho_now(ctx)
        world, micro = ctx.world_size, ctx.micro_batches_per_step
        reference = ctx.global_flops()[1]  # close the last selection's account at the ρ it had
        self._allowance += self._rho_in_force * (reference - self._ref_mark)
        self._ref_mark, self._rho_in_force = reference, rho

        def debt():  # this process's share of the measured overspend (the probe's own FLOPs once it ran)
            spent, reference = ctx.global_flops()
            return (spent - self._allowance - rho * (reference - self._ref_mark)) / world
        rec_debt = debt()
        if ctx.global_step:  # measured: full fine-tuning FLOPs per micro-batch so far
            scale = ctx.global_flops()[1] / (ctx.global_step * world * micro) / ctx.profile.t_full
        else:  # expected from the data's padded batch sizes against the profiled shape
            p = ctx.profile
            scale = mean_padded_size(ctx.train_data, p.batch_size, ctx.seq2seq) / (p.seq_len + p.target_len)
        if self.deselected_state == "cpu":  # the probe steps reachable tensors with their own moments
            p = self.profile
            reach = deepest_reachable(p, rho_to_backward_budget(rho, p.t_fp, p.t_full))  # the deepest probe
            self._restore_state(ctx.optimizer, self.names[: reach + 1])
        repay = (ctx.total_steps - ctx.global_step) * micro if self.warmup else None
        warm_up_ended = in_warmup(self.selections)
        governs = self._steps_per_selection(ctx)
        if self.current and not warm_up_ended and not can_pay_probe(self.profile, rho, governs, micro,
                                                                           self.cfg.probe_batches):
            ctx.log(f"GreenTrainer: keeping the selection: the {governs} step(s) left cannot pay for a probe")
            return self.current
        if self.over == "blocks":
            chosen, rec = self._select_blocks(ctx, rho, debt, governs * micro, scale, repay)
        else:
            chosen, rec = select_step(ctx.model, ctx.optimizer, ctx.scheduler,
                                      ctx.sample_batches(self.cfg.probe_batches), self.profile, rho, governs * micro,
                                      self.cfg.importance,
                                      self.cfg.resolution, None if warm_up_ended else self.current, ctx.count,
                                      ctx.autocast, ctx.log, debt, scale, ctx.reduce_gradients if world > 1 else None,
                                      ctx.broadcast, repay)
            rec.update(self._follow_selection(ctx.model, ctx.optimizer, chosen))
        rec["debt_flops"] = rec_debt
        rec["kind"] = "probe"  # every selection record has a kind: "probe" (probed and selected) or "warm-up"
        if self.cfg.carbon_aware:
            rec["grid_g_per_kwh"] = ctx.grid.intensity_at(ctx.train_seconds)
            rec["trace_time"] = ctx.grid.time_at(ctx.train_seconds)
        rec["step_scale"] = scale
        rec["probe_batches"] = self.cfg.probe_batches
        rec.update(step=ctx.global_step, epoch=ctx.epoch + 1)
        self.current, self._selected_at = chosen, ctx.global_step
        self.selections.append(rec)
        self._epoch_selections.append({k: v for k, v in rec.items() if k != "importance"})
        return chosen

    def _select_blocks(self, ctx, rho, debt, steps, scale, repay):
        """Probe the dense candidates (blocks scored one by one), select members within ρ exactly, and train
        the chosen blocks through SMT's layer and the chosen small tensors whole; the optimizer state of the
        previous selection is dropped (its blocks are other tensors)."""
        from ...block_selection import select_members
        from .blocks import chosen_blocks, member_importance
        c, prof = self.cands, self.profile
        self.block_training.remove(ctx.model)
        ctx.rebuild_optimizer([self.params[n] for n in c.tensors])  # the probe steps the dense candidates
        batch = ctx.sample_batches(self.cfg.probe_batches)
        t0 = time.perf_counter()
        budget, upto, probe = probe_within_budget(
            prof, rho, steps, debt, batch, scale, repay,
            lambda upto: probe_importance(ctx.model, ctx.optimizer, ctx.scheduler, batch, c.tensors, upto,
                                          self.cfg.importance, ctx.count, ctx.autocast,
                                          ctx.reduce_gradients if ctx.world_size > 1 else None,
                                          blocks={c.weight_of(m): c.l for m in c.targets}))
        t1 = time.perf_counter()
        imp = member_importance(c, probe)
        sel = select_members(c.t_dy, c.positions, c.costs, imp, budget)
        if not sel.members:  # every score ≤ 0: by |importance| instead
            ctx.log("GreenTrainer: every importance ≤ 0: selecting by |importance| instead")
            sel = select_members(c.t_dy, c.positions, c.costs, np.abs(imp) + 1e-12, budget)
        t2 = time.perf_counter()
        blocks, whole = ctx.broadcast(chosen_blocks(c, sel.members))
        ctx.rebuild_optimizer(self.block_training.install(ctx.model, blocks, whole))
        chosen = sorted(set(whole) | {c.weight_of(m) for m in blocks}, key=c.tensors.index)
        predicted = prof.t_fp + sel.cost
        n_blocks = sum(len(v) for v in blocks.values())
        rec = {"rho": rho, "n_selected": len(chosen), "selected": chosen, "n_blocks": n_blocks, "block_size": c.l,
               "blocks": {k: [list(b) for b in v] for k, v in blocks.items()}, "whole": whole,
               "n_candidates": len(c.members), "predicted_step_flops": predicted,
               "predicted_fraction_of_full": predicted / prof.t_full, "backward_budget": budget, "probe_depth": upto,
               "probe_grad_bytes": probe["grad_bytes"], "probe_time_s": t1 - t0, "selector_time_s": t2 - t1,
               "importance": [float(x) for x in probe["importance"]]}
        ctx.log(f"GreenTrainer: rho {rho}: {n_blocks} blocks of {c.l}x{c.l} in {len(blocks)} projections and "
                f"{len(whole)} small tensors, of {len(c.members)} candidates; predicted "
                f"{100 * predicted / prof.t_full:.1f}% of a full step (selector {1000 * (t2 - t1):.0f} ms)")
        return chosen, rec

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"selections": self.selections, "epoch_selections": self._epoch_selections,
                "current": self.current, "allowance": [self._allowance, self._ref_mark, self._rho_in_force],
                "offloaded": {n: {k: [v, str(dev) if dev is not None else None] for k, (v, dev) in s.items()}
                              for n, s in self._offloaded.items()},  # "cpu": the host copies
                "installed": self._installed()}

    def _installed(self) -> dict | None:
        """--over blocks: the blocks and small tensors training now (the layers to put back on resume)."""
        if self.over != "blocks" or not self.block_training.layers and not self.current:
            return None
        last = next((s for s in reversed(self.selections) if "blocks" in s), None)
        return None if last is None else {"blocks": last["blocks"], "whole": last["whole"]}

    def load_state_dict(self, state: dict, ctx) -> None:
        import torch
        self.selections, self._epoch_selections = list(state["selections"]), list(state["epoch_selections"])
        self.current = state["current"]
        self._allowance, self._ref_mark, self._rho_in_force = state.get("allowance", [0.0, 0.0, self.cfg.rho])
        self._selected_at = self.selections[-1].get("step") if self.selections else None
        self._offloaded = {n: {k: (v, torch.device(dev) if dev is not None else None) for k, (v, dev) in s.items()}
                           for n, s in state.get("offloaded", {}).items()}
        installed = state.get("installed")
        if installed:  # --over blocks: the same layers again, then the loop loads their weights
            blocks = {k: [tuple(b) for b in v] for k, v in installed["blocks"].items()}
            ctx.rebuild_optimizer(self.block_training.install(ctx.model, blocks, installed["whole"]))
            return
        keep = set(self.current or ())
        for n, p in ctx.model.named_parameters():
            p.requires_grad_(n in keep)

    def after_optimizer_step(self, ctx):
        if self.over == "blocks":
            self.block_training.write()

    def finalize(self, model):
        """--over blocks: the trained blocks merged back into plain linear layers (a plain checkpoint)."""
        if self.over == "blocks":
            self.block_training.remove(model)
        return model

    # -- optimizer state of deselected tensors ------------------------------------------------
    def _follow_selection(self, model, optimizer, chosen) -> dict:
        """Free the gradients and the optimizer state of the tensors not in ``chosen`` (``deselected_state``)
        and bring back the host copies of those selected again; returns the state bytes now held."""
        import torch
        keep = set(chosen)
        if self.deselected_state == "cpu":
            self._restore_state(optimizer, [n for n in chosen if n in self._offloaded])
        for n, p in model.named_parameters():
            if n in keep:
                continue
            p.grad = None
            if self.deselected_state == "keep":
                continue
            state = optimizer.state.pop(p, None)
            if state and self.deselected_state == "cpu":
                self._offloaded[n] = {k: (v.detach().to("cpu"), v.device) if isinstance(v, torch.Tensor)
                                      else (v, None) for k, v in state.items()}
        return {"optimizer_state_bytes": self.state_bytes(optimizer.state.values()),
                "offloaded_state_bytes": self.state_bytes({k: v for k, (v, _) in s.items()}
                                                          for s in self._offloaded.values())}

    def _restore_state(self, optimizer, names) -> None:
        """Put the host copies of ``names``' optimizer state back on their devices (``"cpu"``)."""
        for n in names:
            stored = self._offloaded.pop(n, None)
            if stored is not None:
                optimizer.state[self.params[n]] = {k: v.to(dev) if dev is not None else v
                                                   for k, (v, dev) in stored.items()}

    @staticmethod
    def state_bytes(states) -> int:
        """Bytes of the tensors in optimizer states (an iterable of {key: value} dicts)."""
        import torch
        return sum(v.numel() * v.element_size() for s in states for v in s.values() if isinstance(v, torch.Tensor))

    # -- outputs -----------------------------------------------------------------------------
    def save(self, model, tokenizer, path) -> None:
        if self.over == "lora":  # a normal peft adapter folder; adapters never selected keep their initial value
            save_adapter(model, tokenizer, path, self.base_model, "greentrainer-lora")
        else:
            super().save(model, tokenizer, path)

    def write_artifacts(self, out_dir) -> None:
        from ...files import write_text_atomic
        write_text_atomic(out_dir / "selections.json",
                          json.dumps({"tensors": self.names, "selections": self.selections}, indent=1))
        if self.selections:
            plot_selection_heatmap(self.names, self.selections, out_dir / "selection_heatmap.png")


def plot_selection_heatmap(names, selections, path) -> None:
    """Which tensors trained after which selection (rows: tensors, output at the top)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = np.zeros((len(names), len(selections)))
    index = {n: i for i, n in enumerate(names)}
    for j, s in enumerate(selections):
        for n in s["selected"]:
            grid[index[n], j] = 1
    fig, ax = plt.subplots(figsize=(max(6.5, 0.5 * len(selections) + 4), 8))
    ax.imshow(grid, aspect="auto", cmap="Greens", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("selection (epoch / step)")
    ax.set_xticks(range(len(selections)))
    ax.set_xticklabels([f"e{s['epoch']}\ns{s['step']}" for s in selections], fontsize=7)
    step = max(1, len(names) // 40)
    ax.set_yticks(range(0, len(names), step))
    ax.set_yticklabels([names[i] for i in range(0, len(names), step)], fontsize=5)
    ax.set_title("GreenTrainer: trained tensors (green) per selection\n(rows in backward order, output at the top)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
