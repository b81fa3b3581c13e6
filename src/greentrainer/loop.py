"""The one training loop. Methods plug in through :class:`greentrainer.methods.base.Method`.

Every forward, backward and method overhead pass runs under a FLOPs counter, so the reported cost is what
was executed. The cost of full fine-tuning on the same batches is measured on a weightless (meta) copy,
which gives every run its fraction of full fine-tuning without running it.

Distribution and precision belong to one ``accelerate.Accelerator`` built by the caller (or here): each
optimizer step takes one *global batch* of ``batch_size × processes × grad_accum`` items, the same items
whatever the number of processes; each process runs its share as micro-batches, the loss of each is
weighted by its share of the global batch's target tokens, and the gradients of exactly the tensors that
are trainable now are summed over processes before the step (see :func:`greentrainer.engine.distributed.sync_gradients`), so a trainable
set that changes during training stays consistent on every process. Methods never see ranks or devices.
"""
from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import collate, target_tokens, typical_shape
from .energy import EnergyMeter, add_readings
from .engine.checkpointing import EpochProgress, restore_training_state, training_state
from .engine.context import TrainContext
from .engine.distributed import build_accelerator, global_batches
from .engine.memory import PeakMemory, enable_checkpointing, held_bytes
from .engine.metric_logging import ENERGY_KEYS, epoch_energy, grid_of, log_step
from .engine.precision import precision_of
from .engine.reference import reference_step_flops, run_profile
from .config import total_steps
from .errors import NonFiniteError
from .flops import meta_model_from_config
from .interrupts import critical


def step_key(model, batch: dict) -> tuple:
    """What a step's FLOPs depend on: the batch's tensor shapes and which parameters train."""
    shapes = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor))
    return shapes, tuple(n for n, p in model.named_parameters() if p.requires_grad)  # (names: --fsdp swaps objects)


