"""Paper baselines through ``peft``: LoRA (query and value projections by default), DoRA, Prefix tuning.

For encoder-decoder models peft's prefix tuning feeds the prefixes to the decoder (its self- and
cross-attention caches); the encoder gets none, as in the GreenTrainer paper. For decoder-only models the
prefix starts from the base model's own keys and values on the first training prompts (real-word
initialisation, Li & Liang 2021; peft's ``initialize_kv_prefix_from_past_key_values``): peft's random
prefix starts far from the model (bench/prefix_init.py: SmolLM2 validation loss 7.76 against 3.06) and does not recover
in a short run.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from ..options import Options, option
from ..errors import UsageError
from .base import Method
from .registry import register_method


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


@torch.no_grad()
def init_prefix_from_prompts(peft_model, ctx) -> None:
    """Set the prefix to the base model's keys/values on the first training prompts (FLOPs counted)."""
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values
    n = peft_model.peft_config[peft_model.active_adapter].num_virtual_tokens
    ids: list[int] = []
    for item in ctx.train_data:
        ids += item.prompt_ids
        if len(ids) >= n:
            break
    if len(ids) < n:
        ctx.log(f"prefix: the training prompts have fewer than {n} tokens; keeping the random initialisation")
        return
    x = torch.tensor([ids[:n]], device=ctx.device)
    with ctx.count("overhead"), peft_model.disable_adapter():
        past = peft_model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True).past_key_values
    initialize_kv_prefix_from_past_key_values(peft_model, past_key_values=past, num_virtual_tokens=n)


@dataclasses.dataclass
class LoraOptions(Options):
    """LoRA's knobs (passed to peft's LoraConfig); shared by LoRA, DoRA and GreenTrainer ``--over lora``."""

    lora_r: int = option(8, "rank of the low-rank update")
    lora_alpha: int = option(16, "scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the adapter's input")
    lora_targets: str | None = option(None, "comma-separated module names (default: the model's query and value)")

    def check_lora(self) -> None:
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise UsageError("--lora-r and --lora-alpha must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")

    def lora_config(self, model, use_dora: bool = False):
        """peft's LoraConfig for ``model`` (its query and value projections unless targets are given)."""
        from peft import LoraConfig, TaskType
        targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()] if self.lora_targets \
            else default_lora_targets(model)
        check_targets(model, targets)
        task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
        return LoraConfig(task_type=task, r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, use_dora=use_dora)


@dataclasses.dataclass
class LoraMethodConfig(LoraOptions):
    """LoRA / DoRA knobs."""

    def validate(self) -> None:
        self.check_options()
        self.check_lora()


@dataclasses.dataclass
class PrefixMethodConfig(Options):
    """Prefix tuning knobs (passed to peft's PrefixTuningConfig)."""

    prefix_tokens: int = option(40, "virtual tokens of the prefix (default: the validation sweep's winner)")
    prefix_init: str = option("data", "data: the base model's keys/values on the first training prompts "
                                      "(decoder-only); random: peft's default", choices=("data", "random"))

    def validate(self) -> None:
        self.check_options()
        if self.prefix_tokens <= 0:
            raise UsageError(f"--prefix-tokens must be positive, got {self.prefix_tokens}")


class PeftMethod(Method):
    """A peft adapter on the frozen model; saved as the adapter alone, with the name of its base model."""

    def __init__(self, cfg, base_model: str | None = None):
        self.cfg = cfg
        self.base_model = base_model

    @classmethod
    def from_config(cls, train_config):
        return cls(train_config.method_config, train_config.model)

    def peft_config(self, model, task):
        raise NotImplementedError

    def prepare(self, model, ctx):
        from peft import TaskType, get_peft_model
        task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
        return get_peft_model(model, self.peft_config(model, task))

    def save(self, model, tokenizer, path) -> None:
        save_adapter(model, tokenizer, path, self.base_model, self.name)


def save_adapter(model, tokenizer, path, base_model: str | None, method: str) -> None:
    """A peft adapter folder, with the name of its base model (``eval`` loads the base, then the adapter)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(path / "greentrainer_base.json", "w") as f:
        json.dump({"base_model": base_model, "method": method}, f)


@register_method("lora", config_cls=LoraMethodConfig)
class LoraMethod(PeftMethod):
    """LoRA (peft), on the query and value projections by default."""

    default_lr = 3e-3  # the validation sweep's winner (bench/results/accuracy_sweep_scitldr.md)
    use_dora = False

    def check(self, model, profile, steps_per_epoch, total_steps, micro_batches=1):
        self.cfg.lora_config(model)

    def peft_config(self, model, task):
        config = self.cfg.lora_config(model, self.use_dora)
        self.targets = sorted(config.target_modules)
        return config

    def epoch_report(self):
        return {"lora_targets": self.targets} if hasattr(self, "targets") else {}


@register_method("dora", config_cls=LoraMethodConfig)
class DoraMethod(LoraMethod):
    """DoRA (peft): LoRA with a learned magnitude per output."""

    default_lr = 3e-3  # the validation sweep's winner, at LoRA's rank 8 (bench/results/accuracy_sweep_scitldr.md)
    use_dora = True


@register_method("prefix", config_cls=PrefixMethodConfig)
class PrefixMethod(PeftMethod):
    """Prefix tuning (peft), started from the model's own keys/values on training prompts."""

    supports_gradient_checkpointing = False  # peft's prefix caches do not survive the recompute
    default_lr = 3e-2  # the validation sweep's winner (bench/results/accuracy_sweep_scitldr.md)

    def peft_config(self, model, task):
        from peft import PrefixTuningConfig
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=self.cfg.prefix_tokens)

    def prepare(self, model, ctx):
        peft_model = super().prepare(model, ctx)
        if self.cfg.prefix_init == "data":
            if model.config.is_encoder_decoder:
                ctx.log("prefix: encoder-decoder models keep peft's random prefix initialisation")
            else:
                init_prefix_from_prompts(peft_model, ctx)
        return peft_model
