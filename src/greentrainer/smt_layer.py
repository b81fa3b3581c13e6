"""SMT's sparse block linear layer: dense forward, backward that computes only the selected l×l blocks'
weight gradients (one batched matmul over the gathered blocks) and keeps only the input columns they need.

Layers that read the same input tensor (q/k/v of one attention, gate/up of one MLP) can share one
:class:`InputShare`: the first of them to run on an input saves the input columns that any of them needs,
once, and the others reuse that saved tensor (see :func:`share_inputs`).

Mixed precision: under ``torch.autocast`` the layer computes like an autocast ``linear`` — the output and the
saved input columns are in the autocast dtype — and its backward casts explicitly, so each gradient has the
dtype of what it is the gradient of (input, blocks, bias), on any device.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch import nn
from .shards import full, local_rows


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``linear`` computes in for input ``x``: the autocast dtype where autocast is on for x's device."""
    dev = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _gather_columns(x: torch.Tensor, col_blocks: torch.Tensor, l: int, dtype: torch.dtype) -> torch.Tensor:
    """x's column blocks ``col_blocks`` as a new [N, len(col_blocks), l] tensor in ``dtype``."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2.view(x2.shape[0], -1, l).index_select(1, col_blocks).to(dtype)


class InputShare:
    """One saved copy of an input's columns for the layers that read that same input.

    The union of the members' column blocks (the layers' ``col_blocks`` buffer) is gathered once per input: the
    first member to run on ``x`` saves it and keeps weak references to ``x`` and to the saved tensor; a member
    that then runs on the same ``x`` (identity, unchanged ``x._version``, same dtype) reuses it. Nothing is kept
    alive by the cache: the saved tensor lives as long as some backward graph holds it. A member that runs on a
    different input simply gathers its own copy, so sharing never changes results, only memory.
    """

    def __init__(self):
        self.clear()

    def columns(self, x: torch.Tensor, col_blocks: torch.Tensor, cols_key: tuple, l: int,
                dtype: torch.dtype) -> torch.Tensor:
        """x's column blocks ``col_blocks`` (``cols_key``: the same as a tuple) as [N, len(col_blocks), l] in
        ``dtype``, gathered once per input."""
        if x.is_inference():  # no version counter: no cache
            return _gather_columns(x, col_blocks, l, dtype)
        key = (x._version, dtype, l, cols_key)
        if self._x is not None and self._x() is x and self._key == key:
            saved = self._saved()
            if saved is not None:
                return saved
        saved = _gather_columns(x, col_blocks, l, dtype)
        if not torch.compiler.is_compiling():
            self._x, self._key, self._saved = weakref.ref(x), key, weakref.ref(saved)
        return saved

    def clear(self) -> None:
        self._x = None      # weakref to the last input
        self._key = None    # (x._version, dtype, l, column blocks) it was gathered for
        self._saved = None  # weakref to the gathered columns

    def __getstate__(self):  # copies and pickles start with an empty cache (weak references do not pickle)
        return {}

    def __setstate__(self, state):
        self.clear()


class BlockSparseLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with gradients for ``blocks`` (the selected blocks of W) instead of W.

    ``rows``/``cols`` are the block coordinates; ``col_slot`` maps each block to its column block among the
    column blocks ``col_blocks`` saved from the input (gathered through ``share``, an :class:`InputShare`, with
    ``cols_key`` = ``tuple(col_blocks.tolist())``, if given).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, blocks, rows, cols, col_blocks, col_slot, l, share=None, cols_key=None):
        out = torch.nn.functional.linear(x, weight, bias)  # autocast (if on) applies here as to nn.Linear
        if ctx.needs_input_grad[3] and not torch.is_inference_mode_enabled():
            # only the input columns the selected blocks need: [N, n_col_blocks, l], in the compute dtype
            dtype = _compute_dtype(x)
            if share is None:
                x_cols = _gather_columns(x, col_blocks, l, dtype)
            else:
                x_cols = share.columns(x, col_blocks, cols_key, l, dtype)
        else:
            x_cols = x.new_empty(0)
        ctx.save_for_backward(x_cols, weight, rows, col_slot)
        ctx.l = l
        ctx.in_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.blocks_dtype = blocks.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_cols, weight, rows, col_slot = ctx.saved_tensors
        l = ctx.l
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_blocks = None
        if ctx.needs_input_grad[0]:
            w = weight if weight.dtype == g2.dtype else weight.to(g2.dtype)
            grad_x = (g2 @ w).view(ctx.in_shape).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0, dtype=torch.promote_types(g2.dtype, ctx.bias_dtype)).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            g_rows = g2.view(g2.shape[0], -1, l).index_select(1, rows)        # [N, nb, l]
            x_sel = x_cols.index_select(1, col_slot)                          # [N, nb, l]
            if x_sel.dtype != g_rows.dtype:
                x_sel = x_sel.to(g_rows.dtype)
            grad_blocks = torch.bmm(g_rows.permute(1, 2, 0), x_sel.permute(1, 0, 2))  # [nb, l, l]
            grad_blocks = grad_blocks.to(ctx.blocks_dtype)
        return grad_x, None, grad_bias, grad_blocks, None, None, None, None, None, None, None


def _blocks_of(weight: torch.Tensor, l: int) -> torch.Tensor:
    """A view of a 2-D weight as its l×l blocks: [row block, column block, l, l]."""
    out_f, in_f = weight.shape
    return weight.view(out_f // l, l, in_f // l, l).permute(0, 2, 1, 3)


class SMTLinear(nn.Module):
    """Wraps an ``nn.Linear``: its weight and bias stay frozen; only ``blocks`` (selected l×l blocks) train.

    Call :meth:`write_blocks` after each optimizer step to copy the trained blocks into the dense weight.
    Alone, a layer saves its own blocks' input columns; :func:`share_inputs` lets layers that read the same
    input save them once.
    """

    def __init__(self, linear: nn.Linear, blocks: list[tuple[int, int]], l: int):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if out_f % l or in_f % l:
            raise ValueError(f"block size {l} does not divide the weight shape {tuple(linear.weight.shape)}")
        self.linear = linear
        self.l = l
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        dev = linear.weight.device
        self.block_cols = [int(b[1]) for b in blocks]  # on the host: grouping needs no device round trip
        self.block_rows = [int(b[0]) for b in blocks]
        rows = torch.tensor([b[0] for b in blocks], dtype=torch.long, device=dev)
        cols = torch.tensor(self.block_cols, dtype=torch.long, device=dev)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        # col_blocks: the input column blocks saved for backward (this layer's own, or its share group's union);
        # col_slot: each block's position in col_blocks
        self.register_buffer("col_blocks", torch.empty(0, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("col_slot", torch.empty(0, dtype=torch.long, device=dev), persistent=False)
        self.set_share(None)
        self.blocks = nn.Parameter(_blocks_of(full(linear.weight.data), l)[rows, cols].clone())

    def set_share(self, share: InputShare | None, col_blocks: Iterable[int] | None = None) -> None:
        """Save input columns through ``share`` with the group's union of column blocks ``col_blocks`` (it must
        hold all of this layer's), or, with ``None``, through a group of this layer alone."""
        if share is None:
            share, col_blocks = InputShare(), self.block_cols
        union = sorted(set(int(c) for c in col_blocks))
        pos = {c: i for i, c in enumerate(union)}
        if any(c not in pos for c in self.block_cols):
            raise ValueError("the share group's column blocks miss some of this layer's column blocks")
        dev = self.cols.device
        self.col_blocks = torch.tensor(union, dtype=torch.long, device=dev)
        self.col_slot = torch.tensor([pos[c] for c in self.block_cols], dtype=torch.long, device=dev)
        self.share, self._cols_key = share, tuple(union)

    @torch.no_grad()
    def write_blocks(self) -> None:
        """Copy the trained blocks into the dense weight (sharded, --fsdp: the rows of them this process holds)."""
        w = self.linear.weight.data
        start, mine = local_rows(w)
        values = self.blocks.detach().to(w.dtype)
        if start == 0 and mine.shape[0] == w.shape[0]:  # the whole weight
            _blocks_of(mine, self.l)[self.rows, self.cols] = values
            return
        l, end = self.l, start + mine.shape[0]
        for i, (r, c) in enumerate(zip(self.block_rows, self.block_cols)):
            lo, hi = max(r * l, start), min((r + 1) * l, end)
            if lo < hi:
                mine[lo - start: hi - start, c * l: (c + 1) * l] = values[i, lo - r * l: hi - r * l]

    def forward(self, x):
        return BlockSparseLinearFunction.apply(x, self.linear.weight, self.linear.bias, self.blocks, self.rows,
                                               self.cols, self.col_blocks, self.col_slot, self.l, self.share,
                                               self._cols_key)


