"""SMT's sparse block linear layer: dense forward, backward that computes only the selected l×l blocks'
weight gradients (one batched matmul over the gathered blocks) and keeps only the input columns they need."""
from __future__ import annotations

import torch
from torch import nn


class BlockSparseLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with gradients for ``blocks`` (the selected blocks of W) instead of W.

    ``rows``/``cols`` are the block coordinates; ``col_slot`` maps each block to its column block among the
    distinct column blocks saved from the input.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, blocks, rows, cols, col_blocks, col_slot, l):
        out = torch.nn.functional.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[3]:
            # only the input columns the selected blocks need: [N, n_col_blocks, l]
            x_cols = x2.view(x2.shape[0], -1, l).index_select(1, col_blocks)
        else:
            x_cols = x2.new_empty(0)
        ctx.save_for_backward(x_cols, weight, rows, col_slot)
        ctx.l = l
        ctx.in_shape = x.shape
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_cols, weight, rows, col_slot = ctx.saved_tensors
        l = ctx.l
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight).view(ctx.in_shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            g_rows = g2.view(g2.shape[0], -1, l).index_select(1, rows)        # [N, nb, l]
            x_sel = x_cols.index_select(1, col_slot)                          # [N, nb, l]
            grad_blocks = torch.bmm(g_rows.permute(1, 2, 0), x_sel.permute(1, 0, 2))  # [nb, l, l]
        return grad_x, None, grad_bias, grad_blocks, None, None, None, None, None


class SMTLinear(nn.Module):
    """Wraps an ``nn.Linear``: its weight and bias stay frozen; only ``blocks`` (selected l×l blocks) train.

    Call :meth:`write_blocks` after each optimizer step to copy the trained blocks into the dense weight.
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
        rows = torch.tensor([b[0] for b in blocks], dtype=torch.long, device=dev)
        cols = torch.tensor([b[1] for b in blocks], dtype=torch.long, device=dev)
        col_blocks, col_slot = torch.unique(cols, return_inverse=True)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("col_blocks", col_blocks, persistent=False)
        self.register_buffer("col_slot", col_slot, persistent=False)
        self.blocks = nn.Parameter(self._weight_blocks()[rows, cols].clone())

    def _weight_blocks(self):
        out_f, in_f = self.linear.weight.shape
        l = self.l
        return self.linear.weight.data.view(out_f // l, l, in_f // l, l).permute(0, 2, 1, 3)

    @torch.no_grad()
    def write_blocks(self) -> None:
        self._weight_blocks()[self.rows, self.cols] = self.blocks.detach().to(self.linear.weight.dtype)

    def forward(self, x):
        return BlockSparseLinearFunction.apply(x, self.linear.weight, self.linear.bias, self.blocks, self.rows,
                                               self.cols, self.col_blocks, self.col_slot, self.l)
