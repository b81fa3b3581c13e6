"""Tensors that may be sharded: with --fsdp each parameter (and its gradient and optimizer state) is a DTensor
of which this process holds a slice of rows. The pure parts of the code (importance, SMT's blocks) work on that
slice through these three functions, and on a plain tensor as a whole."""
from __future__ import annotations

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_rows(t: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(first row, slice): where this process's rows of ``t`` start in the whole tensor, and those rows (FSDP2
    shards dimension 0); ``(0, t)`` for a plain tensor."""
    if not hasattr(t, "to_local"):
        return 0, t
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[0]), t.to_local()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process when sharded: every process must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
