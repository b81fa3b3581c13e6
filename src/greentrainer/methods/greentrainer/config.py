"""GreenTrainer's knobs: one dataclass, validated before any model is loaded (PEFT's config.py)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ...options import option
from ...errors import UsageError
from ..peft_methods import LoraOptions
from ..smt import BlockOptions

OVER = ("tensors", "lora", "blocks")
STEP_POLICIES = ("auto", "select", "frontier", "fewer")


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
    step_policy: str = option("auto", "what each step spends: auto (the measured winner: fewer, or select where the "
                                      "run asks for what only a selection does: --over lora/blocks, --select-every, "
                                      "--select-once, --rho-schedule, --carbon-aware, --full-warmup-steps; "
                                      "docs/results.md); select (every step trains the selection within "
                                        "ρ, the paper); frontier (each selection also weighs skipping the batch "
                                        "and (nearly) full steps by the probe's importances, and mixes the two kinds "
                                        "of step that gain most at ρ on average); fewer (no selection: every tensor "
                                        "trains for the first ρ of the run's steps, the learning-rate schedule "
                                        "spanning them, and the rest are skipped: full fine-tuning for fewer steps, "
                                        "the compute-matched baseline). frontier and fewer: --over tensors, the "
                                        "loop only", choices=STEP_POLICIES)

    @property
    def policy(self) -> str:
        """The step policy this run follows: ``step_policy``, with "auto" resolved to the measured winner. Full
        fine-tuning for the first ρ of the steps ("fewer") reached a lower validation loss than selecting tensors
        (and than the frontier policy) at the same FLOPs in every setting measured, with ROUGE-L not separating
        them (bench/results/accuracy_scitldr.md, accuracy_dialogsum_512steps_1epochs.md); a run that asks for
        what only a selection does gets the paper's "select"."""
        if self.step_policy != "auto":
            return self.step_policy
        selecting = (self.over != "tensors" or self.select_every is not None or self.select_once
                     or self.rho_schedule is not None or self.carbon_aware or self.full_warmup_steps is not None)
        return "select" if selecting else "fewer"

    def validate(self) -> None:
        self.check_options()
        if self.over == "lora":
            self.check_lora()
        if self.over == "blocks":
            self.check_blocks()
        if self.step_policy in ("frontier", "fewer") and self.over != "tensors":
            raise UsageError(f"--step-policy {self.step_policy} weighs the model's own tensors; it does not work "
                             f"with --over {self.over}")
        if self.step_policy == "fewer":
            given = [flag for flag, on in (("--select-every", self.select_every is not None),
                                           ("--select-once", self.select_once),
                                           ("--rho-schedule", self.rho_schedule is not None),
                                           ("--carbon-aware", self.carbon_aware),
                                           ("--full-warmup-steps", bool(self.full_warmup_steps))) if on]
            if given:
                raise UsageError(f"--step-policy fewer makes no selection (every tensor trains for the first ρ of "
                                 f"the steps); it takes no {given[0]}")
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
