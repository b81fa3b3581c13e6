"""Processes: the Accelerator that owns them, how a global batch is split over processes and micro-batches,
and the reductions the loop and the Trainer callback both use (gradients of exactly the trainable tensors,
FLOPs sums, process 0's decision)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..data import group_by_length
from ..errors import UsageError


def build_accelerator(device, trackers=(), logging_dir=None):
    """The run's ``Accelerator``: processes (torchrun / accelerate launch: gloo on CPU, nccl on GPU) and the
    device of this process. Precision is applied by :func:`autocast_for` and the loop (not accelerate's
    wrappers), so the importance probe can step the optimizer outside any scaler."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, parse_flag_from_env
    for flag, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if parse_flag_from_env(flag):  # (accelerate launch with such a config sets these)
            raise UsageError(f"Accelerate's {what} config is not used by greentrainer: for sharded training launch "
                             f"with a plain multi-process config (or torchrun) and pass --fsdp (FSDP2, applied "
                             f"after the method has chosen what trains)")
    acc = Accelerator(cpu=torch.device(device).type == "cpu", log_with=list(trackers) or None,
                      project_dir=str(logging_dir) if logging_dir is not None else None)
    sharded = {DistributedType.FSDP, DistributedType.DEEPSPEED, getattr(DistributedType, "MEGATRON_LM", None)}
    if acc.distributed_type in sharded:  # their wrapping happens in prepare(), before the trainable set exists
        raise UsageError(f"Accelerate's {acc.distributed_type.value} config is not used by greentrainer: for sharded "
                         f"training launch with a plain multi-process config (or torchrun) and pass --fsdp "
                         f"(FSDP2, applied after the method has chosen what trains)")
    return acc


def global_batches(n_items: int, batch_size: int, world: int, accum: int, rank: int, generator,
                   lengths: list[int] | None = None) -> list[list[list[int]]]:
    """An epoch's optimizer steps; for each, this process's micro-batches (lists of item indices).

    Step t takes items ``perm[t·G:(t+1)·G]`` with ``G = batch_size·world·accum``, whatever the number of
    processes; micro-batch k of process r gets every (world·accum)-th of them from k·world + r (strided, so a
    short last step spreads evenly; a process may get an empty micro-batch there). ``lengths``
    (``--group-by-length``): the random order is cut into runs of ``GROUP_SPAN`` global batches and each run is
    sorted by length into global batches, shuffled, so a global batch holds items of similar length (less
    padding) and the order stays random: transformers' LengthGroupedSampler, over global batches so every
    process count makes the same steps (:func:`~greentrainer.data.group_by_length`)."""
    perm = torch.randperm(n_items, generator=generator).tolist()
    g = batch_size * world * accum
    if lengths is not None:
        perm = group_by_length(perm, lengths, g, generator)
    return [shard(perm[t: t + g], world, accum, rank) for t in range(0, n_items, g)]


def shard(items: list, world: int, accum: int, rank: int) -> list[list]:
    """Process ``rank``'s micro-batches of one global batch: micro-batch k gets every (world·accum)-th item
    from k·world + rank."""
    return [items[k * world + rank:: world * accum] for k in range(accum)]


def sync_gradients(params, reduce_sum, bucket_bytes: int = 32 * 2**20) -> None:
    """All-reduce (sum) the gradients of exactly ``params``, flattened into buckets of one dtype.

    DDP registers its hooks for the tensors that require grad when it wraps the model, so a tensor selected
    later would never be reduced; reducing the trainable tensors at each step has no such state. A process
    that had no gradient for a trainable tensor (an empty micro-batch) contributes zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        bucket, size = [], 0
        for p in group + [None]:
            if p is not None:
                bucket.append(p)
                size += p.grad.numel() * p.grad.element_size()
            if bucket and (p is None or size >= bucket_bytes):
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                flat = reduce_sum(flat)
                offset = 0
                for q in bucket:
                    n = q.grad.numel()
                    q.grad.copy_(flat[offset: offset + n].view_as(q.grad))
                    offset += n
                bucket, size = [], 0


def several_processes() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_sum(value, device=None):
    """Sum of a number or tensor over processes, in float64 (the value itself with one process); ``device``:
    where the backend reduces (NCCL: the GPU)."""
    if not several_processes():
        return value
    t = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return t.item() if not isinstance(value, torch.Tensor) else t.to(value.dtype)


def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    return reduce_sum(t, t.device) / dist.get_world_size() if several_processes() else t


def sum_over_processes(xs: list[float], device=None) -> list[float]:
    """``xs`` summed over the processes in one all-reduce (themselves on one)."""
    if not several_processes():
        return [float(x) for x in xs]
    return reduce_sum(torch.tensor([float(x) for x in xs], dtype=torch.float64, device=device), device).tolist()


def from_process_zero(obj):
    """Process 0's ``obj`` on every process (a picklable object): every process takes its decision."""
    if not several_processes():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
