"""GreenTrainer for your own ``transformers.Trainer`` script, as a ``TrainerCallback``.

    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                      callbacks=[GreenTrainerCallback(rho=0.5)])

The Trainer builds its optimizer before ``on_train_begin``, while every tensor still requires grad, so
tensors selected later have optimizer state and really train. Selection runs at every epoch start (or
every ``select_every`` steps); its probe averages ``probe_batches`` optimizer steps' batches, paid within ρ.
As the CLI, the first 1/8 of the run is full fine-tuning (``full_warmup_steps``; 0: the paper's method), repaid
by the selections after it, so the run as a whole stays within ρ.

What it reports (in the Trainer's logs, under ``greentrainer/``, and in :attr:`GreenTrainerCallback.report`
with one summary line at the end): the measured FLOPs against full fine-tuning's on the same batches and,
with ``energy`` on (the default), the training's energy (CodeCarbon, as the CLI measures it; the Trainer's
own evaluations during training are included), its CO2 at ``carbon_intensity``, and what full fine-tuning
would have used and emitted (this run's energy per FLOP × full fine-tuning's FLOPs). A carbon trace and
carbon-aware ρ are the CLI's (``greentrainer train --carbon-trace``).
"""
from __future__ import annotations

import contextlib

import torch
from transformers import TrainerCallback

from .energy import COMPONENTS, EnergyMeter, add_readings, fmt_co2, fmt_energy, parse_intensity
from .errors import UsageError
from .flops import FlopCounter, unique_named_parameters
from .loop import within_budget
from .methods.greentrainer import (GreenTrainerConfig, can_pay_probe, check_budget, in_warmup, select_step,
                                   steps_governed, warmup_record, warmup_steps)


