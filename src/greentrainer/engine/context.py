"""What a method may look at and act on during a run (the loop's side of the Method interface, and the host the
GreenTrainer controller is driven through)."""
from __future__ import annotations

import contextlib
import dataclasses
import random

import torch

from ..data import collate, mean_padded_size, target_tokens
from ..flops import FlopCounter
from .distributed import from_process_zero, reduce_sum, shard, sync_gradients
from .precision import autocast_for


@dataclasses.dataclass
class TrainContext:
    """What a method may look at and act on."""

    model: torch.nn.Module
    tokenizer: object
    cfg: object
    device: torch.device
    train_data: list
    profile: object                 # TensorFlopsProfile at the run's typical batch shape
    meta_model: torch.nn.Module     # weightless copy of the base model (FLOPs references)
    seq2seq: bool
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    epoch: int = 0
    global_step: int = 0
    total_steps: int = 0
    schedule_steps: int = 0         # steps the learning-rate schedule spans (0: total_steps; Method.schedule_steps)
    steps_per_epoch: int = 0
    flops: dict = dataclasses.field(default_factory=lambda: {"forward": 0, "backward": 0, "overhead": 0})
    flops_reference: int = 0        # measured FLOPs full fine-tuning would have spent on the steps so far
    log: object = print
    accelerator: object = None      # owns processes and devices; methods use the helpers below, never it
    scaler: object = None           # torch.amp.GradScaler under 16-mixed
    count_cache: dict = dataclasses.field(default_factory=dict)  # (kind, step_key) -> FLOPs counted once
    live_counting: bool = False     # count every step (no cache); tests compare the two
    grid: object = None             # energy.Grid: the grid intensity now (fixed, or along a trace)
    train_seconds: float = 0.0      # measured training time so far (the clock a carbon trace is read along)
    sharded: bool = False           # --fsdp on several processes: FSDP2 reduces the gradients
    planned_references: object = None  # () -> full FT's FLOPs of each step of the run, in its order (the loop's)
    _probe_rng: random.Random = dataclasses.field(default_factory=lambda: random.Random(0))

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def lengths(self) -> list[int]:
        """Each training item's tokens (input and target for seq2seq): what --group-by-length sorts by."""
        return [len(e.input_ids) + (len(e.labels) if self.seq2seq else 0) for e in self.train_data]

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.cfg.gradient_checkpointing)

    def expected_step_scale(self) -> float:
        """A step's expected size (its data's mean padded batch) over the profiled batch shape's."""
        p = self.profile
        return mean_padded_size(self.train_data, p.batch_size, self.seq2seq,
                                grouped=bool(getattr(self.cfg, "group_by_length", False))) / (p.seq_len + p.target_len)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches each process runs per optimizer step (the gradient accumulation steps)."""
        return self.cfg.grad_accum

    def reduce_sum(self, value):
        """Sum of a number or tensor over processes (the value itself with one process)."""
        return value if self.world_size == 1 else reduce_sum(value, self.device)

    def sum_shards(self, x):
        """Per-tensor sums over this process's slices of sharded tensors, summed over processes (a float64
        array); unchanged when nothing is sharded."""
        if not self.sharded:
            return x
        import numpy as np
        return np.asarray(reduce_sum(torch.as_tensor(np.asarray(x, dtype=np.float64)), self.device).cpu().numpy())

    def broadcast(self, obj):
        """Process 0's ``obj`` on every process (a picklable object)."""
        return obj if self.world_size == 1 else from_process_zero(obj)

    def global_flops(self) -> tuple[float, float]:
        """(FLOPs spent, FLOPs full fine-tuning would have spent), summed over processes."""
        spent = self.reduce_sum(float(sum(self.flops.values())))
        return spent, self.reduce_sum(float(self.flops_reference))

    @contextlib.contextmanager
    def count(self, kind: str, key=None):
        """Count the FLOPs executed inside the block under ``kind`` (forward/backward/overhead).

        With a ``key`` (what decides the work: batch shape and trainable set, see :func:`step_key`), the
        block is counted the first time that key is seen and the count is reused afterwards, so the
        per-operation counting costs nothing in the hot loop (dense models: FLOPs depend on shapes only)."""
        if key is not None and (kind, key) in self.count_cache:
            yield None
            self.flops[kind] = self.flops.get(kind, 0) + self.count_cache[(kind, key)]
            return
        counter = FlopCounter()
        with counter:
            yield counter
        self.flops[kind] = self.flops.get(kind, 0) + counter.total
        if key is not None:
            self.count_cache[(kind, key)] = counter.total

    def collate(self, items):
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in
                collate(items, self.tokenizer.pad_token_id, self.seq2seq).items()}

    def sample_batches(self, steps: int = 1) -> tuple[list[dict], list[float]]:
        """A random global batch for a probe (``steps`` training steps' worth), split like a training step:
        this process's micro-batches and each one's share of the global batch's target tokens (the same items
        whatever the process count)."""
        world, accum = self.world_size, self.micro_batches_per_step * steps
        n = min(self.cfg.batch_size * world * accum, len(self.train_data))
        items = self._probe_rng.sample(self.train_data, n)
        rank = self.accelerator.process_index if self.accelerator is not None else 0
        micro = shard(items, world, accum, rank)
        if self.sharded:  # every process runs as many passes (FSDP's collectives); a stand-in weighs 0
            micro = [m or [items[0]] for m in micro]
            empty = [not m for m in shard(items, world, accum, rank)]
        else:
            micro, empty = [m for m in micro if m], None
        batches = [self.collate(m) for m in micro]
        tokens = [0 if empty and empty[i] else target_tokens(b, self.seq2seq) for i, b in enumerate(batches)]
        total = max(self.reduce_sum(sum(tokens)), 1)
        return batches, [t / total for t in tokens]

    def sync_gradients(self) -> None:
        """Sum the trainable tensors' gradients over processes (see :func:`sync_gradients`)."""
        self.reduce_gradients([p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad])

    def rebuild_optimizer(self, params) -> None:
        """AdamW over ``params`` with the run's linear schedule, continued from the current step (built once at
        the start, and again by a method whose trainable tensors are replaced, e.g. SMT's blocks)."""
        from transformers import get_linear_schedule_with_warmup
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, self.cfg.warmup_steps,
                                                         self.schedule_steps or self.total_steps)
        import warnings
        with warnings.catch_warnings():  # fast-forward the schedule; no optimizer step is skipped
            warnings.simplefilter("ignore")
            for _ in range(self.global_step):
                self.scheduler.step()

    def reduce_gradients(self, params) -> None:
        if self.sharded:  # FSDP has reduce-scattered its tensors'; a tensor it does not manage (SMT's blocks,
            params = [p for p in params if not hasattr(p, "to_local")]  # installed later) is summed here
        if self.world_size > 1 and params:
            sync_gradients(params, self.reduce_sum)

    def autocast(self):
        return autocast_for(self.cfg, self.device)
