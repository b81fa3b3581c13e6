"""GreenTrainer for your own ``transformers.Trainer`` script, as a ``TrainerCallback``.

    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    GreenTrainerCallback(rho=0.5).attach(trainer)

It drives the same :class:`~greentrainer.methods.greentrainer.GreenTrainerController` as the CLI's loop, so
every decision (when to select, the full fine-tuning warm-up, the FLOPs ledger, the ρ in force, what happens
to deselected tensors' optimizer state) is the loop's; this module only adapts the Trainer's events and
objects to it (:class:`TrainerHost`) and measures FLOPs and energy around the Trainer's own steps.

The Trainer builds its optimizer before ``on_train_begin``, while every tensor still requires grad, so
tensors selected later have optimizer state and really train; after each selection the state of tensors that
left it is freed (``deselected_state="drop"``).

What it reports (in the Trainer's logs, under ``greentrainer/``, and in :attr:`GreenTrainerCallback.report`
with one summary line at the end): the measured FLOPs against full fine-tuning's on the same batches and,
with ``energy`` on (the default), the training's energy (CodeCarbon, as the CLI measures it; the Trainer's
own evaluations during training are included), its CO2 at ``carbon_intensity`` (or along ``carbon_trace``),
and what full fine-tuning would have used and emitted (this run's energy per FLOP × full fine-tuning's FLOPs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import time

import torch
from transformers import TrainerCallback

from .energy import COMPONENTS, EnergyMeter, add_readings, fmt_co2, fmt_energy
from .errors import UsageError
from .engine.distributed import from_process_zero, sum_over_processes
from .flops import FlopCounter, unique_named_parameters
from .methods.greentrainer import GreenTrainerConfig, GreenTrainerController, within_budget


def _config_from_keywords(rho: float, options: dict) -> GreenTrainerConfig:
    """The callback's keyword arguments as a GreenTrainerConfig: the command line's option names without dashes
    (``selector_resolution``, ``smt_block``) or the config's field names; an unknown one is refused with the
    accepted names."""
    from .options import option_specs
    by_flag = {o.name: o.field for o in option_specs(GreenTrainerConfig)}
    fields = set(by_flag.values())
    unknown = sorted(k for k in options if k not in by_flag and k not in fields)
    if unknown:
        raise UsageError(f"GreenTrainerCallback: unknown option {unknown[0]!r}; accepted: {', '.join(sorted(by_flag))}")
    return GreenTrainerConfig(rho=rho, **{by_flag.get(k, k): v for k, v in options.items()})


class GreenTrainerCallback(TrainerCallback):
    """GreenTrainer in a ``transformers.Trainer``: the same :class:`~greentrainer.methods.greentrainer.controller.
    GreenTrainerController` the CLI's loop drives, here driven by the Trainer's events through a
    :class:`TrainerHost`. Every option of :class:`~greentrainer.methods.greentrainer.GreenTrainerConfig` is a
    keyword argument (``rho``, ``select_every``, ``select_once``, ``rho_schedule``, ``importance``,
    ``probe_batches``, ``full_warmup_steps``, ``selector_resolution``, ``carbon_aware``/``rho_min``/``rho_max``
    with ``carbon_trace``, ``deselected_state``); ``over="blocks"`` is refused (it swaps layers and rebuilds the
    optimizer, which the Trainer owns), and so are ``step_policy="frontier"`` and ``"fewer"`` (they skip batches;
    the default "auto" is "select" here), and a peft LoRA model is selected over its adapters (``over="lora"``).
    ``config``: a ready GreenTrainerConfig instead of the keywords."""

    STATE_FILE = "greentrainer_callback.pt"  # next to each Trainer checkpoint (read with weights_only)

    def __init__(self, rho: float = 0.6, *, seq_len: int | None = None, energy: bool = True,
                 carbon_intensity: str | float | None = None, carbon_trace: str | None = None,
                 carbon_start: str | None = None, carbon_time_scale: float = 1.0, log=print, config=None,
                 **options):
        from .energy import build_grid
        self.config = config if config is not None else _config_from_keywords(rho, options)
        self.config.validate()  # UsageError
        if self.config.over == "blocks":
            raise UsageError("GreenTrainerCallback: over='blocks' swaps in SMT's block layers and rebuilds the "
                             "optimizer at each selection, which the Trainer owns; use `greentrainer train --over "
                             "blocks`, or over='tensors' / a peft LoRA model here")
        if self.config.step_policy == "auto":  # the measured winner ("fewer") needs the schedule over ρ of the
            # steps, which the Trainer owns: here the paper's policy (docs/callback.md says how to run "fewer")
            self.config = dataclasses.replace(self.config, step_policy="select")
        if self.config.step_policy != "select":
            raise UsageError(f"GreenTrainerCallback: step_policy={self.config.step_policy!r} skips batches, which a "
                             f"callback cannot do in the Trainer's loop; use `greentrainer train --step-policy "
                             f"{self.config.step_policy}`, or step_policy='select' here")
        if seq_len is not None and seq_len <= 0:
            raise UsageError(f"seq_len must be positive, got {seq_len}")
        self.seq_len, self.log, self.energy = seq_len, log, energy
        # gCO2eq/kWh: a number, a country (ISO 3166 alpha-3) or a US state (USA/CA), or a trace; default the world
        # average. carbon_aware=True sets ρ at each selection from the trace (as the CLI's --carbon-aware).
        self.grid = build_grid(None if carbon_intensity is None else str(carbon_intensity), carbon_trace,
                               carbon_start, carbon_time_scale)
        if self.config.carbon_aware and carbon_trace is None:
            raise UsageError("GreenTrainerCallback: carbon_aware=True needs carbon_trace (a CSV of "
                             "'timestamp,gco2_per_kwh' rows)")
        self.controller = GreenTrainerController(self.config, flags="python")
        self._resume_state = None
        self.report: dict = {}  # the run's totals, filled at the end of training
        self._meter, self._kwh, self._co2 = None, dict.fromkeys(COMPONENTS, 0.0), 0.0

    # what tests and reports read; the controller holds it
    selections = property(lambda self: self.controller.selections)
    current = property(lambda self: self.controller.current)
    warmup = property(lambda self: self.controller.warmup)
    profile = property(lambda self: self.controller.profile)
    rho = property(lambda self: self.config.rho)

    def _batch(self, dataloader, device):
        it = getattr(self, "_it", None)
        try:
            batch = next(it)
        except (StopIteration, TypeError):
            self._it = iter(dataloader)
            batch = next(self._it)
        return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        self._world, self._device = args.world_size, model.device
        if self._world > 1:
            self._take_over_gradient_sync(model)
        batch = self._batch(train_dataloader, model.device)
        if "input_ids" not in batch or "labels" not in batch:
            raise UsageError(f"GreenTrainerCallback needs batches with input_ids and labels; got "
                             f"{', '.join(sorted(batch)) or 'no tensors'} (use a collator that adds labels)")
        ids, labels = batch["input_ids"], batch["labels"]
        seq2seq = getattr(model.config, "is_encoder_decoder", False)
        shape = (ids.shape[0], self.seq_len or ids.shape[1], labels.shape[1] if seq2seq else None)
        from .engine.memory import enable_checkpointing
        from .engine.reference import run_profile
        self._gc = bool(getattr(model, "is_gradient_checkpointing", False))
        if self._gc:  # the Trainer enabled it with input grads on, which runs every backward to the bottom:
            enable_checkpointing(model)  # keep the backward as short as the selection; the recompute is budgeted
        self.accum = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        config, lora_config = self.config, None
        if hasattr(model, "peft_config"):  # a peft model: the selection is over its LoRA adapters
            lora_config = model.peft_config[model.active_adapter]
            kind = getattr(lora_config.peft_type, "value", lora_config.peft_type)
            if kind != "LORA":
                raise UsageError(f"GreenTrainerCallback selects over a LoRA model's adapters; a {kind} model is "
                                 f"not supported")
            config = dataclasses.replace(config, over="lora")
        elif config.over == "lora":
            raise UsageError("GreenTrainerCallback: over='lora' needs a peft LoRA model (peft.get_peft_model) "
                             "handed to the Trainer, which builds its optimizer over the adapters")
        self.controller = GreenTrainerController(config, gradient_checkpointing=self._gc, flags="python",
                                                 lora_config=lora_config)
        if self._resume_state is not None:
            self.controller.load_state_dict(self._resume_state)
        self.host = TrainerHost(self, args, state, run_profile(model.config, shape, self._gc))
        self.host.update(state, model, kw.get("optimizer"), kw.get("lr_scheduler"), train_dataloader)
        self.controller.setup(model, self.host)
        if self.controller.current:  # resumed from a Trainer checkpoint: the selection it was training
            self.controller.reinstate(model, self.host)
        # measured FLOPs: every training step and probe is counted; full fine-tuning's cost of the same
        # batches is measured on a weightless copy (with the same checkpointing)
        from .flops import meta_model_from_config
        self._meta, self._refs, self._counter, self._in_step = meta_model_from_config(model.config), {}, None, False
        self.flops = {"steps": 0, "probes": 0, "full_ft_reference": 0}
        self._hook = model.register_forward_pre_hook(self._reference, with_kwargs=True)
        self._t0 = time.perf_counter()
        if self._resume_state is None or "probe_rng" not in self._resume_state:
            self._probe_rng = random.Random(args.seed + 1)  # the loop's probe draw: the same on every process
        if self.energy:
            self._meter = EnergyMeter(model.device)
            self._meter.start()

    def _reference(self, module, args, kwargs):
        if not (self._in_step and module.training and "input_ids" in kwargs and "labels" in kwargs):
            return
        from .engine.reference import reference_step_flops
        batch = {"input_ids": kwargs["input_ids"], "labels": kwargs["labels"]}
        counter = self._counter  # measuring the weightless copy (once per batch shape) is not this step's work
        if counter is not None:
            counter.__exit__(None, None, None)
        try:
            self.flops["full_ft_reference"] += reference_step_flops(self._meta, batch, self._gc, self._refs)
        finally:
            if counter is not None:
                counter.__enter__()

    @contextlib.contextmanager
    def _count_probe(self, kind):
        counter = FlopCounter()
        with counter:
            yield counter
        self.flops["probes"] += counter.total

    def on_step_end(self, args, state, control, **kw):
        self._stop_counting()

    def on_train_end(self, args, state, control, **kw):
        self._stop_counting()
        self._hook.remove()
        if getattr(self, "_sync_hook", None) is not None:
            self._sync_hook.remove()
            self._sync_hook = None
        self.report = self._totals(final=True)
        r = self.report  # kept to ρ? (batch shapes vary a little around the profiled one)
        allowed = self.controller.flops_allowed(r["flops_full_ft_reference"])
        r["flops_allowed_fraction"] = allowed / r["flops_full_ft_reference"] if r["flops_full_ft_reference"] else None
        r["within_budget"] = within_budget(r["flops"], allowed, r["flops_full_ft_reference"])
        if self._meter is not None:
            self.report["energy"] = self._meter.describe()
            self._meter = None
        if state.is_world_process_zero:
            self.log(self._summary())

    def _totals(self, final: bool = False) -> dict:
        """FLOPs (and energy, CO2 and full fine-tuning's) so far, summed over the processes."""
        if self._meter is not None:
            lap = self._meter.stop() if final else self._meter.lap()
            self._kwh = add_readings(self._kwh, lap)  # carbon at the grid's intensity now (fixed, or a trace's)
            self._co2 += sum(lap.get(k, 0.0) for k in COMPONENTS) * self.grid.intensity_at(self.host.train_seconds)
        spent, full, kwh, co2 = sum_over_processes([self.flops["steps"] + self.flops["probes"],
                                                    self.flops["full_ft_reference"],
                                                    sum(self._kwh[k] for k in COMPONENTS), self._co2], self._device)
        out = {"flops": spent, "flops_full_ft_reference": full, "flops_fraction_of_full": spent / full if full else None,
               "trainable_tensors": len(self.current or ())}
        if self._meter is not None:
            ref = kwh * full / spent if spent else 0.0
            g = co2 / kwh if kwh else self.grid.intensity
            out.update(energy_kwh=kwh, co2_g=co2, energy_full_ft_reference_kwh=ref, co2_full_ft_reference_g=ref * g,
                       carbon_intensity_g_per_kwh=g, carbon_intensity_source=self.grid.source)
        return out

    def _summary(self) -> str:
        r = self.report
        if r.get("flops_fraction_of_full") is None:
            return "GreenTrainer: no training step was measured"
        line = (f"GreenTrainer: {r['flops']:.3g} FLOPs measured = {100 * r['flops_fraction_of_full']:.1f}% of full "
                f"fine-tuning on the same batches (ρ {self.rho})")
        if "energy_kwh" in r:
            line += (f"; energy {fmt_energy(r['energy_kwh'])} ({r['energy']['kind']}, CodeCarbon) = "
                     f"{fmt_co2(r['co2_g'])} at {r['carbon_intensity_g_per_kwh']:g} gCO2eq/kWh; full fine-tuning: "
                     f"{fmt_energy(r['energy_full_ft_reference_kwh'])} = {fmt_co2(r['co2_full_ft_reference_g'])}")
        if not r["within_budget"]:
            line += (f"; warning: above ρ {self.rho}: the steps after an overspend were too few to repay it (select "
                     f"less often, probe fewer batches or shorten the warm-up)")
        return line

    def _stop_counting(self):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops["steps"] += self._counter.total
            self._counter, self._in_step = None, False

    def on_log(self, args, state, control, logs=None, model=None, **kw):
        """Measured FLOPs and the fraction of full fine-tuning into the Trainer's logs (report_to integrations
        see them when this callback runs first: :meth:`attach`)."""
        if logs is None or not hasattr(self, "flops"):
            return
        for k, v in self._totals().items():
            if isinstance(v, (int, float)):
                logs[f"greentrainer/{k}"] = float(v)

    def attach(self, trainer) -> "GreenTrainerCallback":
        """Add this callback to ``trainer`` ahead of the others, so the loggers it reports to see its values
        (needed on several processes, where the callback takes over DDP's gradient sync)."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._trainer = trainer
        return self

    # -- several processes ----------------------------------------------------------------------------
    def _take_over_gradient_sync(self, model) -> None:
        """DDP's reducer serves the tensors that required grad when it wrapped the model, so it cannot follow a
        trainable set that changes. Its sync is turned off, and at the end of each synchronising backward the
        gradients of exactly the trainable tensors are averaged over processes (before the Trainer clips them),
        as the engine does; the probe's gradients are averaged too, so every process scores the same."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            raise UsageError("GreenTrainerCallback on several processes: add it with "
                             "GreenTrainerCallback(...).attach(trainer) (it takes over DDP's gradient sync)")
        ddp = trainer.model_wrapped
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise UsageError(f"GreenTrainerCallback on several processes needs plain DDP; the model is wrapped in "
                             f"{type(ddp).__name__}: the Trainer's FSDP/DeepSpeed wrap the model before the "
                             f"selection exists (for sharded training use `greentrainer train --fsdp`)")
        ddp.require_backward_grad_sync = False  # Accelerate's no_sync() restores this value, so it stays off
        self._sync_hook = model.register_forward_hook(self._queue_sync)

    def _queue_sync(self, module, args, output):
        logits = getattr(output, "logits", None)
        if self._in_step and module.training and logits is not None and logits.requires_grad:
            logits.register_hook(self._on_backward)

    def _on_backward(self, grad):
        from accelerate.state import GradientState
        if GradientState().sync_gradients:  # the last micro-batch of an accumulated step
            torch.autograd.Variable._execution_engine.queue_callback(self._average_trainable_grads)
        return grad

    def _average_trainable_grads(self) -> None:
        _average_grads([p for _, p in unique_named_parameters(self._trainer.model) if p.requires_grad])

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kw):
        self._stop_counting()
        self.host.update(state, model, optimizer, lr_scheduler, train_dataloader)
        self.controller.on_epoch_start(self.host)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                      train_dataloader=None, **kw):
        self._stop_counting()
        self.host.update(state, model, optimizer, lr_scheduler, train_dataloader)
        self.controller.on_step_start(self.host)
        self._counter, self._in_step = FlopCounter(), True  # counts this step's micro-batches, until on_step_end
        self._counter.__enter__()

    # -- the Trainer's checkpoints ------------------------------------------------------------------
    def on_save(self, args, state, control, **kw):
        """Keep the controller's state (selections, FLOPs ledger, host copies of optimizer state) next to the
        Trainer's checkpoint; :meth:`load_state` restores it."""
        import os
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            from pathlib import Path
            from .files import write_bytes_atomic
            from .engine.checkpointing import plain
            buf = io.BytesIO()
            torch.save({**plain(self.controller.state_dict()), "probe_rng": self._probe_rng.getstate()}, buf)
            write_bytes_atomic(Path(folder) / self.STATE_FILE, buf.getvalue())

    def load_state(self, checkpoint_dir: str) -> None:
        """Restore the controller's state saved with a Trainer checkpoint (call before ``trainer.train(resume_
        from_checkpoint=checkpoint_dir)``; the Trainer does not pass the folder to callbacks)."""
        import os
        path = os.path.join(checkpoint_dir, self.STATE_FILE)
        if not os.path.isfile(path):
            raise UsageError(f"{checkpoint_dir} holds no {self.STATE_FILE} (was it saved with GreenTrainerCallback?)")
        self._resume_state = torch.load(path, map_location="cpu", weights_only=True)
        self.controller.load_state_dict(self._resume_state)
        from .rng import as_tuples
        self._probe_rng = random.Random()
        self._probe_rng.setstate(as_tuples(self._resume_state["probe_rng"]))