class GreenTrainerCallback(TrainerCallback):
    def __init__(self, rho: float = 0.6, importance: str = "dw_grad", select_every: int | None = None,
                 seq_len: int | None = None, energy: bool = True, carbon_intensity: str | float | None = None,
                 probe_batches: int = 1, full_warmup_steps: int | None = None, log=print):
        GreenTrainerConfig(rho=rho, importance=importance, select_every=select_every, probe_batches=probe_batches,
                           full_warmup_steps=full_warmup_steps).validate()  # UsageError
        if seq_len is not None and seq_len <= 0:
            raise UsageError(f"seq_len must be positive, got {seq_len}")
        self.rho, self.importance, self.select_every, self.seq_len, self.log = rho, importance, select_every, seq_len, log
        self.probe_batches = probe_batches  # training batches (steps) whose gradients the probe averages
        self.full_warmup_steps = full_warmup_steps  # None: 1/8 of the run, as the CLI; 0: the paper's method
        self.warmup = 0  # steps of full fine-tuning first, set from the run's length at its start
        self.selections: list[dict] = []
        self.current = None
        self.energy = energy
        # gCO2eq/kWh: a number, a country (ISO 3166 alpha-3) or a US state (USA/CA); default the world average
        self.intensity, self.intensity_source = parse_intensity(None if carbon_intensity is None
                                                                else str(carbon_intensity))
        self.report: dict = {}  # the run's totals, filled at the end of training
        self._meter, self._kwh = None, dict.fromkeys(COMPONENTS, 0.0)

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
        from .loop import enable_checkpointing, run_profile
        self._gc = bool(getattr(model, "is_gradient_checkpointing", False))
        if self._gc:  # the Trainer enabled it with input grads on, which runs every backward to the bottom:
            enable_checkpointing(model)  # keep the backward as short as the selection; the recompute is budgeted
        self.profile = run_profile(model.config, shape, self._gc)
        if hasattr(model, "peft_config"):  # a peft model: the selection is over its LoRA adapters
            self.profile = self._adapter_profile(model, shape)
        self.accum = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        self.steps_per_epoch = max(1, state.max_steps // max(1, int(args.num_train_epochs)))
        check_budget(self.profile, self.rho, (self.select_every or self.steps_per_epoch) * self.accum,
                     self.accum * self.probe_batches, "rho")
        self.warmup = warmup_steps(self.profile, self.rho, state.max_steps, self.full_warmup_steps, self.select_every,
                                   flag="full_warmup_steps", window=self.select_every or self.steps_per_epoch,
                                   probe_batches=self.probe_batches)
        if self.warmup and not self.current:
            self.log(f"GreenTrainer: full fine-tuning for the first {self.warmup} of {state.max_steps} steps, repaid "
                     f"by the selections after them (the run stays within ρ {self.rho})")
        for _, p in unique_named_parameters(model):
            p.requires_grad_(False)
        if self.current:  # resumed from a Trainer checkpoint: the selection it was training
            keep = set(self.current)
            for n, p in unique_named_parameters(model):
                p.requires_grad_(n in keep)
        # measured FLOPs: every training step and probe is counted; full fine-tuning's cost of the same
        # batches is measured on a weightless copy (with the same checkpointing)
        from .flops import meta_model_from_config
        self._meta, self._refs, self._counter, self._in_step = meta_model_from_config(model.config), {}, None, False
        self.flops = {"steps": 0, "probes": 0, "full_ft_reference": 0}
        self._hook = model.register_forward_pre_hook(self._reference, with_kwargs=True)
        if self.energy:
            self._meter = EnergyMeter(model.device)
            self._meter.start()

    def _adapter_profile(self, model, shape):
        """A LoRA model's adapters as the candidates (GreenTrainer --over lora); ρ stays a fraction of full
        fine-tuning of the base model."""
        from .methods.greentrainer import lora_profile
        config = model.peft_config[model.active_adapter]
        if getattr(config.peft_type, "value", config.peft_type) != "LORA":
            raise UsageError(f"GreenTrainerCallback selects over a LoRA model's adapters; a "
                             f"{getattr(config.peft_type, 'value', config.peft_type)} model is not supported")
        return lora_profile(model.get_base_model().config, config, shape, self.profile.t_full, self._gc)

    def _reference(self, module, args, kwargs):
        if not (self._in_step and module.training and "input_ids" in kwargs and "labels" in kwargs):
            return
        from .loop import reference_step_flops
        batch = {"input_ids": kwargs["input_ids"], "labels": kwargs["labels"]}
        counter = self._counter  # measuring the weightless copy (once per batch shape) is not this step's work
        if counter is not None:
            counter.__exit__(None, None, None)
        try:
            self.flops["full_ft_reference"] += reference_step_flops(self._meta, batch, self._gc, self._refs)
        finally:
            if counter is not None:
                counter.__enter__()

    def _debt(self) -> float:
        """FLOPs measured above ρ × full fine-tuning so far: repaid by the next selections, as in the loop."""
        return self.flops["steps"] + self.flops["probes"] - self.rho * self.flops["full_ft_reference"]

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
        r["within_budget"] = within_budget(r["flops"], self.rho * r["flops_full_ft_reference"],
                                           r["flops_full_ft_reference"])
        if self._meter is not None:
            self.report["energy"] = self._meter.describe()
            self._meter = None
        if state.is_world_process_zero:
            self.log(self._summary())

    def _totals(self, final: bool = False) -> dict:
        """FLOPs (and energy, CO2 and full fine-tuning's) so far, summed over the processes."""
        if self._meter is not None:
            self._kwh = add_readings(self._kwh, self._meter.stop() if final else self._meter.lap())
        spent, full, kwh = _sum_over_processes([self.flops["steps"] + self.flops["probes"],
                                                self.flops["full_ft_reference"],
                                                sum(self._kwh[k] for k in COMPONENTS)], self._device)
        out = {"flops": spent, "flops_full_ft_reference": full, "flops_fraction_of_full": spent / full if full else None,
               "trainable_tensors": len(self.current or ())}
        if self._meter is not None:
            ref = kwh * full / spent if spent else 0.0
            out.update(energy_kwh=kwh, co2_g=kwh * self.intensity, energy_full_ft_reference_kwh=ref,
                       co2_full_ft_reference_g=ref * self.intensity, carbon_intensity_g_per_kwh=self.intensity,
                       carbon_intensity_source=self.intensity_source)
        return out

    def _summary(self) -> str:
        r = self.report
        if r.get("flops_fraction_of_full") is None:
            return "GreenTrainer: no training step was measured"
        line = (f"GreenTrainer: {r['flops']:.3g} FLOPs measured = {100 * r['flops_fraction_of_full']:.1f}% of full "
                f"fine-tuning on the same batches (ρ {self.rho})")
        if "energy_kwh" in r:
            line += (f"; energy {fmt_energy(r['energy_kwh'])} ({r['energy']['kind']}, CodeCarbon) = "
                     f"{fmt_co2(r['co2_g'])} at {self.intensity:g} gCO2eq/kWh; full fine-tuning: "
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
                             f"{type(ddp).__name__} (FSDP and DeepSpeed shard what the selection changes)")
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

    def _select(self, state, model, optimizer, lr_scheduler, train_dataloader):
        # the probe steps the optimizer itself: the Trainer's wrappers would skip that step while gradients
        # accumulate (Δw = 0) or hand it to a gradient scaler (fp16)
        optimizer = getattr(optimizer, "optimizer", optimizer)
        lr_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        governs = steps_governed(state.global_step, state.max_steps, self.select_every or self.steps_per_epoch)
        ends_warmup = in_warmup(self.selections)
        if self.current and not ends_warmup and not can_pay_probe(self.profile, self.rho, governs, self.accum,
                                                                    self.probe_batches):
            self.log(f"GreenTrainer: keeping the selection: the {governs} step(s) left cannot pay for a probe")
            return
        done = state.global_step  # real batches are shorter than the profiled one: a probe weighs more
        scale = self.flops["full_ft_reference"] / (done * self.accum) / self.profile.t_full if done else 1.0
        batches = [self._batch(train_dataloader, model.device) for _ in range(self.accum * self.probe_batches)]
        chosen, rec = select_step(model, optimizer, lr_scheduler, (batches, [1 / len(batches)] * len(batches)),
                                  self.profile, self.rho, governs * self.accum,
                                  self.importance, previous=None if ends_warmup else self.current, log=self.log,
                                  agree=_first_process, count=self._count_probe, debt=self._debt, step_scale=scale,
                                  reduce_grads=_average_grads if self._world > 1 else None,
                                  repay_steps=(state.max_steps - done) * self.accum if self.warmup else None)
        rec.update(step=state.global_step, probe_batches=self.probe_batches, kind="probe")
        self.current = chosen
        self.selections.append(rec)

    def _select_or_warm_up(self, state, model, optimizer, lr_scheduler, train_dataloader):
        if state.global_step >= self.warmup:
            self._select(state, model, optimizer, lr_scheduler, train_dataloader)
        elif not in_warmup(self.selections):  # the full fine-tuning warm-up: every candidate trains, no probe
            names = list(self.profile.names)
            keep = set(names)
            for n, p in model.named_parameters():
                p.requires_grad_(n in keep)
            self.current = names
            self.selections.append(warmup_record(names, state.global_step))

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kw):
        self._stop_counting()
        if self.select_every is None:
            self._select_or_warm_up(state, model, optimizer, lr_scheduler, train_dataloader)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                      train_dataloader=None, **kw):
        self._stop_counting()
        if self.warmup and state.global_step == self.warmup and in_warmup(self.selections):
            self._select(state, model, optimizer, lr_scheduler, train_dataloader)  # the first, after the warm-up
        elif self.select_every is not None and state.global_step % self.select_every == 0:
            self._select_or_warm_up(state, model, optimizer, lr_scheduler, train_dataloader)
        self._counter, self._in_step = FlopCounter(), True  # counts this step's micro-batches, until on_step_end
        self._counter.__enter__()

    # -- the Trainer's checkpoints ------------------------------------------------------------------
    STATE_FILE = "greentrainer_callback.json"

    def on_save(self, args, state, control, **kw):
        """Keep the selection history next to the Trainer's checkpoint (resume_from_checkpoint restores it)."""
        import json
        import os
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            from pathlib import Path
            from .files import write_text_atomic
            write_text_atomic(Path(folder) / self.STATE_FILE,
                              json.dumps({"current": self.current, "selections": self.selections}, default=float))

    def load_state(self, checkpoint_dir: str) -> None:
        """Restore the selection saved with a Trainer checkpoint (call before ``trainer.train(resume_from_
        checkpoint=checkpoint_dir)``; the Trainer does not pass the folder to callbacks)."""
        import json
        import os
        path = os.path.join(checkpoint_dir, self.STATE_FILE)
        if not os.path.isfile(path):
            raise UsageError(f"{checkpoint_dir} holds no {self.STATE_FILE} (was it saved with GreenTrainerCallback?)")
        state = json.loads(open(path, encoding="utf-8").read())
        self.current, self.selections = state["current"], state["selections"]


def _average_grads(params) -> None:
    """Average ``params``' gradients over the processes (the probe's, and each step's trainable ones)."""
    from .loop import sync_gradients
    sync_gradients(params, _mean_over_processes)


def _sum_over_processes(xs: list[float], device=None) -> list[float]:
    """``xs`` summed over the processes in one all-reduce (themselves on one); ``device``: where the backend
    reduces (NCCL: the GPU)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(x) for x in xs]
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _mean_over_processes(t):
    import torch.distributed as dist
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _first_process(chosen):
    """Every process takes the first process's selection (their probes saw different batches)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return chosen
    box = [chosen]
    dist.broadcast_object_list(box, src=0)
    return box[0]
