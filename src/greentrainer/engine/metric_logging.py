"""What the loop reports besides its return value: each epoch's energy and carbon (with full fine-tuning's on the
same batches) and the step logs the trackers (--report-to) receive."""
from __future__ import annotations

import numpy as np

from ..energy import COMPONENTS, build_grid, step_emissions
from .checkpointing import EpochProgress


ENERGY_KEYS = ("energy_kwh", "co2_g", "energy_full_ft_reference_kwh", "co2_full_ft_reference_g")

TIMELINE_POINTS = 200  # per epoch, in metrics.json


def grid_of(cfg):
    """The run's grid intensity (a fixed figure or a trace) from its options."""
    return build_grid(cfg.carbon_intensity, cfg.carbon_trace, cfg.carbon_start, cfg.carbon_time_scale)


def epoch_energy(ctx, ep: EpochProgress, history: list, rec: dict) -> dict:
    """The epoch's energy (summed over processes), its carbon along the grid, and what full fine-tuning would
    have used and emitted on the same batches: this run's measured energy per FLOP × full fine-tuning's FLOPs
    of each step, at that step's grid intensity. ``timeline``: cumulative carbon per step (at most
    ``TIMELINE_POINTS`` of them)."""
    parts = {k: ctx.reduce_sum(float(ep.energy.get(k, 0.0))) for k in COMPONENTS}
    kwh_local = sum(float(ep.energy.get(k, 0.0)) for k in COMPONENTS)
    log = ep.step_log or [[ctx.global_step, ctx.train_seconds, 0.0, 0, 0]]
    g = [ctx.grid.intensity_at(t - dt / 2) for _, t, dt, _, _ in log]
    co2_steps = step_emissions(kwh_local, [x[2] for x in log], g)
    kwh, co2 = sum(parts.values()), ctx.reduce_sum(sum(co2_steps))
    per_flop = kwh / rec["flops_total"] if rec["flops_total"] else 0.0
    full_steps = [per_flop * x[4] * gi for x, gi in zip(log, g)]
    co2_full = ctx.reduce_sum(sum(full_steps))
    out = {"energy_kwh": kwh, **{f"energy_kwh_{k}": v for k, v in parts.items()}, "co2_g": co2,
           "carbon_intensity_g_per_kwh": co2 / kwh if kwh else g[-1],
           "energy_full_ft_reference_kwh": per_flop * rec["flops_full_ft_reference"], "co2_full_ft_reference_g": co2_full}
    scale = co2 / sum(co2_steps) if sum(co2_steps) else 0.0  # this process's steps stand for all processes'
    scale_full = co2_full / sum(full_steps) if sum(full_steps) else 0.0
    run_g = sum(h.get("co2_g", 0.0) for h in history)
    full_g = sum(h.get("co2_full_ft_reference_g", 0.0) for h in history)
    every = -(-len(log) // TIMELINE_POINTS)
    timeline = []
    for i, (x, gi, c, f) in enumerate(zip(log, g, co2_steps, full_steps)):
        run_g, full_g = run_g + c * scale, full_g + f * scale_full
        if i % every == 0 or i == len(log) - 1:
            t = ctx.grid.time_at(x[1])
            timeline.append({"step": x[0], "train_s": x[1], "trace_time": t, "g_per_kwh": gi, "co2_g": run_g,
                             "co2_full_ft_reference_g": full_g, "flops_fraction": x[3] / x[4] if x[4] else None})
    out["timeline"] = timeline
    return out


def log_step(ctx, recent_losses: list) -> None:
    """Loss, learning rate, measured FLOPs, the fraction of full fine-tuning so far and the trainable set, to
    the trackers (--report-to; every process takes part in the FLOPs sums, the first one writes)."""
    spent, reference = ctx.global_flops()
    trainable = [p for p in ctx.model.parameters() if p.requires_grad]
    ctx.accelerator.log({"train/loss": float(np.mean(recent_losses)),
                         "train/lr": float(ctx.scheduler.get_last_lr()[0]),
                         "flops/total": spent, "flops/full_ft_reference": reference,
                         "flops/fraction_of_full": spent / reference if reference else 0.0,
                         "trainable/tensors": len(trainable),
                         "trainable/params": sum(p.numel() for p in trainable)}, step=ctx.global_step)