def fmt_flops(x: float) -> str:
    """FLOPs in a readable unit (GFLOPs, TFLOPs or PFLOPs)."""
    for unit, scale in (("PFLOPs", 1e15), ("TFLOPs", 1e12)):
        if x >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x / 1e9:.3f} GFLOPs"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def eval_loss(model, ctx, data, batch_size: int, progress: bool = False) -> float:
    """Mean loss per target token over ``data`` (each process takes every world_size-th item); ``progress``: a
    bar for the pass (bound it with --max-val)."""
    model.eval()
    mine = data[ctx.accelerator.process_index:: ctx.world_size] if ctx.accelerator is not None else data
    passes = -(-len(data[0:: ctx.world_size]) // batch_size)  # the first process's (sharded: every one runs them)
    total, n = 0.0, 0
    for i in tqdm(range(0, passes * batch_size if ctx.sharded else len(mine), batch_size),
                  desc=f"validation loss ({len(data)} items)", leave=False, disable=not progress, dynamic_ncols=True):
        part = mine[i: i + batch_size]
        batch = ctx.collate(part or data[:1])  # (sharded: a stand-in pass, not counted)
        with ctx.autocast():
            loss = model(**batch).loss
        k = target_tokens(batch, ctx.seq2seq) if part else 0
        total += float(loss) * k
        n += k
    model.train()
    return ctx.reduce_sum(total) / max(ctx.reduce_sum(n), 1)


def check_finite_loss(loss, ctx) -> None:
    """Stop before a non-finite loss reaches the weights (sharded: every process stops together)."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if ctx.sharded:
        bad = ctx.reduce_sum(float(bad)) > 0
    if bad:
        raise NonFiniteError(f"non-finite training loss ({loss.item()}) at step {ctx.global_step + 1} "
                             f"(epoch {ctx.epoch + 1}); the learning rate ({ctx.cfg.lr:g}) may be too high")


def check_finite_grads(optimizer, ctx) -> None:
    """Stop before a non-finite gradient reaches the weights (one norm per trainable tensor)."""
    from .shards import local
    grads = [local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    bad = bool(grads) and not bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()))
    if ctx.sharded:  # each process holds slices: any non-finite slice stops every process
        bad = ctx.reduce_sum(float(bad)) > 0
    if bad:
        raise NonFiniteError(f"non-finite gradient at step {ctx.global_step + 1} (epoch {ctx.epoch + 1}); "
                             f"the learning rate ({ctx.cfg.lr:g}) may be too high")


@dataclasses.dataclass
class RunHandle:
    """What the caller of :func:`train` can see while it runs: the model being trained (the method may have
    wrapped it) and the optimizer steps completed, so an interrupted or failed run can save its weights."""

    model: torch.nn.Module | None = None
    global_step: int = 0
    optimizer: torch.optim.Optimizer | None = None  # the one in use (a method may have rebuilt it)


def train(model, tokenizer, method, train_data, val_data, cfg, device=None, *, log=print, progress=True,
          on_epoch_end=None, accelerator=None, resume: dict | None = None, on_checkpoint=None,
          live_counting: bool = False, handle: RunHandle | None = None, grid=None, energy_meter="auto") -> dict:
    """Train ``model`` with ``method``; returns per-epoch history and totals (FLOPs, time, memory), the
    FLOPs summed over processes. ``on_checkpoint(state)`` receives a :func:`training_state` every
    ``cfg.save_every`` optimizer steps (default: at the end of each epoch but the last); ``resume`` is such a
    state to continue from. ``grid``: the :class:`~greentrainer.energy.Grid` (default: from ``cfg``);
    ``energy_meter``: an :class:`~greentrainer.energy.EnergyMeter`, None for none, "auto" for one when
    ``cfg.track_energy``."""
    acc = accelerator or build_accelerator(device if device is not None else "cpu")
    device = acc.device if device is None or acc.num_processes > 1 else torch.device(device)
    seed_everything(cfg.seed)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    meta_model = meta_model_from_config(model.config)
    shape = typical_shape(train_data, cfg.batch_size, seq2seq)
    profile = run_profile(model.config, shape, cfg.gradient_checkpointing)
    model.to(device)
    main = acc.is_main_process
    ctx = TrainContext(model=model, tokenizer=tokenizer, cfg=cfg, device=device, train_data=train_data,
                       profile=profile, meta_model=meta_model, seq2seq=seq2seq, log=log if main else _silent,
                       accelerator=acc, live_counting=live_counting,
                       grid=grid if grid is not None else grid_of(cfg))
    if energy_meter == "auto":
        energy_meter = EnergyMeter(device) if cfg.track_energy else None
    ctx._probe_rng = random.Random(cfg.seed + 1)  # the same on every process: probes split one global batch
    generator = torch.Generator().manual_seed(cfg.seed)
    world, accum = acc.num_processes, ctx.micro_batches_per_step
    ctx.steps_per_epoch = -(-len(train_data) // (cfg.batch_size * world * accum))
    ctx.total_steps = total_steps(ctx.steps_per_epoch, cfg.epochs, cfg.max_steps)
    ref_cache: dict = {}  # full fine-tuning's FLOPs by batch shape
    ctx.planned_references = lambda: planned_references(ctx, cfg, generator, ref_cache)
    model = method.prepare(model, ctx)
    ctx.schedule_steps = method.schedule_steps(ctx.total_steps)
    if precision_of(cfg) == "bf16-true":
        model.to(torch.bfloat16)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.to(device)
    if cfg.fsdp and world > 1:
        from .engine.sharding import shard_model
        model = shard_model(model, ctx.log)
        method.rebind(model)
        ctx.sharded = True
    elif cfg.fsdp:
        ctx.log("--fsdp on one process: nothing to shard, the model trains whole")
    ctx.model = model
    if handle is not None:
        handle.model = model
    model.train()
    params = method.optimizer_parameters(model)
    if not params:
        raise RuntimeError(f"method {method.name} left no parameter to train")
    ctx.rebuild_optimizer(params)
    if precision_of(cfg) == "16-mixed":
        ctx.scaler = torch.amp.GradScaler(device.type)
    ctx.log(f"{world} process(es) × batch {cfg.batch_size} × {accum} accumulation step(s) = effective batch "
            f"{cfg.batch_size * world * accum}; precision {precision_of(cfg)}; {ctx.total_steps} optimizer steps")
    history = []
    start = restore_training_state(ctx, method, resume, history) if resume is not None else None
    if start is not None:
        ctx.log(f"resuming at optimizer step {ctx.global_step} (epoch {start.epoch + 1}, step "
                f"{start.steps_done + 1} of the epoch)")
    if handle is not None:
        handle.global_step, handle.optimizer = ctx.global_step, ctx.optimizer
    _epochs(ctx, method, generator, val_data, history, ref_cache, cfg, progress and main, on_epoch_end, start,
            on_checkpoint, handle, energy_meter)
    totals = {k: sum(h[k] for h in history) for k in
              ("flops_forward", "flops_backward", "flops_overhead", "flops_total", "flops_full_ft_reference",
               "time_s")}
    totals["flops_fraction_of_full"] = totals["flops_total"] / totals["flops_full_ft_reference"]
    if cfg.group_by_length or cfg.packing:  # the saving from grouping or packing, next to the method's
        totals["flops_full_ft_random_batches"] = sum(h["flops_full_ft_random_batches"] for h in history)
        totals["flops_fraction_of_full_random_batches"] = totals["flops_total"] / totals["flops_full_ft_random_batches"]
    totals["steps"] = ctx.global_step
    spent, reference = ctx.global_flops()
    totals.update(method.budget_report(spent, reference))  # a method with a FLOPs budget: was it kept?
    if energy_meter is not None:
        for k in ENERGY_KEYS:
            totals[k] = sum(h[k] for h in history)
        totals["energy"] = energy_meter.describe()
    else:
        totals["energy"] = {"kind": "off"}
    totals["peak_memory_bytes"] = max(h["peak_memory_bytes"] for h in history)
    totals["weights_and_optimizer_bytes"] = max(h.get("weights_and_optimizer_bytes", 0) for h in history)
    totals.update(method.trainable_summary(ctx.model))
    totals.update(world_size=world, grad_accum=accum, effective_batch_size=cfg.batch_size * world * accum,
                  precision=precision_of(cfg))
    return {"history": history, "totals": totals, "model": ctx.model, "profile_shape": list(shape)}


def _silent(*args, **kwargs) -> None:
    """Logging of processes other than the first."""


def _step_batches(ctx, micro: list[list[int]]) -> tuple[list[dict], set]:
    """This process's micro-batches of a step, and which of them are stand-ins: sharded, every process runs as
    many passes (FSDP's collectives), so an empty micro-batch (a short last step) runs one item at weight 0."""
    if not ctx.sharded:
        return [ctx.collate([ctx.train_data[j] for j in idx]) for idx in micro if idx], set()
    some = next((idx[:1] for idx in micro if idx), [0])
    return ([ctx.collate([ctx.train_data[j] for j in (idx or some)]) for idx in micro],
            {i for i, idx in enumerate(micro) if not idx})


def _optimizer_step(ctx, method, batches: list[dict], stand_ins: set = frozenset()) -> tuple[float, int, bool]:
    """One optimizer step over this process's micro-batches; returns (Σ loss·tokens, tokens) of this process and
    whether the weights were trained.

    Each micro-batch's mean loss is weighted by its share of the global batch's target tokens, so the
    gradient is that of the mean over all target tokens of the step, however the items are split over
    processes and micro-batches. A step the method skips (GreenTrainer's frontier policy) runs nothing but
    the schedule: (0.0, 0, False)."""
    model = ctx.model
    if method.skips_step(ctx):
        with critical():
            ctx.scheduler.step()
            ctx.global_step += 1
            method.after_optimizer_step(ctx)
        return 0.0, 0, False
    local = [0 if i in stand_ins else target_tokens(b, ctx.seq2seq) for i, b in enumerate(batches)]
    total = max(int(ctx.reduce_sum(sum(local))), 1)
    loss_sum = 0.0
    for batch, n in zip(batches, local):
        key = None if ctx.live_counting else step_key(model, batch)
        with ctx.count("forward", key), ctx.autocast():
            loss = model(**batch).loss
        if not loss.requires_grad:
            raise RuntimeError("no tensor is trainable in this step (everything is frozen)")
        check_finite_loss(loss, ctx)
        weighted = loss * (n / total)
        with ctx.count("backward", key):
            (ctx.scaler.scale(weighted) if ctx.scaler is not None else weighted).backward()
        loss_sum += loss.item() * n
    ctx.sync_gradients()
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)  # a non-finite gradient here makes the scaler skip the step
    else:
        check_finite_grads(ctx.optimizer, ctx)
    with critical():  # an interrupt never leaves a half-updated model
        if ctx.scaler is not None:
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
        else:
            ctx.optimizer.step()
        ctx.scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.global_step += 1
        method.after_optimizer_step(ctx)
    return loss_sum, sum(local), True


def _draw_steps(ctx, cfg, generator, epoch: int) -> tuple[list, list]:
    """(``epoch``'s steps, the same draw ungrouped) as the run takes them from ``generator``, which advances as an
    ungrouped draw would: each step is this process's micro-batches of item indices, the order cut at
    --max-steps; with --group-by-length the same draw grouped by length."""
    acc = ctx.accelerator
    cut = ctx.total_steps - epoch * ctx.steps_per_epoch
    state = generator.get_state()
    plain = global_batches(len(ctx.train_data), cfg.batch_size, acc.num_processes, ctx.micro_batches_per_step,
                           acc.process_index, generator)[:cut]
    if not cfg.group_by_length:
        return plain, plain
    after = generator.get_state()  # the next epoch draws as an ungrouped run would
    generator.set_state(state)
    grouped = global_batches(len(ctx.train_data), cfg.batch_size, acc.num_processes, ctx.micro_batches_per_step,
                             acc.process_index, generator, ctx.lengths)[:cut]
    generator.set_state(after)
    return grouped, plain


def _step_reference(ctx, cfg, ref_cache, batches: list[dict]) -> int:
    """Full fine-tuning's FLOPs on one step's micro-batches of this process (sharded: full FT would run the
    stand-ins too), what the loop counts after each step and the plan before the run."""
    return sum(reference_step_flops(ctx.meta_model, b, cfg.gradient_checkpointing, ref_cache) for b in batches)


def planned_references(ctx, cfg, generator, ref_cache) -> list[float]:
    """Full fine-tuning's FLOPs on each optimizer step of the whole run, summed over processes, in the order the
    run will take them (drawn from a copy of ``generator``, stand-ins included as the loop counts them)."""
    g = torch.Generator()
    g.set_state(generator.get_state())
    per_step = []
    for epoch in range(-(-ctx.total_steps // ctx.steps_per_epoch)):
        steps, _ = _draw_steps(ctx, cfg, g, epoch)
        per_step += [float(_step_reference(ctx, cfg, ref_cache, _step_batches(ctx, micro)[0])) for micro in steps]
    if ctx.world_size == 1:
        return per_step
    return [float(x) for x in ctx.reduce_sum(torch.tensor(per_step, dtype=torch.float64, device=ctx.device))]


def _reference_of(ctx, cfg, ref_cache, steps) -> float:
    """Full fine-tuning's FLOPs on these steps' batches (this process's share), by their padded shapes."""
    return sum(reference_step_flops(ctx.meta_model, ctx.collate([ctx.train_data[j] for j in idx]),
                                    cfg.gradient_checkpointing, ref_cache) for micro in steps for idx in micro if idx)


def _unpacked_reference(ctx, cfg, ref_cache, steps, epoch: int) -> float:
    """--packing: full fine-tuning's FLOPs on the examples of this process's packed rows this epoch, unpacked and
    shuffled (seeded by the run's seed and the epoch) into padded batches of --batch-size: what padding costs."""
    items = [e for micro in steps for idx in micro for j in idx for e in ctx.train_data[j].parts]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch)).tolist()
    pad_id = ctx.tokenizer.pad_token_id
    return sum(reference_step_flops(ctx.meta_model, collate([items[k] for k in order[i: i + cfg.batch_size]], pad_id,
                                                            ctx.seq2seq), cfg.gradient_checkpointing, ref_cache)
               for i in range(0, len(items), cfg.batch_size))


def _epochs(ctx, method, generator, val_data, history, ref_cache, cfg, progress, on_epoch_end,
            resume: EpochProgress | None = None, on_checkpoint=None, handle: RunHandle | None = None,
            meter=None):
    acc = ctx.accelerator
    save_every = cfg.save_every
    epochs = -(-ctx.total_steps // ctx.steps_per_epoch)  # --max-steps may end the run inside an epoch
    # the validation loss of the weights as they are; a trained step clears it (skipped steps, the fewer and
    # frontier policies', leave the weights and so the loss as they were). Resumed with no step trained since the
    # last epoch's end, the weights are that epoch's, so is the loss
    val_now = history[-1]["val_loss"] if history and not (resume is not None and resume.losses) else None

    def validate() -> float:
        nonlocal val_now
        if val_now is None:
            val_now = eval_loss(ctx.model, ctx, val_data, cfg.eval_batch_size, progress)
        return val_now

    for epoch in range(resume.epoch if resume else 0, epochs):
        ctx.epoch = epoch
        if resume is not None and resume.epoch == epoch:
            ep, resume = resume, None
            generator.set_state(ep.generator_state)
        else:
            ep = EpochProgress(epoch, generator.get_state(), flops_before=dict(ctx.flops),
                               reference_before=ctx.flops_reference)
        steps, ungrouped = _draw_steps(ctx, cfg, generator, epoch)
        padded_reference = None
        if cfg.group_by_length:  # the random batches' cost is what grouping saved
            padded_reference = _reference_of(ctx, cfg, ref_cache, ungrouped)
        elif cfg.packing:  # what full FT would have spent on these examples unpacked, in random padded batches
            padded_reference = _unpacked_reference(ctx, cfg, ref_cache, steps, epoch)
        if cfg.eval_steps and val_data and ctx.global_step == 0 and ep.steps_done == 0:
            ep.val_curve.append([0, validate(), *ctx.global_flops()])
        t0, bookkeeping = time.perf_counter(), 0.0
        trained_before = sum(h["time_s"] for h in history) + ep.elapsed
        ctx.train_seconds = trained_before
        if meter is not None:
            meter.start()
        with PeakMemory(ctx.device) as mem:
            if ep.steps_done == 0:
                method.on_epoch_start(ctx)
            bar = tqdm(steps, desc=f"epoch {epoch + 1}/{epochs} [{method.name}]", disable=not progress,
                       leave=False, dynamic_ncols=True, initial=ep.steps_done)
            for i, micro in enumerate(bar):
                if i < ep.steps_done:  # resumed: these steps are in the checkpoint
                    continue
                batches, stand_ins = _step_batches(ctx, micro)
                s0, flops0, ref0 = time.perf_counter(), sum(ctx.flops.values()), ctx.flops_reference
                method.on_step_start(ctx)
                loss_sum, n_tokens, trained = _optimizer_step(ctx, method, batches, stand_ins)
                if trained:
                    val_now = None
                if handle is not None:
                    handle.global_step, handle.optimizer = ctx.global_step, ctx.optimizer
                r0 = time.perf_counter()  # bookkeeping, not training: kept out of the epoch's time
                ctx.train_seconds = trained_before + r0 - t0 - bookkeeping
                ctx.flops_reference += _step_reference(ctx, cfg, ref_cache, batches)
                ep.step_log.append([ctx.global_step, ctx.train_seconds, r0 - s0, sum(ctx.flops.values()) - flops0,
                                    ctx.flops_reference - ref0])
                tokens = ctx.reduce_sum(n_tokens)
                if tokens:  # (a skipped batch has no loss)
                    ep.losses.append(ctx.reduce_sum(loss_sum) / tokens)
                ep.steps_done = i + 1
                if acc.trackers and ctx.global_step % cfg.logging_steps == 0 and ep.losses:
                    log_step(ctx, ep.losses[-cfg.logging_steps:])
                if cfg.eval_steps and val_data and ctx.global_step % cfg.eval_steps == 0 \
                        and ep.steps_done < len(steps):  # (the epoch's end computes it anyway)
                    ep.val_curve.append([ctx.global_step, validate(), *ctx.global_flops()])
                if ep.losses:
                    bar.set_postfix(loss=f"{ep.losses[-1]:.3f}")
                if on_checkpoint is not None and save_every and ctx.global_step % save_every == 0 \
                        and ep.steps_done < len(steps):
                    if meter is not None:
                        ep.energy = add_readings(ep.energy, meter.lap())
                    on_checkpoint(training_state(ctx, method, ep, history,
                                                 ep.elapsed + time.perf_counter() - t0 - bookkeeping))
                bookkeeping += time.perf_counter() - r0
        elapsed = ep.elapsed + time.perf_counter() - t0 - bookkeeping
        if meter is not None:
            ep.energy = add_readings(ep.energy, meter.stop())
        val = validate() if val_data else None
        if cfg.eval_steps and val is not None:
            ep.val_curve.append([ctx.global_step, val, *ctx.global_flops()])
        spent = {k: ctx.reduce_sum(float(ctx.flops[k] - ep.flops_before.get(k, 0))) for k in ctx.flops}
        ref_epoch = ctx.reduce_sum(float(ctx.flops_reference - ep.reference_before))
        total = sum(spent.values())
        peak = ctx.reduce_sum(float(mem.peak)) / acc.num_processes
        held = ctx.reduce_sum(float(held_bytes(ctx.model, ctx.optimizer))) / acc.num_processes
        rec = {"epoch": epoch + 1, "steps": len(steps), "train_loss": float(np.mean(ep.losses)) if ep.losses else None, "val_loss": val,
               "flops_forward": spent["forward"], "flops_backward": spent["backward"],
               "flops_overhead": spent["overhead"], "flops_total": total,
               "flops_full_ft_reference": ref_epoch, "flops_fraction_of_full": total / ref_epoch,
               "time_s": elapsed, "peak_memory_bytes": peak, "weights_and_optimizer_bytes": held,
               "step_time_median_s": float(np.median([x[2] for x in ep.step_log])) if ep.step_log else None,
               **method.epoch_report()}
        if meter is not None:
            rec.update(epoch_energy(ctx, ep, history, rec))
        if padded_reference is not None:
            rec["flops_full_ft_random_batches"] = ctx.reduce_sum(float(padded_reference))
        if cfg.eval_steps:
            rec["val_curve"] = ep.val_curve
        history.append(rec)
        val_text = f"{val:.4f}" if val is not None else "n/a"
        train_text = f"{rec['train_loss']:.4f}" if rec["train_loss"] is not None else "n/a (every batch skipped)"
        ctx.log(f"epoch {epoch + 1}: train loss {train_text}  val loss {val_text}  "
                f"{fmt_flops(total)} ({100 * rec['flops_fraction_of_full']:.1f}% of full FT)  "
                f"{elapsed:.1f} s  peak mem {peak / 2**20:.0f} MiB"
                + (f" (mean of {acc.num_processes} processes)" if acc.num_processes > 1 else ""))
        if acc.trackers:
            acc.log({f"epoch/{k}": v for k, v in rec.items() if isinstance(v, (int, float)) and v is not None},
                    step=ctx.global_step)
        if on_epoch_end is not None and acc.is_main_process:
            on_epoch_end(history)
        if on_checkpoint is not None and not save_every and epoch + 1 < epochs:
            on_checkpoint(training_state(ctx, method, EpochProgress(epoch + 1, generator.get_state(),
                                                                    flops_before=dict(ctx.flops),
                                                                    reference_before=ctx.flops_reference),
                                         history, 0.0))
