"""Full fine-tuning: every tensor trains (the reference cost that ρ is a fraction of)."""
from .base import Method
from .registry import register_method


@register_method("full")
class FullFineTuning(Method):
    """Full fine-tuning: every tensor trains (the reference cost)."""

    default_lr = 3e-5  # the validation sweep's winner (bench/results/accuracy_sweep_scitldr.md)

    def prepare(self, model, ctx):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
