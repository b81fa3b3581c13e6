"""Full fine-tuning's FLOPs, the reference every run is measured against: the profile a run budgets with and
what full fine-tuning spends on each real batch, measured on a weightless (meta) copy of the model."""
from __future__ import annotations

from ..flops import full_step_flops, layer_forward_flops, meta_model_from_config, profile_config, with_recompute


def run_profile(config, shape, gradient_checkpointing: bool):
    """The per-tensor FLOPs profile a run budgets with: at its typical batch shape, and with each block's
    recompute under activation checkpointing."""
    profile = profile_config(config, *shape)
    if gradient_checkpointing:
        meta = meta_model_from_config(config)
        profile = with_recompute(profile, meta, layer_forward_flops(meta, *shape))
    return profile


def reference_step_flops(meta_model, batch: dict, gradient_checkpointing: bool, cache: dict) -> int:
    """What full fine-tuning spends on this batch (with the same activation checkpointing), measured once per
    batch shape (``cache``)."""
    key = (tuple(batch["input_ids"].shape), tuple(batch["labels"].shape))
    if key not in cache:
        cache[key] = _reference_flops(meta_model, batch, gradient_checkpointing)
    return cache[key]


def _reference_flops(meta_model, batch: dict, gradient_checkpointing: bool) -> int:
    flops = full_step_flops(meta_model, batch)
    if gradient_checkpointing:
        ids, labels = batch["input_ids"], batch["labels"]
        target = labels.shape[1] if getattr(meta_model.config, "is_encoder_decoder", False) else None
        flops += sum(layer_forward_flops(meta_model, ids.shape[0], ids.shape[1], target).values())
    return flops
