"""Paper baselines through ``peft``: LoRA (query and value projections by default), DoRA, Prefix tuning.

For encoder-decoder models peft's prefix tuning feeds the prefixes to the decoder (its self- and
cross-attention caches); the encoder gets none, as in the GreenTrainer paper.
"""
from __future__ import annotations

import json

import torch

from ..errors import UsageError
from .base import Method


def default_lora_targets(model) -> list[str]:
    """peft's own default (query and value) for the model type, else q_proj/v_proj-like names found."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    targets = DEFAULTS.get(getattr(model.config, "model_type", ""))
    if targets:
        return list(targets)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"]):
        if set(pair) <= names:
            return pair
    raise UsageError(f"no query/value projections found in {model.config.model_type}; pass --lora-targets")


def check_targets(model, targets: list[str]) -> None:
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise UsageError(f"LoRA target module(s) {', '.join(missing)} not found in this "
                         f"{model.config.model_type} model; its linear layers are: {', '.join(linear)}")


class PeftMethod(Method):
    def __init__(self, kind: str, cfg, base_model: str | None = None):
        self.name = kind
        self.cfg = cfg
        self.base_model = base_model

    def check(self, model, profile, steps_per_epoch, total_steps):
        if self.name != "prefix":
            check_targets(model, self._targets(model))

    def _targets(self, model):
        if self.cfg.lora_targets:
            return [t.strip() for t in self.cfg.lora_targets.split(",") if t.strip()]
        return default_lora_targets(model)

    def prepare(self, model, ctx):
        from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
        task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
        if self.name == "prefix":
            config = PrefixTuningConfig(task_type=task, num_virtual_tokens=self.cfg.prefix_tokens)
        else:
            targets = self._targets(model)
            check_targets(model, targets)
            self.targets = targets
            config = LoraConfig(task_type=task, r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha,
                                lora_dropout=self.cfg.lora_dropout, target_modules=targets,
                                use_dora=self.name == "dora")
        return get_peft_model(model, config)

    def epoch_report(self):
        return {"lora_targets": self.targets} if hasattr(self, "targets") else {}

    def save(self, model, tokenizer, path) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with open(path / "greentrainer_base.json", "w") as f:
            json.dump({"base_model": self.base_model, "method": self.name}, f)
