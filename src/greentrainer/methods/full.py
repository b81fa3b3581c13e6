"""Full fine-tuning: every tensor trains (the reference cost that ρ is a fraction of)."""
from .base import Method


class FullFineTuning(Method):
    name = "full"

    def prepare(self, model, ctx):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
