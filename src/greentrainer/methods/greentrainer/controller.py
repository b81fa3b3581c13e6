"""Every decision GreenTrainer makes during a run, in one place, for any driver: the training loop's method
(:mod:`.method`) and the ``transformers.Trainer`` callback (:mod:`greentrainer.callback`) both drive this
controller, so the two cannot disagree.

It decides when to select (each epoch, every K steps or once, after the full fine-tuning warm-up), the ρ in
force (fixed, scheduled or carbon-aware), what the FLOPs ledger allows and owes, how deep the probe may go
within that, and what happens to the optimizer state of tensors that leave the selection.

The driver hands it a *host*: what the controller may look at and act on, and nothing about devices or
ranks beyond the reductions it asks for::

    model, optimizer, scheduler            the model being trained, its (unwrapped) optimizer and schedule
    profile, gradient_checkpointing        the run's tensor FLOPs profile at its typical batch shape
    global_step, total_steps, steps_per_epoch, epoch, micro_batches_per_step, world_size
    grid, train_seconds                    the grid intensity and the training clock (carbon-aware ρ)
    sample_batches(k) -> (batches, weights)   a probe batch of k optimizer steps' worth
    count(kind)                            context manager: the FLOPs executed inside are the run's
    autocast()                             the run's precision for the probe's forward
    reduce_gradients(params), broadcast(obj), global_flops() -> (spent, full fine-tuning's)
    sharded, sum_shards(scores)            (--fsdp) each process holds slices: per-tensor sums over them
    expected_step_scale()                  a step's full fine-tuning FLOPs over the profile's, before any step
    rebuild_optimizer(params)              (``over="blocks"`` only) a new optimizer over new tensors
    log(message)
"""
from __future__ import annotations

from ...errors import UsageError
from ...selection import rho_to_backward_budget
from .budget import (FlopsLedger, can_pay_probe, check_budget, deepest_reachable, full_steps_within,
                     smallest_feasible_rho, step_allowance, steps_governed, warmup_steps)
from .candidates import CANDIDATES
from .config import load_rho_schedule
from .step_policy import Mix, frontier, mix_at

DESELECTED_STATE = ("drop", "cpu", "keep")


def warmup_record(names, step: int, **extra) -> dict:
    """The selection record of the full fine-tuning warm-up: every candidate trains, no probe."""
    return {"rho": 1.0, "n_selected": len(names), "selected": list(names), "step": step, **extra,
            "kind": "warm-up", "note": "full fine-tuning warm-up"}


def in_warmup(selections: list[dict]) -> bool:
    """Whether the last selection record is the warm-up's (the next selection ends it, whatever ρ allows)."""
    return bool(selections) and selections[-1].get("kind") == "warm-up"


