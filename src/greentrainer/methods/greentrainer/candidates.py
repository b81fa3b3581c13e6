"""What a GreenTrainer selection picks from, one class per kind (``--over``): the model's own tensors (the
paper), the adapters of a peft LoRA model, or SMT's l×l blocks. Each kind knows its FLOPs profile, its
parameters, how it probes and selects, what a checkpoint must reinstall and how its model is saved, so the
controller never asks which kind it has."""
from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np

from ...importance import probe_importance
from ...selection import select_tensors
from ..peft_methods import save_adapter
from .budget import probe_within_budget


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


def select_step(model, optimizer, scheduler, batch, profile, rho, steps_per_selection, *, importance="dw_grad",
                resolution=None, previous=None, count=None, autocast=None, log=print, debt=0.0,
                step_scale=1.0, reduce_grads=None, agree=None, repay_steps=None, probe_all=False, sum_parts=None):
    """Probe importance, select within ρ, and make exactly the selected tensors trainable.

    ``debt``: FLOPs measured above ρ × full fine-tuning so far, or a callable giving it; a callable is asked
    again after the probe, so the budget pays the probe's measured cost rather than its prediction (the
    probe batch's length varies). ``steps_per_selection`` counts profiled batches (micro-batches).
    Several processes: ``reduce_grads`` sums the probe's gradients, ``agree`` makes every process take the
    first one's selection; ``sum_parts`` sums the scores of sharded tensors' slices (--fsdp).
    ``probe_all``: the probe scores every tensor (a full backward, paid within ρ).
    Returns (selected names, a record of the selection for logs)."""
    names = profile.names
    t0 = time.perf_counter()
    budget, upto, probe = probe_within_budget(
        profile, rho, steps_per_selection, debt, batch, step_scale, repay_steps,
        lambda upto: probe_importance(model, optimizer, scheduler, batch, names, upto, importance, count, autocast,
                                      reduce_grads, sum_parts=sum_parts), probe_all)
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




class Tensors:
    """The model's own tensors (the paper's candidates)."""

    kind = "tensors"

    def __init__(self, cfg, gradient_checkpointing: bool = False, lora_config=None):
        self.cfg = cfg
        self.gradient_checkpointing = gradient_checkpointing  # the profile charges each block's recompute
        self.lora_config = lora_config  # a peft model's own LoRA config (the callback); None: from ``cfg``

    def wrap(self, model):
        """The model to train (LoRA: wrapped by peft, before the optimizer is built)."""
        return model

    def profile(self, model, profile):
        """The profile the selection works on, from the run's tensor profile at its typical batch shape."""
        return profile

    def parameters(self, model, names) -> dict:
        return dict(model.named_parameters())

    def prepare(self, model, host) -> None:
        """Set-up once the model is wrapped (blocks: the layer that trains them)."""

    def select(self, controller, host, rho, debt, steps, scale, repay, previous):
        """Probe, select within ρ and make the selection trainable; returns (selected names, record)."""
        cfg = controller.cfg
        chosen, rec = select_step(host.model, host.optimizer, host.scheduler, host.sample_batches(cfg.probe_batches),
                                  controller.profile, rho, steps, importance=cfg.importance,
                                  resolution=cfg.resolution, previous=previous, count=host.count,
                                  autocast=host.autocast, log=host.log, debt=debt, step_scale=scale,
                                  reduce_grads=host.reduce_gradients if host.world_size > 1 else None,
                                  agree=host.broadcast, repay_steps=repay,
                                  probe_all=cfg.policy == "frontier",
                                  sum_parts=host.sum_shards if host.sharded else None)
        return chosen, rec

    def keep_state(self, controller, host, names) -> dict:
        """After a selection: optimizer state only for ``names`` (``deselected_state``); the bytes held."""
        return controller.follow_selection(host.model, host.optimizer, names)

    def installed(self, selections, current) -> dict | None:
        """What a checkpoint must install again before its weights load (blocks: their layers)."""
        return None

    def reinstall(self, host, installed: dict) -> None: ...

    def after_optimizer_step(self) -> None: ...

    def finalize(self, model):
        """The model to save."""
        return model

    def save(self, model, tokenizer, path, base_model) -> None:
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)


class LoraAdapters(Tensors):
    """The adapters of a peft LoRA model: the backward stops at the deepest selected adapter, which plain LoRA
    (always reaching its first adapted layer) cannot."""

    kind = "lora"

    def __init__(self, cfg, gradient_checkpointing: bool = False, lora_config=None):
        super().__init__(cfg, gradient_checkpointing, lora_config)
        self._profiles: dict = {}

    def wrap(self, model):
        if hasattr(model, "peft_config"):
            return model
        from peft import get_peft_model
        return get_peft_model(model, self.cfg.lora_config(model))

    def profile(self, model, profile):
        key = (profile.batch_size, profile.seq_len, profile.target_len or None)  # built once per batch shape
        if key not in self._profiles:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            config = self.lora_config or self.cfg.lora_config(base)
            self._profiles[key] = lora_profile(base.config, config, key, profile.t_full, self.gradient_checkpointing)
        return self._profiles[key]

    def parameters(self, model, names) -> dict:
        names = set(names)
        return {n: p for n, p in model.named_parameters() if n in names}

    def save(self, model, tokenizer, path, base_model) -> None:
        """A normal peft adapter folder; adapters never selected keep their initial value (B = 0: no effect)."""
        save_adapter(model, tokenizer, path, base_model, "greentrainer-lora")