class TrainerHost:
    """The controller's view of a Trainer run (the host described in :mod:`~greentrainer.methods.greentrainer.
    controller`): the Trainer's model, optimizer and schedule, its step counters, probe batches drawn from its
    dataloader, and the callback's FLOPs counters."""

    sharded = False  # a Trainer under FSDP is refused (see GreenTrainerCallback.attach)

    def __init__(self, callback: GreenTrainerCallback, args, state, profile):
        self.cb, self.profile = callback, profile
        self.gradient_checkpointing = callback._gc
        self.world_size = args.world_size
        self.micro_batches_per_step = callback.accum
        self.total_steps = state.max_steps
        self.steps_per_epoch = max(1, state.max_steps // max(1, int(args.num_train_epochs)))
        self.grid = callback.grid
        self.batch_size = args.per_device_train_batch_size
        self.rank = args.process_index
        self.seq2seq = False
        self.log = callback.log if state.is_world_process_zero else (lambda *a, **k: None)

    def update(self, state, model, optimizer, lr_scheduler, dataloader) -> None:
        """The Trainer's objects at this event (its wrappers skip the probe's step while gradients accumulate
        or hand it to a gradient scaler, so the probe steps the optimizer itself)."""
        self.model, self.dataloader = model, dataloader
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        self.global_step, self.epoch = state.global_step, int(state.epoch or 0)

    @property
    def train_seconds(self) -> float:
        return time.perf_counter() - getattr(self.cb, "_t0", time.perf_counter())

    def sample_batches(self, steps: int = 1):
        """A random global batch of the training set for a probe, split as the loop splits it: this process's
        micro-batches and each one's share of the global batch's target tokens (the loop's draw: the same
        items for the same seed and data). An iterable dataset: the next batches of the dataloader instead."""
        from .data import target_tokens
        from .engine.distributed import shard
        ds, device = getattr(self.dataloader, "dataset", None), self.model.device
        if ds is None or not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
            batches = [self.cb._batch(self.dataloader, device) for _ in range(self.micro_batches_per_step * steps)]
            return batches, [1 / len(batches)] * len(batches)
        world, accum = self.world_size, self.micro_batches_per_step * steps
        items = self.cb._probe_rng.sample(range(len(ds)), min(self.batch_size * world * accum, len(ds)))
        batches = [{k: v.to(device) for k, v in self.dataloader.collate_fn([ds[i] for i in m]).items()
                    if isinstance(v, torch.Tensor)} for m in shard(items, world, accum, self.rank) if m]
        tokens = [target_tokens(b, self.seq2seq) for b in batches]
        total = max(sum_over_processes([sum(tokens)], self.cb._device)[0], 1)
        return batches, [t / total for t in tokens]

    def count(self, kind: str):
        return self.cb._count_probe(kind)

    def autocast(self):
        return contextlib.nullcontext()  # the probe runs in the model's own dtype

    def reduce_gradients(self, params) -> None:
        """The probe's gradients summed over processes (each micro-batch is weighted by its share of the global
        batch's target tokens, so the sum is the global batch's gradient, as in the loop)."""
        from .engine.distributed import reduce_sum, sync_gradients
        sync_gradients(params, reduce_sum)

    def broadcast(self, obj):
        return from_process_zero(obj)

    def global_flops(self) -> tuple[float, float]:
        f = self.cb.flops
        spent, reference = sum_over_processes([f["steps"] + f["probes"], f["full_ft_reference"]], self.cb._device)
        return spent, reference

    def expected_step_scale(self) -> float:
        return 1.0  # the profile is at the first batch's shape

    def rebuild_optimizer(self, params) -> None:
        raise UsageError("GreenTrainerCallback cannot rebuild the Trainer's optimizer (over='blocks')")


def _average_grads(params) -> None:
    """Average ``params``' gradients over the processes (each step's trainable ones, as DDP would)."""
    from .engine.distributed import mean_over_processes, sync_gradients
    sync_gradients(params, mean_over_processes)
