"""FT-Top2 (GreenTrainer paper baseline): train only the last two layers, the output embedding and the
final norm. With tied embeddings the input embedding is the same tensor and trains with it."""
from .base import Method
from .registry import register_method


def top2_parameter_names(model, backward_order: list[str]) -> list[str]:
    """Names of the output embedding's weight and of the first other module the backward pass reaches."""
    out_emb = model.get_output_embeddings()
    names = dict((id(p), n) for n, p in model.named_parameters())
    keep = {names[id(out_emb.weight)]}
    if getattr(out_emb, "bias", None) is not None:
        keep.add(names[id(out_emb.bias)])
    for n in backward_order:
        if n not in keep:
            module = n.rsplit(".", 1)[0]
            keep |= {m for m in names.values() if m.rsplit(".", 1)[0] == module}
            break
    return sorted(keep)


@register_method("top2")
class Top2(Method):
    """FT-Top2: only the last two layers and the output embedding train."""

    default_lr = 3e-4

    def prepare(self, model, ctx):
        chosen = set(top2_parameter_names(model, ctx.profile.names))
        for n, p in model.named_parameters():
            p.requires_grad_(n in chosen)
        self.selected = sorted(chosen)
        return model

    def epoch_report(self):
        return {"trainable_tensors": self.selected}