def share_inputs(layers: Iterable[SMTLinear]) -> InputShare | None:
    """Make ``layers`` (which read the same input, e.g. q/k/v of one attention) save that input's columns once:
    the union of their column blocks, gathered by whichever runs first. Returns the group (None if empty)."""
    layers = list(layers)
    if not layers:
        return None
    if len({(m.l, m.linear.in_features) for m in layers}) != 1:
        raise ValueError("layers that share an input need the same block size and input width")
    share = InputShare()
    union = sorted({c for m in layers for c in m.block_cols})
    for m in layers:
        m.set_share(share, union)
    return share


def unshare_inputs(layers: Iterable[SMTLinear]) -> None:
    """Each layer back to saving its own input columns."""
    for m in layers:
        m.set_share(None)


def saved_activation_bytes(model, fn):
    """Run ``fn()`` recording saved-for-backward tensors: (result, SMT layers' bytes, all bytes), each over
    distinct storages, parameters and buffers left out."""
    smt, everything, inside = {}, {}, [False]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        everything[key] = t.untyped_storage().nbytes()
        if inside[0]:
            smt[key] = everything[key]
        return t
    hooks = []
    for m in model.modules():
        if isinstance(m, SMTLinear):
            hooks.append(m.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)))
            hooks.append(m.register_forward_hook(lambda *a: inside.__setitem__(0, False)))
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    return (out, sum(v for k, v in smt.items() if k not in weights),
            sum(v for k, v in everything.items() if k not in weights))
