"""Checkpoints of the loop: everything needed to continue a run exactly (weights, optimizer, schedule, scaler,
every RNG, the data position, the method's state, FLOPs counters and history), as tensors and plain Python
only, so it loads with ``torch.load(weights_only=True)``. With --fsdp the weights and optimizer state are
written apart, by every process, through torch.distributed.checkpoint (:mod:`.sharding`)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..rng import as_tuples, rng_state, set_rng_state


@dataclasses.dataclass
class EpochProgress:
    """Where an epoch stands: enough to continue it from a checkpoint exactly."""

    epoch: int
    generator_state: torch.Tensor      # the data-order generator before this epoch's permutation
    steps_done: int = 0
    flops_before: dict = dataclasses.field(default_factory=dict)
    reference_before: float = 0.0
    losses: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    val_curve: list = dataclasses.field(default_factory=list)  # [optimizer step, validation loss] (--eval-steps)
    energy: dict = dataclasses.field(default_factory=dict)     # kWh by component so far (this process)
    step_log: list = dataclasses.field(default_factory=list)   # [step, train s at its end, its s, FLOPs, reference]


def plain(x):
    """numpy scalars and arrays as Python numbers and lists (what ``weights_only`` loading accepts)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(plain(v) for v in x)
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return x


def summed(ctx, x):
    """FLOPs counters (a number or {kind: number}) summed over processes: each process counts what it ran, and
    the checkpoint keeps the sums; on resume the first process takes them and the others start at 0 (every
    report sums over processes), whatever the number of processes then."""
    if isinstance(x, dict):
        return {k: summed(ctx, v) for k, v in x.items()}
    return plain(ctx.reduce_sum(x))


def _own_share(ctx, x):
    """The part of a :func:`summed` counter this process takes back."""
    first = ctx.accelerator is None or ctx.accelerator.process_index == 0
    if isinstance(x, dict):
        return {k: _own_share(ctx, v) for k, v in x.items()}
    return x if first else 0


def training_state(ctx, method, ep: EpochProgress, history: list, elapsed: float) -> dict:
    """Everything needed to continue exactly: weights, optimizer, scheduler, scaler, every RNG, the data
    position, the method's state, FLOPs counters and history (tensors and plain Python only, so it loads
    with ``torch.load(weights_only=True)``)."""
    weights = {"sharded": {}} if ctx.cfg.fsdp else {  # --fsdp: every process writes its slices (run.py)
        "model": {k: v.detach().clone() for k, v in ctx.model.state_dict().items()},
        "optimizer": ctx.optimizer.state_dict()}
    return {**weights, "world_size": ctx.world_size, "grad_accum": ctx.micro_batches_per_step,
            "scheduler": ctx.scheduler.state_dict(),
            "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
            "method": plain(method.state_dict()), "rng": rng_state(), "probe_rng": ctx._probe_rng.getstate(),
            "global_step": ctx.global_step, "flops": summed(ctx, ctx.flops),
            "flops_reference": summed(ctx, ctx.flops_reference), "history": plain(history),
            "epoch": {"epoch": ep.epoch, "generator_state": ep.generator_state, "steps_done": ep.steps_done,
                      "flops_before": summed(ctx, ep.flops_before), "reference_before": summed(ctx, ep.reference_before),
                      "losses": ep.losses, "elapsed": elapsed, "val_curve": ep.val_curve,
                      "energy": ep.energy, "step_log": ep.step_log}}


def restore_training_state(ctx, method, state: dict, history: list) -> EpochProgress:
    """Put a :func:`training_state` back (the method first: it may rebuild the optimizer, e.g. SMT)."""
    method.load_state_dict(state["method"], ctx)
    if "sharded" in state:  # written by torch.distributed.checkpoint, on any number of processes
        from .sharding import load_sharded
        load_sharded(state["shards_path"], ctx.model, ctx.optimizer, state["sharded"])
    else:
        ctx.model.load_state_dict(state["model"])
        ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scheduler.load_state_dict(state["scheduler"])
    if ctx.scaler is not None and state.get("scaler"):
        ctx.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    ctx._probe_rng.setstate(as_tuples(state["probe_rng"]))
    ctx.global_step, ctx.flops, ctx.flops_reference = state["global_step"], _own_share(ctx, dict(state["flops"])), \
        _own_share(ctx, state["flops_reference"])
    history.extend(state["history"])
    e = state["epoch"]
    return EpochProgress(e["epoch"], e["generator_state"], e["steps_done"], _own_share(ctx, dict(e["flops_before"])),
                         _own_share(ctx, e["reference_before"]), list(e["losses"]), e["elapsed"], list(e.get("val_curve", [])),
                         dict(e.get("energy", {})), [list(x) for x in e.get("step_log", [])])
