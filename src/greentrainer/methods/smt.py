"""SMT (Sparse Matrix Tuning): warm up with full fine-tuning while accumulating |∂L/∂W| of the target
projections (each warm-up step's gradient, after its micro-batches and processes), keep the l×l blocks with the
largest mean |grad| up to a parameter budget, then train only those blocks through
:class:`~greentrainer.smt_layer.SMTLinear`.

Block size: l must divide every target weight's dimensions. If the requested l does not (SmolLM2's 576),
the largest divisor of the dimensions' GCD that is ≤ l is used (192 for SmolLM2) and reported.

Saved activations: target projections that read the same input (q/k/v of one attention, gate/up of one MLP)
save that input's needed columns once for all of them (:func:`input_groups`, ``share_inputs``), not once each.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch
from torch import nn

from ..options import Options, option
from ..errors import UsageError
from ..shards import local_rows
from ..smt_layer import SMTLinear, share_inputs as _share_inputs
from .base import Method
from .registry import register_method


SMT_TARGET_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass
class BlockOptions(Options):
    """Which projections are cut into blocks, and the block edge; shared by SMT and GreenTrainer --over blocks."""

    targets: str = option("q,k,v", "comma list of q,k,v,o,gate,up,down", flag="smt_targets")
    block_size: int = option(256, "block edge l (l×l blocks; lowered to divide the target shapes)",
                             flag="smt_block")

    def target_kinds(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def check_blocks(self) -> None:
        kinds = self.target_kinds()
        bad = [k for k in kinds if k not in SMT_TARGET_KINDS]
        if not kinds or bad:
            raise UsageError(f"--smt-targets: unknown target {', '.join(bad) or '(empty)'}; "
                             f"choose from {','.join(SMT_TARGET_KINDS)}")
        if self.block_size <= 0:
            raise UsageError(f"--smt-block must be a positive block size, got {self.block_size}")


@dataclasses.dataclass
class SMTConfig(BlockOptions):
    """Sparse Matrix Tuning knobs."""

    warmup_steps: int = option(100, "warm-up steps of full fine-tuning whose gradients choose the blocks",
                               flag="smt_warmup")
    params_percent: float = option(5.0, "trainable %% of all model parameters (default: the validation sweep's "
                                        "winner, bench/results/accuracy_sweep_scitldr.md)", flag="smt_params")

    def validate(self) -> None:
        self.check_options()
        self.check_blocks()
        if not 0 < self.params_percent <= 100:
            raise UsageError(f"--smt-params must be a percentage in (0, 100], got {self.params_percent}")
        if self.warmup_steps < 0:
            raise UsageError(f"--smt-warmup must be ≥ 0, got {self.warmup_steps}")

# target kind -> leaf module names used by common architectures (separate nn.Linear projections)
KIND_NAMES = {
    "q": ("q_proj", "q", "query"), "k": ("k_proj", "k", "key"), "v": ("v_proj", "v", "value"),
    "o": ("o_proj", "out_proj", "o"), "gate": ("gate_proj", "wi_0"), "up": ("up_proj", "fc1", "wi_1", "wi"),
    "down": ("down_proj", "fc2", "wo"),
}


# target kinds that read one input in a module: the attention's q/k/v, the gated MLP's gate/up
SAME_INPUT = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "mlp_in", "up": "mlp_in"}
# parent modules whose q reads the decoder and k/v the encoder: q gets a group of its own
CROSS_ATTENTION = ("EncDecAttention", "encoder_attn", "crossattention", "cross_attn", "cross_attention")


def input_groups(targets: dict[str, str]) -> list[list[str]]:
    """Target module names (``{name: kind}``) grouped by the input they read: siblings under one parent
    module whose kinds read the same input (q/k/v; gate/up). Every other target is a group of its own."""
    groups: dict[tuple, list[str]] = {}
    for name, kind in targets.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        family = SAME_INPUT.get(kind, name)
        if family == "qkv" and kind == "q" and parent.rsplit(".", 1)[-1] in CROSS_ATTENTION:
            family = name
        groups.setdefault((parent, family), []).append(name)
    return list(groups.values())


def install_layers(model, chosen: dict[str, list[tuple[int, int]]], l: int, targets: dict[str, str],
                   share_inputs: bool = True) -> dict[str, SMTLinear]:
    """Replace each chosen target ``nn.Linear`` of ``model`` by an :class:`SMTLinear` training ``chosen[name]``
    blocks of size ``l``; with ``share_inputs``, layers that read the same input save its columns once."""
    layers: dict[str, SMTLinear] = {}
    for name, blocks in chosen.items():
        parent_name, leaf = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        layer = SMTLinear(getattr(parent, leaf), blocks, l)
        setattr(parent, leaf, layer)
        layers[name] = layer
    if share_inputs:
        for group in input_groups({n: targets[n] for n in layers}):
            if len(group) > 1:
                _share_inputs(layers[n] for n in group)
    return layers


def remove_layers(model, layers: dict[str, SMTLinear]) -> None:
    """Undo :func:`install_layers`: merge each layer's trained blocks into its dense weight and put the plain
    ``nn.Linear`` back."""
    for name, layer in layers.items():
        layer.write_blocks()
        parent_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), leaf, layer.linear)


def find_targets(model, kinds: list[str]) -> dict[str, str]:
    """{module name: kind} for the nn.Linear target projections; a clear error when a kind is absent."""
    found: dict[str, str] = {}
    for kind in kinds:
        hits = [n for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in KIND_NAMES[kind]]
        if not hits:
            raise UsageError(f"SMT target '{kind}' has no separate nn.Linear projection in this "
                             f"{model.config.model_type} model (looked for {', '.join(KIND_NAMES[kind])})")
        for n in hits:
            found[n] = kind
    return found


def effective_block_size(shapes, l: int) -> int:
    """Largest divisor of the GCD of all target dimensions that is ≤ l."""
    g = 0
    for s in shapes:
        for d in s:
            g = math.gcd(g, d)
    return max(d for d in range(1, min(l, g) + 1) if g % d == 0)


def select_blocks(scores: dict[str, torch.Tensor], n_blocks: int) -> dict[str, list[tuple[int, int]]]:
    """Top ``n_blocks`` blocks across all targets by mean |grad| (scores[name]: [rows, cols] block means)."""
    flat = [(float(v), name, r, c) for name, s in scores.items() for (r, c), v in _items(s)]
    flat.sort(key=lambda t: -t[0])
    chosen: dict[str, list[tuple[int, int]]] = {}
    for _, name, r, c in flat[:n_blocks]:
        chosen.setdefault(name, []).append((r, c))
    return chosen


def _items(s):
    for r in range(s.shape[0]):
        for c in range(s.shape[1]):
            yield (r, c), s[r, c]


def block_means(abs_grad: torch.Tensor, l: int) -> torch.Tensor:
    out_f, in_f = abs_grad.shape
    return abs_grad.view(out_f // l, l, in_f // l, l).mean(dim=(1, 3))


@register_method("smt", config_cls=SMTConfig)
class SMTMethod(Method):
    """Sparse Matrix Tuning: warm-up gradients choose l×l blocks; only those train."""

    default_lr = 1e-4  # the validation sweep's winner (bench/results/accuracy_sweep_scitldr.md)

    def __init__(self, cfg, share_inputs: bool = True):
        self.cfg = cfg
        self.share_inputs = share_inputs  # False: each layer saves its own copy of its input columns
        self.layers: dict[str, SMTLinear] = {}
        self.report: dict = {}
        self._reported = False

    def check(self, model, profile, steps_per_epoch, total_steps, micro_batches=1):
        find_targets(model, self.cfg.target_kinds())
        if self.cfg.warmup_steps == 0:
            raise UsageError("--smt-warmup must be at least 1 step: blocks are chosen from warm-up gradients")
        if self.cfg.warmup_steps >= total_steps:
            raise UsageError(f"--smt-warmup {self.cfg.warmup_steps} leaves no step for sparse training "
                             f"(the run has {total_steps} steps); lower it or train longer")

    def prepare(self, model, ctx):
        self.targets = find_targets(model, self.cfg.target_kinds())
        modules = dict(model.named_modules())
        shapes = [tuple(modules[n].weight.shape) for n in self.targets]
        self.l = effective_block_size(shapes, self.cfg.block_size)
        if self.l != self.cfg.block_size:
            ctx.log(f"SMT: block size {self.cfg.block_size} does not divide the target shapes; using {self.l}")
        self.total_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        # Σ over warm-up steps of |∂L/∂W|, summed over each row's l-wide column blocks: [rows, columns // l]
        # (``base``: settled; ``partial``: this process's rows since, when sharded)
        self.base = {n: torch.zeros(modules[n].weight.shape[0], modules[n].weight.shape[1] // self.l,
                                    dtype=torch.float64) for n in self.targets}
        self.partial = {n: torch.zeros_like(t) for n, t in self.base.items()}
        self._ctx, self._hook = ctx, None
        self.rebind(model)
        for p in model.parameters():  # warm-up = full fine-tuning
            p.requires_grad_(True)
        return model

    def rebind(self, model) -> None:
        modules = dict(model.named_modules())
        self.weights = {n: modules[n].weight for n in self.targets}
        self.model = model

    @torch.no_grad()
    def _accumulate(self, optimizer, args, kwargs) -> None:
        """Before each warm-up step (its gradients summed over micro-batches and processes): add |∂L/∂W|."""
        l = self.l
        for n, w in self.weights.items():
            if w.grad is not None:
                start, g = local_rows(w.grad)
                self.partial[n][start: start + g.shape[0]] += \
                    g.abs().reshape(g.shape[0], -1, l).sum(-1, dtype=torch.float64).cpu()

    def _settle(self) -> dict:
        """The sums over every process's rows (sharded: each holds some rows), now the same on every process."""
        for n, t in self.partial.items():
            self.base[n] += torch.from_numpy(self._ctx.sum_shards(t.numpy()))
            t.zero_()
        return self.base

    def optimizer_parameters(self, model):
        return list({id(p): p for p in model.parameters()}.values())

    def on_step_start(self, ctx):
        if ctx.global_step == self.cfg.warmup_steps and not self.layers:
            self._switch_to_sparse(ctx)
        elif not self.layers and self._hook is None:
            self._hook = ctx.optimizer.register_step_pre_hook(self._accumulate)

    def after_optimizer_step(self, ctx):
        for layer in self.layers.values():
            layer.write_blocks()

    def _install(self, ctx, chosen) -> None:
        """Train only ``chosen`` blocks from now on (the loop builds the optimizer over them)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        self.chosen = chosen
        self.layers = install_layers(ctx.model, chosen, self.l, self.targets, self.share_inputs)
        ctx.rebuild_optimizer([layer.blocks for layer in self.layers.values()])

    def state_dict(self) -> dict:
        if self.layers:
            return {"chosen": {n: [list(b) for b in bl] for n, bl in self.chosen.items()}, "report": self.report,
                    "reported": self._reported}
        return {"grad_row_sums": {n: t.clone() for n, t in self._settle().items()}}  # still warming up

    def load_state_dict(self, state: dict, ctx) -> None:
        if "chosen" in state:
            self._install(ctx, {n: [tuple(b) for b in bl] for n, bl in state["chosen"].items()})
            self.report, self._reported = state["report"], state["reported"]
        elif "grad_row_sums" in state:
            for n, t in state["grad_row_sums"].items():
                self.base[n].copy_(t)
        else:  # a checkpoint of an earlier version: the whole |∂L/∂W| sums
            for n, g in state["abs_grad"].items():
                self.base[n].copy_(g.reshape(g.shape[0], -1, self.l).sum(-1, dtype=torch.float64))

    def _switch_to_sparse(self, ctx):
        budget = int(self.cfg.params_percent / 100 * self.total_params)
        n_blocks = max(1, budget // (self.l * self.l))
        l = self.l
        scores = {n: t.reshape(t.shape[0] // l, l, -1).sum(1) / l ** 2 for n, t in self._settle().items()}
        chosen = ctx.broadcast(select_blocks(scores, n_blocks))  # one choice for every process (the first's)
        self._install(ctx, chosen)
        by_kind, by_layer = Counter(), Counter()
        for name, blocks in chosen.items():
            by_kind[self.targets[name]] += len(blocks) * self.l ** 2
            layer_id = next((p for p in name.split(".") if p.isdigit()), "?")
            by_layer[layer_id] += len(blocks) * self.l ** 2
        selected = sum(by_kind.values())
        self.report = {"block_size": self.l, "n_blocks": sum(len(b) for b in chosen.values()),
                       "selected_params": selected, "budget_params": budget,
                       "budget_share_by_kind": {k: v / selected for k, v in sorted(by_kind.items())},
                       "params_by_layer": dict(sorted(by_layer.items(), key=lambda kv: (len(kv[0]), kv[0])))}
        share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in self.report["budget_share_by_kind"].items())
        ctx.log(f"SMT: {self.report['n_blocks']} blocks of {self.l}x{self.l} ({selected:,} parameters, "
                f"{100 * selected / self.total_params:.2f}% of the model) after {ctx.global_step} warm-up steps; "
                f"budget by projection: {share}")

    def epoch_report(self):
        if self.report and not self._reported:
            self._reported = True
            return {"smt": self.report}
        return {}

    def trainable_summary(self, model):
        if not self.layers:
            return super().trainable_summary(model)
        return {"trainable_params": sum(l.blocks.numel() for l in self.layers.values()),
                "total_params": self.total_params}

    def finalize(self, model):
        """Merge the blocks back and restore plain nn.Linear modules: a plain transformers model."""
        remove_layers(model, self.layers)
        self.layers = {}
        return model
