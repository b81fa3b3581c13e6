"""GreenTrainer over SMT's blocks (``--over blocks``): the candidates are the l×l blocks of the chosen
projections (SMT's targets and block size) and the whole small tensors (norms, biases); the probe scores
each block, :func:`greentrainer.block_selection.select_members` picks the best set under ρ, and the chosen
blocks train through SMT's block-sparse layer (merged back into a plain checkpoint on save).

A block's weight-gradient FLOPs are its share of its tensor's; its activation-gradient cost is its tensor's
place in the chain. The budgeting machinery of GreenTrainer (probe depth, what the probe and an overspend
cost, the smallest feasible ρ) works on a *folded* profile over the candidate tensors: each carries the
chain's t_dy down to it and, as t_dw, its cheapest member (one block, or the small tensor itself).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ...flops import TensorFlops, TensorFlopsProfile
from ..smt import effective_block_size, find_targets, install_layers, remove_layers


@dataclasses.dataclass
class FoldedProfile(TensorFlopsProfile):
    """The candidate tensors with their cheapest member's t_dw; ``probe_t_dws``: their dense t_dw, which a
    probe (it steps the dense tensors) spends."""

    probe_t_dws: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BlockCandidates:
    """Who may train: the target projections' blocks and the small tensors, in the profile's order."""

    targets: dict[str, str]          # target module name -> kind (q, k, v, ...)
    l: int                           # block edge
    tensors: list[str]               # candidate tensors (targets' weights, small tensors), backward order
    members: list[tuple[str, tuple[int, int] | None]]  # (tensor, block (row, col)) or (tensor, None): whole
    positions: list[int]             # each member's tensor's index in the model's profile
    costs: list[int]                 # each member's t_dw
    profile: TensorFlopsProfile      # folded over the candidate tensors (see the module docstring)
    t_dy: list[int]                  # the model's chain, for the selector

    def weight_of(self, module: str) -> str:
        return f"{module}.weight"


def block_candidates(model, profile: TensorFlopsProfile, kinds: list[str], block_size: int) -> BlockCandidates:
    """The candidates of ``model`` (whose tensors ``profile`` lists in backward order)."""
    targets = find_targets(model, kinds)
    modules = dict(model.named_modules())
    l = effective_block_size([tuple(modules[n].weight.shape) for n in targets], block_size)
    params = dict(model.named_parameters())
    weights = {f"{n}.weight": n for n in targets}
    members, positions, costs, tensors, folded, dense = [], [], [], [], [], []
    previous_chain, chain = 0, 0
    for i, t in enumerate(profile.tensors):
        chain += t.t_dy
        p = params.get(t.name)
        if t.name in weights:
            out_f, in_f = p.shape
            share = t.t_dw * l * l // (out_f * in_f)
            for r in range(out_f // l):
                for c in range(in_f // l):
                    members.append((t.name, (r, c)))
                    positions.append(i)
                    costs.append(share)
            unit = share
        elif p is not None and p.dim() == 1:
            members.append((t.name, None))
            positions.append(i)
            costs.append(t.t_dw)
            unit = t.t_dw
        else:
            continue
        tensors.append(t.name)
        dense.append(t.t_dw)
        folded.append(TensorFlops(t.name, unit, chain - previous_chain, t.numel))
        previous_chain = chain
    prof = FoldedProfile(profile.t_fp, profile.t_full, folded, profile.batch_size, profile.seq_len,
                         profile.target_len, probe_t_dws=dense)
    return BlockCandidates(targets, l, tensors, members, positions, costs, prof, [t.t_dy for t in profile.tensors])


def member_importance(cands: BlockCandidates, probe: dict) -> np.ndarray:
    """Each member's importance: its block's score, or the whole tensor's."""
    index = {n: i for i, n in enumerate(cands.tensors)}
    out = np.zeros(len(cands.members))
    for m, (name, block) in enumerate(cands.members):
        if block is None:
            out[m] = probe["importance"][index[name]]
        elif name in probe["blocks"]:
            out[m] = probe["blocks"][name][block]
    return out


def chosen_blocks(cands: BlockCandidates, members: list[int]) -> tuple[dict[str, list[tuple[int, int]]], list[str]]:
    """({target module: its chosen blocks}, [small tensors chosen whole]) of a selection."""
    blocks: dict[str, list[tuple[int, int]]] = {}
    whole = []
    for m in members:
        name, block = cands.members[m]
        if block is None:
            whole.append(name)
        else:
            blocks.setdefault(name[: -len(".weight")], []).append(tuple(int(x) for x in block))
    return {k: sorted(v) for k, v in blocks.items()}, whole


class BlockTraining:
    """Install and remove SMT's block layers as the selection changes (the dense weights stay the truth)."""

    def __init__(self, cands: BlockCandidates):
        self.cands = cands
        self.layers: dict = {}

    def install(self, model, blocks: dict[str, list[tuple[int, int]]], whole: list[str]) -> list[torch.nn.Parameter]:
        """Train ``blocks`` and ``whole``; returns the parameters that train."""
        self.remove(model)
        keep = set(whole)
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
        self.layers = install_layers(model, blocks, self.cands.l, self.cands.targets) if blocks else {}
        params = dict(model.named_parameters())
        return [params[n] for n in whole] + [layer.blocks for layer in self.layers.values()]

    def write(self) -> None:
        for layer in self.layers.values():
            layer.write_blocks()

    def remove(self, model) -> None:
        """Merge the trained blocks into their dense weights and put the plain linear layers back."""
        remove_layers(model, self.layers)
        self.layers = {}