class Blocks(Tensors):
    """SMT's l×l blocks of the target projections and the small tensors whole; the chosen blocks train through
    SMT's block layer, merged back into a plain checkpoint on save."""

    kind = "blocks"

    def __init__(self, cfg, gradient_checkpointing: bool = False, lora_config=None):
        super().__init__(cfg, gradient_checkpointing, lora_config)
        self._members: dict = {}

    def members(self, model, profile):
        """The :class:`~.blocks.BlockCandidates` for this batch shape (built once per shape)."""
        key = (profile.batch_size, profile.seq_len, profile.target_len or None)
        if key not in self._members:
            from .blocks import block_candidates
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            self._members[key] = block_candidates(base, profile, self.cfg.target_kinds(), self.cfg.block_size)
        return self._members[key]

    def profile(self, model, profile):
        return self.members(model, profile).profile

    def parameters(self, model, names) -> dict:
        names = set(names)
        return {n: p for n, p in model.named_parameters() if n in names}

    def prepare(self, model, host) -> None:
        from .blocks import BlockTraining
        self.cands = self.members(model, host.profile)
        self.training = BlockTraining(self.cands)
        if self.cands.l != self.cfg.block_size:
            host.log(f"GreenTrainer: block size {self.cfg.block_size} does not divide the target shapes; "
                     f"using {self.cands.l}")

    def select(self, controller, host, rho, debt, steps, scale, repay, previous):
        """Probe the dense candidates (blocks scored one by one), select members within ρ exactly, and train
        the chosen blocks through SMT's layer and the chosen small tensors whole; the optimizer state of the
        previous selection is dropped (its blocks are other tensors)."""
        from ...block_selection import select_members
        from .blocks import chosen_blocks, member_importance
        cfg, c, prof = controller.cfg, self.cands, controller.profile
        self.training.remove(host.model)
        host.rebuild_optimizer([controller.params[n] for n in c.tensors])  # the probe steps the dense candidates
        batch = host.sample_batches(cfg.probe_batches)
        t0 = time.perf_counter()
        budget, upto, probe = probe_within_budget(
            prof, rho, steps, debt, batch, scale, repay,
            lambda upto: probe_importance(host.model, host.optimizer, host.scheduler, batch, c.tensors, upto,
                                          cfg.importance, host.count, host.autocast,
                                          host.reduce_gradients if host.world_size > 1 else None,
                                          blocks={c.weight_of(m): c.l for m in c.targets},
                                          sum_parts=host.sum_shards if host.sharded else None))
        t1 = time.perf_counter()
        imp = member_importance(c, probe)
        sel = select_members(c.t_dy, c.positions, c.costs, imp, budget)
        if not sel.members:  # every score ≤ 0: by |importance| instead
            host.log("GreenTrainer: every importance ≤ 0: selecting by |importance| instead")
            sel = select_members(c.t_dy, c.positions, c.costs, np.abs(imp) + 1e-12, budget)
        t2 = time.perf_counter()
        blocks, whole = host.broadcast(chosen_blocks(c, sel.members))
        host.rebuild_optimizer(self.training.install(host.model, blocks, whole))
        chosen = sorted(set(whole) | {c.weight_of(m) for m in blocks}, key=c.tensors.index)
        predicted = prof.t_fp + sel.cost
        n_blocks = sum(len(v) for v in blocks.values())
        rec = {"rho": rho, "n_selected": len(chosen), "selected": chosen, "n_blocks": n_blocks, "block_size": c.l,
               "blocks": {k: [list(b) for b in v] for k, v in blocks.items()}, "whole": whole,
               "n_candidates": len(c.members), "predicted_step_flops": predicted,
               "predicted_fraction_of_full": predicted / prof.t_full, "backward_budget": budget, "probe_depth": upto,
               "probe_grad_bytes": probe["grad_bytes"], "probe_time_s": t1 - t0, "selector_time_s": t2 - t1,
               "importance": [float(x) for x in probe["importance"]]}
        host.log(f"GreenTrainer: rho {rho}: {n_blocks} blocks of {c.l}x{c.l} in {len(blocks)} projections and "
                 f"{len(whole)} small tensors, of {len(c.members)} candidates; predicted "
                 f"{100 * predicted / prof.t_full:.1f}% of a full step (selector {1000 * (t2 - t1):.0f} ms)")
        return chosen, rec

    def keep_state(self, controller, host, names) -> dict:
        return {}  # the optimizer was rebuilt over the chosen blocks

    def installed(self, selections, current) -> dict | None:
        """The blocks and small tensors training now (the layers to put back on resume)."""
        if not self.training.layers and not current:
            return None
        last = next((s for s in reversed(selections) if "blocks" in s), None)
        return None if last is None else {"blocks": last["blocks"], "whole": last["whole"]}

    def reinstall(self, host, installed: dict) -> None:
        blocks = {k: [tuple(b) for b in v] for k, v in installed["blocks"].items()}
        host.rebuild_optimizer(self.training.install(host.model, blocks, installed["whole"]))

    def after_optimizer_step(self) -> None:
        self.training.write()

    def finalize(self, model):
        """The trained blocks merged back into plain linear layers (a plain checkpoint)."""
        self.training.remove(model)
        return model


CANDIDATES = {c.kind: c for c in (Tensors, LoraAdapters, Blocks)}
