"""The small interface every method implements to plug into :func:`greentrainer.loop.train`."""
from __future__ import annotations

import torch


class Method:
    """Decides what trains. Hooks are called by the loop at fixed points; all default to doing nothing.

    Overhead work (probes, warm-up scoring) must run inside ``ctx.count("overhead")`` so it is counted.
    """

    name = "base"
    supports_gradient_checkpointing = True
    default_lr = 1e-4  # --lr when not given; each method's is its winner of the validation sweep (bench/accuracy.py)

    @classmethod
    def from_config(cls, train_config) -> "Method":
        """The method for a run (``train_config.method_config`` is the config registered with it)."""
        return cls() if train_config.method_config is None else cls(train_config.method_config)

    def check(self, model, profile, steps_per_epoch: int, total_steps: int, micro_batches: int = 1) -> None:
        """Reject impossible settings (raise UsageError) before any output is written. Steps are optimizer
        steps; each runs ``micro_batches`` profiled batches per process."""

    def prepare(self, model, ctx):
        """Freeze/wrap the model before the optimizer is built; return the model to train."""
        return model

    def rebind(self, model) -> None:
        """The loop has replaced the model's parameters by sharded ones (--fsdp), under the same names: look up
        any parameter the method holds again."""

    def schedule_steps(self, total_steps: int) -> int:
        """Optimizer steps the learning-rate schedule spans (after :meth:`prepare`): the run's, unless the method
        trains only some of them (GreenTrainer's step policy "fewer" skips the rest)."""
        return total_steps

    def optimizer_parameters(self, model) -> list[torch.nn.Parameter]:
        """Every parameter that may ever train (the optimizer is built once over these)."""
        return [p for p in model.parameters() if p.requires_grad]

    def flops_allowed(self, reference: float) -> float | None:
        """FLOPs this run may spend when full fine-tuning would spend ``reference`` (None: no FLOPs budget)."""
        return None

    def budget_report(self, spent: float, reference: float) -> dict:
        """The run totals' budget entries (``flops_allowed_fraction``, ``within_budget``); none without a budget."""
        return {}

    def on_epoch_start(self, ctx) -> None: ...

    def on_step_start(self, ctx) -> None: ...

    def skips_step(self, ctx) -> bool:
        """Whether the step about to run skips its batch (no forward, no update; the schedule still advances)."""
        return False

    def after_optimizer_step(self, ctx) -> None: ...

    def epoch_report(self) -> dict:
        """Method-specific facts to log for the epoch (e.g. the selection)."""
        return {}

    def trainable_summary(self, model) -> dict:
        total = sum(p.numel() for p in _unique(model.parameters()))
        train = sum(p.numel() for p in _unique(model.parameters()) if p.requires_grad)
        return {"trainable_params": train, "total_params": total}

    def state_dict(self) -> dict:
        """The method's own state for a checkpoint (tensors and plain Python only)."""
        return {}

    def load_state_dict(self, state: dict, ctx) -> None:
        """Restore :meth:`state_dict` after :meth:`prepare`, before the model's and optimizer's states."""

    def finalize(self, model):
        """Return the model to save (e.g. merge sparse blocks back)."""
        return model

    def write_artifacts(self, out_dir) -> None:
        """Method-specific files for the run folder (e.g. GreenTrainer's selections and heatmap)."""

    def save(self, model, tokenizer, path) -> None:
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)


def _unique(params):
    seen = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p