class GreenTrainerController:
    """GreenTrainer's decisions for one run (see the module docstring for the host it is driven through).

    ``flags``: how errors name the options, ``"cli"`` (``--full-warmup-steps``) or ``"python"``
    (``full_warmup_steps``, the callback's keyword arguments). ``lora_config``: a peft model's own LoRA
    config (the callback, handed a LoRA model); the loop builds one from ``cfg``."""

    def __init__(self, cfg, base_model: str | None = None, gradient_checkpointing: bool = False,
                 flags: str = "cli", lora_config=None, deselected_state: str | None = None):
        self.cfg = cfg
        self.base_model = base_model  # --over lora: the name saved with the adapter
        self.flags = flags
        self.candidates = CANDIDATES[getattr(cfg, "over", "tensors")](cfg, gradient_checkpointing, lora_config)
        self.schedule = load_rho_schedule(cfg.rho_schedule) if cfg.rho_schedule else {}
        self.selections: list[dict] = []
        self.epoch_selections: list[dict] = []
        self.current: list[str] | None = None
        self.selected_at: int | None = None
        self.warmup = 0  # steps of full fine-tuning first (set by check() from the run's length)
        self.full_steps: int | None = None  # step_policy "fewer": the steps that train (the first ρ of the run)
        mode = deselected_state or getattr(cfg, "deselected_state", None) or "drop"
        if mode not in DESELECTED_STATE:
            raise UsageError(f"deselected_state must be one of {', '.join(DESELECTED_STATE)}, got {mode!r}")
        self.deselected_state = mode
        self.offloaded: dict[str, dict] = {}  # "cpu": name -> {state key: (host tensor, original device)}
        self.ledger = FlopsLedger(cfg.rho)
        self.rho_range = (cfg.rho, cfg.rho)  # carbon-aware: (ρ at the dirtiest grid, ρ at the cleanest)
        self.mix: Mix | None = None  # step_policy "frontier": the two kinds of step this window mixes
        self.skip = False            # the step about to run skips its batch
        self.steps_by_kind = {"skip": 0, "partial": 0, "full": 0}  # this epoch's steps (frontier policy)

    def flag(self, name: str) -> str:
        return "--" + name.replace("_", "-") if self.flags == "cli" else name

    # -- set-up ----------------------------------------------------------------------------------
    def check(self, model, profile, steps_per_epoch: int, total_steps: int, micro_batches: int = 1) -> None:
        """Refuse a ρ (schedule, carbon-aware range, warm-up) the run cannot keep; sets the warm-up's length."""
        if self.cfg.policy == "fewer":  # full steps cost full FT's FLOPs: any ρ buys its share of them
            self.full_steps = int(self.cfg.rho * total_steps + 1e-9)  # (setup counts them on the run's batches)
            if self.full_steps < 1:
                raise UsageError(f"{self.flag('rho')} {self.cfg.rho} with --step-policy fewer{self._auto} leaves no "
                                 f"full step of the run's {total_steps}; at least {1 / max(total_steps, 1):.3g}")
            return
        profile = self.candidates.profile(model, profile)
        steps = self.window(steps_per_epoch, total_steps) * micro_batches
        probe = micro_batches * self.cfg.probe_batches  # micro-batches one probe runs
        for rho in {self.cfg.rho, *self.schedule.values()}:
            check_budget(profile, rho, steps, probe, self.flag("rho"))
        if self.cfg.carbon_aware:
            lo, hi = self.cfg.rho_min, self.cfg.rho_max
            if lo is None:
                lo = max(self.cfg.rho - 0.2, smallest_feasible_rho(profile, steps, probe) or 1.0)
            hi = min(self.cfg.rho + 0.2, 1.0) if hi is None else hi
            self.rho_range = (min(lo, hi), hi)
            check_budget(profile, self.rho_range[0], steps, probe, self.flag("rho_min"))
        self.warmup = warmup_steps(profile, self.cfg.rho, total_steps, self.cfg.full_warmup_steps,
                                   self.cfg.select_every, bool(self.schedule), flag=self.flag("full_warmup_steps"),
                                   window=self.window(steps_per_epoch, total_steps),
                                   probe_batches=self.cfg.probe_batches)

    def setup(self, model, host):
        """Wrap the model if the candidates need it, check the run, freeze everything; returns the model to
        train (its optimizer is built over :meth:`optimizer_parameters`)."""
        model = self.candidates.wrap(model)
        self.profile = self.candidates.profile(model, host.profile)
        self.names = self.profile.names
        self.params = self.candidates.parameters(model, self.names)
        self.candidates.prepare(model, host)
        missing = [n for n in self.names if n not in self.params]
        if missing:
            raise RuntimeError(f"profile names not found in the model: {missing[:3]}")
        self.check(model, host.profile, host.steps_per_epoch, host.total_steps, host.micro_batches_per_step)
        if self.full_steps is not None:  # exactly: the first steps whose full FT FLOPs fit ρ of the whole run's
            self.full_steps = full_steps_within(host.planned_references(), self.cfg.rho)
            if self.full_steps < 1:
                raise UsageError(f"{self.flag('rho')} {self.cfg.rho} with --step-policy fewer{self._auto} leaves no "
                                 f"full step: the run's first step alone costs more than ρ of the run")
        if self.full_steps is not None and not self.current:
            host.log(f"GreenTrainer: step policy fewer: every tensor trains for the first {self.full_steps} of "
                     f"{host.total_steps} steps (the learning-rate schedule spans them); the other "
                     f"{host.total_steps - self.full_steps} are skipped")
        elif self.warmup and not self.current:
            host.log(f"GreenTrainer: full fine-tuning for the first {self.warmup} of {host.total_steps} steps, "
                     f"repaid by the selections after them (the run stays within ρ {self.cfg.rho})")
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def optimizer_parameters(self) -> list:
        return list(self.params.values())  # frozen tensors have no grad, so AdamW skips them

    def flops_allowed(self, reference: float) -> float:
        """Σ over the selections of the ρ in force × the full fine-tuning FLOPs it governed."""
        return self.ledger.allowed(reference)

    # -- when to select ----------------------------------------------------------------------------
    @property
    def _auto(self) -> str:
        auto = self.cfg.step_policy == "auto"
        return " (the default, auto; --step-policy select selects tensors instead)" if auto else ""

    def schedule_steps(self, total_steps: int) -> int:
        """Optimizer steps the learning-rate schedule spans: the run's, or under "fewer" the steps that train
        (a full schedule over the shorter run, not a long one cut short)."""
        return total_steps if self.full_steps is None else self.full_steps

    def window(self, steps_per_epoch: int, total_steps: int) -> int:
        """Optimizer steps between selection points."""
        if self.cfg.select_once:
            return total_steps or 1
        if self.cfg.select_every is not None:
            return min(self.cfg.select_every, total_steps or self.cfg.select_every)
        return steps_per_epoch or 1

    def on_epoch_start(self, host) -> None:
        self.epoch_selections = []
        self.steps_by_kind = dict.fromkeys(self.steps_by_kind, 0)
        if self.full_steps is not None:  # "fewer": every tensor trains, from the first step, no probe
            if self.current is None:
                self._train_everything(host, kind="fewer", note=f"every tensor, for the first {self.full_steps} "
                                                                f"steps (step policy fewer)")
            return
        if self.cfg.select_every is None and (not self.cfg.select_once or self.current is None):
            self._select_or_warm_up(host)

    def on_step_start(self, host) -> None:
        warm = self.warmup
        if warm and host.global_step == warm and self.selected_at != warm:
            self.select(host)  # the first selection, right after the warm-up
        elif self.cfg.select_every is not None and host.global_step % self.cfg.select_every == 0:
            self._select_or_warm_up(host)
        self.skip = False
        if self.mix is not None:
            self._take(self.mix.next())
        elif self.full_steps is not None:
            self.skip = host.global_step >= self.full_steps
            self.steps_by_kind["skip" if self.skip else "full"] += 1

    def _take(self, option) -> None:
        """Make this step train ``option``'s tensors, or skip its batch."""
        self.skip = option.skip
        kind = "skip" if option.skip else "full" if len(option.names) == len(self.names) else "partial"
        self.steps_by_kind[kind] += 1
        keep = set(option.names)
        for n, p in self.params.items():
            p.requires_grad_(n in keep)

    def after_optimizer_step(self, host) -> None:
        self.candidates.after_optimizer_step()

    def _select_or_warm_up(self, host) -> None:
        if host.global_step < self.warmup:
            self._train_everything(host)
        else:
            self.select(host)

    def _train_everything(self, host, **kind) -> None:
        """The full fine-tuning warm-up (its extra FLOPs are repaid later), or the "fewer" policy's steps: every
        tensor trains, no probe. ``kind``: the record's kind and note, if not the warm-up's."""
        self.mix = None
        for p in self.params.values():
            p.requires_grad_(True)
        rec = {**warmup_record(self.names, host.global_step, epoch=host.epoch + 1), **kind}
        rec.update(self.follow_selection(host.model, host.optimizer, self.names))
        self.current, self.selected_at = list(self.names), host.global_step
        self.selections.append(rec)
        self.epoch_selections.append(rec)

    # -- ρ in force ----------------------------------------------------------------------------------
    def rho_now(self, host) -> float:
        """ρ for a selection now: carbon-aware from the grid intensity at the run's clock, else the schedule's."""
        if not self.cfg.carbon_aware:
            return self.rho_at(host.global_step)
        from ...energy import carbon_aware_rho
        g = host.grid.intensity_at(host.train_seconds)
        return host.broadcast(round(carbon_aware_rho(g, host.grid.lo, host.grid.hi, *self.rho_range), 4))

    def rho_at(self, step: int) -> float:
        rho = self.cfg.rho
        for s, r in self.schedule.items():
            if s <= step:
                rho = r
        return rho

    # -- a selection -----------------------------------------------------------------------------------
    def select(self, host) -> list[str]:
        """Probe and select; with several processes the FLOPs are summed over them and each repays its
        share, the probe measures the global step, and all take the first process's selection."""
        rho = self.rho_now(host)
        world, micro = host.world_size, host.micro_batches_per_step
        self.ledger.switch(host.global_flops()[1], rho)  # close the last selection's account at the ρ it had

        def debt():  # this process's share of the measured overspend (the probe's own FLOPs once it ran)
            return self.ledger.debt(*host.global_flops()) / world
        rec_debt = debt()
        if host.global_step:  # measured: full fine-tuning FLOPs per micro-batch so far
            scale = host.global_flops()[1] / (host.global_step * world * micro) / host.profile.t_full
        else:  # expected from the data's padded batch sizes against the profiled shape
            scale = host.expected_step_scale()
        if self.deselected_state == "cpu":  # the probe steps reachable tensors with their own moments
            p = self.profile
            reach = deepest_reachable(p, rho_to_backward_budget(rho, p.t_fp, p.t_full))  # the deepest probe
            self._restore_state(host.optimizer, self.names[: reach + 1])
        repay = (host.total_steps - host.global_step) * micro if self.warmup else None
        warm_up_ended = in_warmup(self.selections)
        governs = steps_governed(host.global_step, host.total_steps,
                                 self.window(host.steps_per_epoch, host.total_steps))
        if self.current and not warm_up_ended and not can_pay_probe(self.profile, rho, governs, micro,
                                                                    self.cfg.probe_batches):
            host.log(f"GreenTrainer: keeping the selection: the {governs} step(s) left cannot pay for a probe")
            return self.current
        chosen, rec = self.candidates.select(self, host, rho, debt, governs * micro, scale, repay,
                                             None if warm_up_ended else self.current)
        self.mix, trains = None, chosen
        if self.cfg.policy == "frontier" and "importance" in rec:
            self.mix = self._mix(host, rec, step_allowance(self.profile, rho, governs * micro, debt(), scale, repay))
            trains = sorted(set(self.mix.lo.names) | set(self.mix.hi.names), key=self.names.index)
        rec.update(self.candidates.keep_state(self, host, trains))
        rec["debt_flops"] = rec_debt
        rec["kind"] = "probe"  # every selection record has a kind: "probe" (probed and selected) or "warm-up"
        if self.cfg.carbon_aware:
            rec["grid_g_per_kwh"] = host.grid.intensity_at(host.train_seconds)
            rec["trace_time"] = host.grid.time_at(host.train_seconds)
        rec["step_scale"] = scale
        rec["probe_batches"] = self.cfg.probe_batches
        rec.update(step=host.global_step, epoch=host.epoch + 1)
        self.current, self.selected_at = chosen, host.global_step
        self.selections.append(rec)
        self.epoch_selections.append({k: v for k, v in rec.items() if k != "importance"})
        return chosen

    def _mix(self, host, rec, per_step: float) -> Mix:
        """The frontier policy's mix for the steps this selection governs: the two kinds of step on the upper
        hull of (FLOPs, predicted gain) around ``per_step``, what ρ allows each step once the probe and any
        overspend are repaid (skipped steps can repay what no selection could)."""
        import numpy as np
        p = self.profile
        options = frontier(p, np.asarray(rec["importance"]), rec["backward_budget"], self.cfg.resolution)
        lo, hi, share = host.broadcast(mix_at(options, per_step))
        rec["step_policy"] = {"per_step": per_step, "share_hi": share,
                              "frontier": [[o.cost, o.value, len(o.names)] for o in options],
                              "lo": [lo.cost, lo.value, len(lo.names)], "hi": [hi.cost, hi.value, len(hi.names)]}
        kind = lambda o: "skip" if o.skip else f"{len(o.names)} tensors ({100 * o.cost:.0f}% of a full step)"  # noqa: E731
        host.log(f"GreenTrainer: step policy: {kind(hi)} on {100 * share:.0f}% of the steps, "
                 f"{kind(lo)} on the rest")
        return Mix(lo, hi, share)

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"selections": self.selections, "epoch_selections": self.epoch_selections,
                "current": self.current, "allowance": self.ledger.state(),
                "offloaded": {n: {k: [v, str(dev) if dev is not None else None] for k, (v, dev) in s.items()}
                              for n, s in self.offloaded.items()},  # "cpu": the host copies
                "installed": self.candidates.installed(self.selections, self.current),
                "mix": None if self.mix is None else self.mix.state(), "steps_by_kind": dict(self.steps_by_kind)}

    def load_state_dict(self, state: dict) -> None:
        """The decisions so far; :meth:`reinstate` then makes the model train what they chose."""
        import torch
        self.selections, self.epoch_selections = list(state["selections"]), list(state.get("epoch_selections", []))
        self.current = state["current"]
        self.ledger = FlopsLedger.from_state(state.get("allowance", [0.0, 0.0, self.cfg.rho]))
        self.selected_at = self.selections[-1].get("step") if self.selections else None
        self.offloaded = {n: {k: (v, torch.device(dev) if dev is not None else None) for k, (v, dev) in s.items()}
                          for n, s in state.get("offloaded", {}).items()}
        self._installed = state.get("installed")
        self.mix = Mix.from_state(state["mix"]) if state.get("mix") else None
        self.steps_by_kind.update(state.get("steps_by_kind", {}))

    def reinstate(self, model, host) -> None:
        """After :meth:`load_state_dict` and :meth:`setup`: the trainable set the checkpoint was training."""
        if getattr(self, "_installed", None):  # --over blocks: the same layers again, then the weights load
            self.candidates.reinstall(host, self._installed)
            return
        keep = set(self.current or ())
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)

    # -- optimizer state of deselected tensors ------------------------------------------------
    def follow_selection(self, model, optimizer, chosen) -> dict:
        """Free the gradients and the optimizer state of the tensors not in ``chosen`` (``deselected_state``)
        and bring back the host copies of those selected again; returns the state bytes now held."""
        import torch
        keep = set(chosen)
        if self.deselected_state == "cpu":
            self._restore_state(optimizer, [n for n in chosen if n in self.offloaded])
        for n, p in model.named_parameters():
            if n in keep:
                continue
            p.grad = None
            if self.deselected_state == "keep":
                continue
            state = optimizer.state.pop(p, None)
            if state and self.deselected_state == "cpu":
                self.offloaded[n] = {k: (v.detach().to("cpu"), v.device) if isinstance(v, torch.Tensor)
                                     else (v, None) for k, v in state.items()}
        return {"optimizer_state_bytes": state_bytes(optimizer.state.values()),
                "offloaded_state_bytes": state_bytes({k: v for k, (v, _) in s.items()}
                                                     for s in self.offloaded.values())}

    def _restore_state(self, optimizer, names) -> None:
        """Put the host copies of ``names``' optimizer state back on their devices (``"cpu"``)."""
        for n in names:
            stored = self.offloaded.pop(n, None)
            if stored is not None:
                optimizer.state[self.params[n]] = {k: v.to(dev) if dev is not None else v
                                                   for k, (v, dev) in stored.items()}


def state_bytes(states) -> int:
    """Bytes of the tensors in optimizer states (an iterable of {key: value} dicts)."""
    import torch
    return sum(v.numel() * v.element_size() for s in states for v in s.values() if isinstance(v, torch.Tensor))
