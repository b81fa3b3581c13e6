"""The one training loop. Methods plug in through :class:`greentrainer.methods.base.Method`.

Every forward, backward and method overhead pass runs under a FLOPs counter, so the reported cost is what
was executed. The cost of full fine-tuning on the same batches is measured on a weightless (meta) copy,
which gives every run its fraction of full fine-tuning without running it.

Distribution and precision belong to one ``accelerate.Accelerator`` built by the caller (or here): each
optimizer step takes one *global batch* of ``batch_size × processes × grad_accum`` items, the same items
whatever the number of processes; each process runs its share as micro-batches, the loss of each is
weighted by its share of the global batch's target tokens, and the gradients of exactly the tensors that
are trainable now are summed over processes before the step (see :func:`sync_gradients`), so a trainable
set that changes during training stays consistent on every process. Methods never see ranks or devices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import collate, mean_padded_size, typical_shape
from .errors import NonFiniteError, UsageError
from .rng import as_tuples, rng_state, set_rng_state
from .interrupts import critical

from .energy import COMPONENTS, EnergyMeter, add_readings, build_grid, step_emissions
from .flops import (FlopCounter, full_step_flops, layer_forward_flops, meta_model_from_config, profile_config,
                    with_recompute)


class PeakMemory:
    """Peak memory of this process (CPU: resident set sampled every 20 ms; CUDA: allocator peak)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                import os
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self.rss()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


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
    _probe_rng: random.Random = dataclasses.field(default_factory=lambda: random.Random(0))

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.cfg.gradient_checkpointing)

    def expected_step_scale(self) -> float:
        """A step's expected size (its data's mean padded batch) over the profiled batch shape's."""
        p = self.profile
        return mean_padded_size(self.train_data, p.batch_size, self.seq2seq) / (p.seq_len + p.target_len)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches each process runs per optimizer step (the gradient accumulation steps)."""
        return self.cfg.grad_accum

    def reduce_sum(self, value):
        """Sum of a number or tensor over processes (the value itself with one process)."""
        if self.world_size == 1:
            return value
        from accelerate.utils import reduce
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        out = reduce(t, reduction="sum")
        return out.item() if not isinstance(value, torch.Tensor) else out.to(value.dtype)

    def broadcast(self, obj):
        """Process 0's ``obj`` on every process (a picklable object)."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

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
        return {k: v.to(self.device) for k, v in
                collate(items, self.tokenizer.pad_token_id, self.seq2seq).items()}

    def sample_batches(self, steps: int = 1) -> tuple[list[dict], list[float]]:
        """A random global batch for a probe (``steps`` training steps' worth), split like a training step:
        this process's micro-batches and each one's share of the global batch's target tokens (the same items
        whatever the process count)."""
        world, accum = self.world_size, self.micro_batches_per_step * steps
        n = min(self.cfg.batch_size * world * accum, len(self.train_data))
        items = self._probe_rng.sample(self.train_data, n)
        rank = self.accelerator.process_index if self.accelerator is not None else 0
        batches = [self.collate(m) for m in shard(items, world, accum, rank) if m]
        tokens = [target_tokens(b, self.seq2seq) for b in batches]
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
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, self.cfg.warmup_steps, self.total_steps)
        import warnings
        with warnings.catch_warnings():  # fast-forward the schedule; no optimizer step is skipped
            warnings.simplefilter("ignore")
            for _ in range(self.global_step):
                self.scheduler.step()

    def reduce_gradients(self, params) -> None:
        if self.world_size > 1:
            sync_gradients(params, self.reduce_sum)

    def autocast(self):
        return autocast_for(self.cfg, self.device)


def precision_of(cfg) -> str:
    """The run's precision; ``bf16=True`` (the older flag) means bf16-mixed."""
    return "bf16-mixed" if cfg.precision == "32-true" and cfg.bf16 else cfg.precision


def autocast_for(cfg, device):
    p = precision_of(cfg)
    dtype = torch.float16 if p == "16-mixed" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=p.endswith("-mixed"))


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


def step_key(model, batch: dict) -> tuple:
    """What a step's FLOPs depend on: the batch's tensor shapes and which parameters train."""
    shapes = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor))
    return shapes, tuple(id(p) for p in model.parameters() if p.requires_grad)


def target_tokens(batch: dict, seq2seq: bool) -> int:
    """Tokens the loss averages over (a causal LM predicts each label from the previous position)."""
    labels = batch["labels"] if seq2seq else batch["labels"][:, 1:]
    return int((labels != -100).sum())


def global_batches(n_items: int, batch_size: int, world: int, accum: int, rank: int, generator) -> list[list[list[int]]]:
    """An epoch's optimizer steps; for each, this process's micro-batches (lists of item indices).

    Step t takes items ``perm[t·G:(t+1)·G]`` with ``G = batch_size·world·accum``, whatever the number of
    processes; micro-batch k of process r gets every (world·accum)-th of them from k·world + r (strided, so a
    short last step spreads evenly; a process may get an empty micro-batch there)."""
    perm = torch.randperm(n_items, generator=generator).tolist()
    g = batch_size * world * accum
    return [shard(perm[t: t + g], world, accum, rank) for t in range(0, n_items, g)]


def shard(items: list, world: int, accum: int, rank: int) -> list[list]:
    """Process ``rank``'s micro-batches of one global batch: micro-batch k gets every (world·accum)-th item
    from k·world + rank."""
    return [items[k * world + rank:: world * accum] for k in range(accum)]


def fmt_flops(x: float) -> str:
    """FLOPs in a readable unit (GFLOPs, TFLOPs or PFLOPs)."""
    for unit, scale in (("PFLOPs", 1e15), ("TFLOPs", 1e12)):
        if x >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x / 1e9:.3f} GFLOPs"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def eval_loss(model, ctx, data, batch_size: int) -> float:
    """Mean loss per target token over ``data`` (each process takes every world_size-th item)."""
    model.eval()
    mine = data[ctx.accelerator.process_index:: ctx.world_size] if ctx.accelerator is not None else data
    total, n = 0.0, 0
    for i in range(0, len(mine), batch_size):
        batch = ctx.collate(mine[i: i + batch_size])
        with ctx.autocast():
            loss = model(**batch).loss
        k = target_tokens(batch, ctx.seq2seq)
        total += float(loss) * k
        n += k
    model.train()
    return ctx.reduce_sum(total) / max(ctx.reduce_sum(n), 1)


def check_finite_loss(loss, ctx) -> None:
    """Stop before a non-finite loss reaches the weights."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteError(f"non-finite training loss ({loss.item()}) at step {ctx.global_step + 1} "
                             f"(epoch {ctx.epoch + 1}); the learning rate ({ctx.cfg.lr:g}) may be too high")


def check_finite_grads(optimizer, ctx) -> None:
    """Stop before a non-finite gradient reaches the weights (one norm per trainable tensor)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()):
        raise NonFiniteError(f"non-finite gradient at step {ctx.global_step + 1} (epoch {ctx.epoch + 1}); "
                             f"the learning rate ({ctx.cfg.lr:g}) may be too high")


def run_profile(config, shape, gradient_checkpointing: bool):
    """The per-tensor FLOPs profile a run budgets with: at its typical batch shape, and with each block's
    recompute under activation checkpointing."""
    profile = profile_config(config, *shape)
    if gradient_checkpointing:
        meta = meta_model_from_config(config)
        profile = with_recompute(profile, meta, layer_forward_flops(meta, *shape))
    return profile


def reference_step_flops(meta_model, batch: dict, gradient_checkpointing: bool, cache: dict) -> int:
    """What full fine-tuning spends on this batch (with the same activation checkpointing), measured once per
    batch shape (``cache``)."""
    key = (tuple(batch["input_ids"].shape), tuple(batch["labels"].shape))
    if key not in cache:
        cache[key] = _reference_flops(meta_model, batch, gradient_checkpointing)
    return cache[key]


def _reference_flops(meta_model, batch: dict, gradient_checkpointing: bool) -> int:
    flops = full_step_flops(meta_model, batch)
    if gradient_checkpointing:
        ids, labels = batch["input_ids"], batch["labels"]
        target = labels.shape[1] if getattr(meta_model.config, "is_encoder_decoder", False) else None
        flops += sum(layer_forward_flops(meta_model, ids.shape[0], ids.shape[1], target).values())
    return flops


def enable_checkpointing(model) -> None:
    """Activation checkpointing (non-reentrant) that keeps the backward as short as the trainable set:
    transformers makes the embedding output require grad when it enables checkpointing, which would
    run every backward to the bottom; non-reentrant checkpointing does not need it, so it is turned off."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # early_stop=False: a block reached by the backward is recomputed whole, so its cost is known in advance
    # (stopping early saves a little in the deepest block, by an amount that depends on what trains there)
    kwargs = {"use_reentrant": False, "early_stop": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5 (the older name is deprecated)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()
    # it keeps one hook's handle: a hook registered twice (the Trainer enables checkpointing on a peft model,
    # then this) would stay, so every such hook on the input embeddings goes (transformers' and peft's)
    emb = base.get_input_embeddings()
    for key, hook in list(getattr(emb, "_forward_hooks", {}).items()):
        if "make_inputs_require_grad" in getattr(hook, "__qualname__", ""):
            del emb._forward_hooks[key]
    base.config.use_cache = False


def build_accelerator(device, trackers=(), logging_dir=None):
    """The run's ``Accelerator``: processes (torchrun / accelerate launch: gloo on CPU, nccl on GPU) and the
    device of this process. Precision is applied by :func:`autocast_for` and the loop (not accelerate's
    wrappers), so the importance probe can step the optimizer outside any scaler."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    acc = Accelerator(cpu=torch.device(device).type == "cpu", log_with=list(trackers) or None,
                      project_dir=str(logging_dir) if logging_dir is not None else None)
    sharded = {DistributedType.FSDP, DistributedType.DEEPSPEED, getattr(DistributedType, "MEGATRON_LM", None)}
    if acc.distributed_type in sharded:
        raise UsageError(f"{acc.distributed_type.value} is not supported: greentrainer trains data-parallel "
                         f"(every process holds the whole model and the trainable set changes during training); "
                         f"launch without an FSDP/DeepSpeed config (plain multi-GPU/multi-CPU works)")
    return acc


@dataclasses.dataclass
class RunHandle:
    """What the caller of :func:`train` can see while it runs: the model being trained (the method may have
    wrapped it) and the optimizer steps completed, so an interrupted or failed run can save its weights."""

    model: torch.nn.Module | None = None
    global_step: int = 0
    optimizer: torch.optim.Optimizer | None = None  # the one in use (a method may have rebuilt it)


def train(model, tokenizer, method, train_data, val_data, cfg, device=None, log=print, progress=True,
          on_epoch_end=None, accelerator=None, resume: dict | None = None, on_checkpoint=None,
          live_counting: bool = False, handle: RunHandle | None = None, grid=None, energy_meter="auto") -> dict:
    """Train ``model`` with ``method``; returns per-epoch history and totals (FLOPs, time, memory), the
    FLOPs summed over processes. ``on_checkpoint(state)`` receives a :func:`training_state` every
    ``cfg.save_every`` optimizer steps (default: at the end of each epoch but the last); ``resume`` is such a
    state to continue from. ``grid``: the :class:`~greentrainer.energy.Grid` (default: from ``cfg``);
    ``energy_meter``: an :class:`~greentrainer.energy.EnergyMeter`, None for none, "auto" for one when
    ``cfg.track_energy``."""
    acc = accelerator or build_accelerator(device if device is not None else "cpu")
    device = acc.device if device is None or acc.num_processes > 1 else torch.device(device)
    seed_everything(cfg.seed)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    meta_model = meta_model_from_config(model.config)
    shape = typical_shape(train_data, cfg.batch_size, seq2seq)
    profile = run_profile(model.config, shape, cfg.gradient_checkpointing)
    model.to(device)
    main = acc.is_main_process
    ctx = TrainContext(model=model, tokenizer=tokenizer, cfg=cfg, device=device, train_data=train_data,
                       profile=profile, meta_model=meta_model, seq2seq=seq2seq, log=log if main else _silent,
                       accelerator=acc, live_counting=live_counting,
                       grid=grid if grid is not None else grid_of(cfg))
    if energy_meter == "auto":
        energy_meter = EnergyMeter(device) if cfg.track_energy else None
    ctx._probe_rng = random.Random(cfg.seed + 1)  # the same on every process: probes split one global batch
    generator = torch.Generator().manual_seed(cfg.seed)
    world, accum = acc.num_processes, ctx.micro_batches_per_step
    ctx.steps_per_epoch = -(-len(train_data) // (cfg.batch_size * world * accum))
    ctx.total_steps = ctx.steps_per_epoch * cfg.epochs
    model = method.prepare(model, ctx)
    if precision_of(cfg) == "bf16-true":
        model.to(torch.bfloat16)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    ctx.model = model
    if handle is not None:
        handle.model = model
    model.to(device)
    model.train()
    params = method.optimizer_parameters(model)
    if not params:
        raise RuntimeError(f"method {method.name} left no parameter to train")
    ctx.rebuild_optimizer(params)
    if precision_of(cfg) == "16-mixed":
        ctx.scaler = torch.amp.GradScaler(device.type)
    ctx.log(f"{world} process(es) × batch {cfg.batch_size} × {accum} accumulation step(s) = effective batch "
            f"{cfg.batch_size * world * accum}; precision {precision_of(cfg)}; {ctx.total_steps} optimizer steps")
    history = []
    start = restore_training_state(ctx, method, resume, history) if resume is not None else None
    if start is not None:
        ctx.log(f"resuming at optimizer step {ctx.global_step} (epoch {start.epoch + 1}, step "
                f"{start.steps_done + 1} of the epoch)")
    _epochs(ctx, method, generator, val_data, history, {}, cfg, progress and main, on_epoch_end, start,
            on_checkpoint, handle, energy_meter)
    totals = {k: sum(h[k] for h in history) for k in
              ("flops_forward", "flops_backward", "flops_overhead", "flops_total", "flops_full_ft_reference",
               "time_s")}
    totals["flops_fraction_of_full"] = totals["flops_total"] / totals["flops_full_ft_reference"]
    totals["steps"] = ctx.global_step
    spent, reference = ctx.global_flops()
    totals.update(method.budget_report(spent, reference))  # a method with a FLOPs budget: was it kept?
    if energy_meter is not None:
        for k in ENERGY_KEYS:
            totals[k] = sum(h[k] for h in history)
        totals["energy"] = energy_meter.describe()
    else:
        totals["energy"] = {"kind": "off"}
    totals["peak_memory_bytes"] = max(h["peak_memory_bytes"] for h in history)
    totals.update(method.trainable_summary(ctx.model))
    totals.update(world_size=world, grad_accum=accum, effective_batch_size=cfg.batch_size * world * accum,
                  precision=precision_of(cfg))
    return {"history": history, "totals": totals, "model": ctx.model, "profile_shape": list(shape)}


def _silent(*args, **kwargs) -> None:
    """Logging of processes other than the first."""


def _optimizer_step(ctx, method, batches: list[dict]) -> tuple[float, int]:
    """One optimizer step over this process's micro-batches; returns (Σ loss·tokens, tokens) of this process.

    Each micro-batch's mean loss is weighted by its share of the global batch's target tokens, so the
    gradient is that of the mean over all target tokens of the step, however the items are split over
    processes and micro-batches."""
    model = ctx.model
    local = [target_tokens(b, ctx.seq2seq) for b in batches]
    total = max(int(ctx.reduce_sum(sum(local))), 1)
    loss_sum = 0.0
    for batch, n in zip(batches, local):
        key = None if ctx.live_counting else step_key(model, batch)
        with ctx.count("forward", key), ctx.autocast():
            loss = model(**batch).loss
        if not loss.requires_grad:
            raise RuntimeError("no tensor is trainable in this step (everything is frozen)")
        check_finite_loss(loss, ctx)
        weighted = loss * (n / total)
        with ctx.count("backward", key):
            (ctx.scaler.scale(weighted) if ctx.scaler is not None else weighted).backward()
        loss_sum += loss.item() * n
    ctx.sync_gradients()
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)  # a non-finite gradient here makes the scaler skip the step
    else:
        check_finite_grads(ctx.optimizer, ctx)
    with critical():  # an interrupt never leaves a half-updated model
        if ctx.scaler is not None:
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
        else:
            ctx.optimizer.step()
        ctx.scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.global_step += 1
        method.after_optimizer_step(ctx)
    return loss_sum, sum(local)


@dataclasses.dataclass
class EpochProgress:
    """Where an epoch stands: enough to continue it from a checkpoint exactly."""

    epoch: int
    generator_state: torch.Tensor      # the data-order generator before this epoch's permutation
    steps_done: int = 0
    flops_before: dict = dataclasses.field(default_factory=dict)
    reference_before: float = 0.0
    losses: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    val_curve: list = dataclasses.field(default_factory=list)  # [optimizer step, validation loss] (--eval-steps)
    energy: dict = dataclasses.field(default_factory=dict)     # kWh by component so far (this process)
    step_log: list = dataclasses.field(default_factory=list)   # [step, train s at its end, its s, FLOPs, reference]


def _epochs(ctx, method, generator, val_data, history, ref_cache, cfg, progress, on_epoch_end,
            resume: EpochProgress | None = None, on_checkpoint=None, handle: RunHandle | None = None,
            meter=None):
    acc = ctx.accelerator
    save_every = cfg.save_every
    for epoch in range(resume.epoch if resume else 0, cfg.epochs):
        ctx.epoch = epoch
        if resume is not None and resume.epoch == epoch:
            ep, resume = resume, None
            generator.set_state(ep.generator_state)
        else:
            ep = EpochProgress(epoch, generator.get_state(), flops_before=dict(ctx.flops),
                               reference_before=ctx.flops_reference)
        steps = global_batches(len(ctx.train_data), cfg.batch_size, acc.num_processes,
                               ctx.micro_batches_per_step, acc.process_index, generator)
        if cfg.eval_steps and val_data and ctx.global_step == 0 and ep.steps_done == 0:
            ep.val_curve.append([0, eval_loss(ctx.model, ctx, val_data, cfg.eval_batch_size)])
        t0, bookkeeping = time.perf_counter(), 0.0
        trained_before = sum(h["time_s"] for h in history) + ep.elapsed
        ctx.train_seconds = trained_before
        if meter is not None:
            meter.start()
        with PeakMemory(ctx.device) as mem:
            if ep.steps_done == 0:
                method.on_epoch_start(ctx)
            bar = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs} [{method.name}]", disable=not progress,
                       leave=False, dynamic_ncols=True, initial=ep.steps_done)
            for i, micro in enumerate(bar):
                if i < ep.steps_done:  # resumed: these steps are in the checkpoint
                    continue
                batches = [ctx.collate([ctx.train_data[j] for j in idx]) for idx in micro if idx]
                s0, flops0, ref0 = time.perf_counter(), sum(ctx.flops.values()), ctx.flops_reference
                method.on_step_start(ctx)
                loss_sum, n_tokens = _optimizer_step(ctx, method, batches)
                if handle is not None:
                    handle.global_step, handle.optimizer = ctx.global_step, ctx.optimizer
                r0 = time.perf_counter()  # bookkeeping, not training: kept out of the epoch's time
                ctx.train_seconds = trained_before + r0 - t0 - bookkeeping
                for batch in batches:
                    ctx.flops_reference += reference_step_flops(ctx.meta_model, batch, cfg.gradient_checkpointing,
                                                                ref_cache)
                ep.step_log.append([ctx.global_step, ctx.train_seconds, r0 - s0, sum(ctx.flops.values()) - flops0,
                                    ctx.flops_reference - ref0])
                ep.losses.append(ctx.reduce_sum(loss_sum) / max(ctx.reduce_sum(n_tokens), 1))
                ep.steps_done = i + 1
                if acc.trackers and ctx.global_step % cfg.logging_steps == 0:
                    _log_step(ctx, ep.losses[-cfg.logging_steps:])
                if cfg.eval_steps and val_data and ctx.global_step % cfg.eval_steps == 0 \
                        and ep.steps_done < len(steps):  # (the epoch's end computes it anyway)
                    ep.val_curve.append([ctx.global_step, eval_loss(ctx.model, ctx, val_data, cfg.eval_batch_size)])
                bar.set_postfix(loss=f"{ep.losses[-1]:.3f}")
                if on_checkpoint is not None and save_every and ctx.global_step % save_every == 0 \
                        and ep.steps_done < len(steps):
                    if meter is not None:
                        ep.energy = add_readings(ep.energy, meter.lap())
                    on_checkpoint(training_state(ctx, method, ep, history,
                                                 ep.elapsed + time.perf_counter() - t0 - bookkeeping))
                bookkeeping += time.perf_counter() - r0
        elapsed = ep.elapsed + time.perf_counter() - t0 - bookkeeping
        if meter is not None:
            ep.energy = add_readings(ep.energy, meter.stop())
        val = eval_loss(ctx.model, ctx, val_data, cfg.eval_batch_size) if val_data else None
        if cfg.eval_steps and val is not None:
            ep.val_curve.append([ctx.global_step, val])
        spent = {k: ctx.reduce_sum(float(ctx.flops[k] - ep.flops_before.get(k, 0))) for k in ctx.flops}
        ref_epoch = ctx.reduce_sum(float(ctx.flops_reference - ep.reference_before))
        total = sum(spent.values())
        peak = ctx.reduce_sum(float(mem.peak)) / acc.num_processes
        rec = {"epoch": epoch + 1, "steps": len(steps), "train_loss": float(np.mean(ep.losses)), "val_loss": val,
               "flops_forward": spent["forward"], "flops_backward": spent["backward"],
               "flops_overhead": spent["overhead"], "flops_total": total,
               "flops_full_ft_reference": ref_epoch, "flops_fraction_of_full": total / ref_epoch,
               "time_s": elapsed, "peak_memory_bytes": peak, **method.epoch_report()}
        if meter is not None:
            rec.update(epoch_energy(ctx, ep, history, rec))
        if cfg.eval_steps:
            rec["val_curve"] = ep.val_curve
        history.append(rec)
        val_text = f"{val:.4f}" if val is not None else "n/a"
        ctx.log(f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f}  val loss {val_text}  "
                f"{fmt_flops(total)} ({100 * rec['flops_fraction_of_full']:.1f}% of full FT)  "
                f"{elapsed:.1f} s  peak mem {peak / 2**20:.0f} MiB"
                + (f" (mean of {acc.num_processes} processes)" if acc.num_processes > 1 else ""))
        if acc.trackers:
            acc.log({f"epoch/{k}": v for k, v in rec.items() if isinstance(v, (int, float)) and v is not None},
                    step=ctx.global_step)
        if on_epoch_end is not None and acc.is_main_process:
            on_epoch_end(history)
        if on_checkpoint is not None and not save_every and epoch + 1 < cfg.epochs:
            on_checkpoint(training_state(ctx, method, EpochProgress(epoch + 1, generator.get_state(),
                                                                    flops_before=dict(ctx.flops),
                                                                    reference_before=ctx.flops_reference),
                                         history, 0.0))


ENERGY_KEYS = ("energy_kwh", "co2_g", "energy_full_ft_reference_kwh", "co2_full_ft_reference_g")
TIMELINE_POINTS = 200  # per epoch, in metrics.json


def grid_of(cfg):
    """The run's grid intensity (a fixed figure or a trace) from its options."""
    return build_grid(cfg.carbon_intensity, cfg.carbon_trace, cfg.carbon_start, cfg.carbon_time_scale)


def epoch_energy(ctx, ep: EpochProgress, history: list, rec: dict) -> dict:
    """The epoch's energy (summed over processes), its carbon along the grid, and what full fine-tuning would
    have used and emitted on the same batches: this run's measured energy per FLOP × full fine-tuning's FLOPs
    of each step, at that step's grid intensity. ``timeline``: cumulative carbon per step (at most
    ``TIMELINE_POINTS`` of them)."""
    parts = {k: ctx.reduce_sum(float(ep.energy.get(k, 0.0))) for k in COMPONENTS}
    kwh_local = sum(float(ep.energy.get(k, 0.0)) for k in COMPONENTS)
    log = ep.step_log or [[ctx.global_step, ctx.train_seconds, 0.0, 0, 0]]
    g = [ctx.grid.intensity_at(t - dt / 2) for _, t, dt, _, _ in log]
    co2_steps = step_emissions(kwh_local, [x[2] for x in log], g)
    kwh, co2 = sum(parts.values()), ctx.reduce_sum(sum(co2_steps))
    per_flop = kwh / rec["flops_total"] if rec["flops_total"] else 0.0
    full_steps = [per_flop * x[4] * gi for x, gi in zip(log, g)]
    co2_full = ctx.reduce_sum(sum(full_steps))
    out = {"energy_kwh": kwh, **{f"energy_kwh_{k}": v for k, v in parts.items()}, "co2_g": co2,
           "carbon_intensity_g_per_kwh": co2 / kwh if kwh else g[-1],
           "energy_full_ft_reference_kwh": per_flop * rec["flops_full_ft_reference"], "co2_full_ft_reference_g": co2_full}
    scale = co2 / sum(co2_steps) if sum(co2_steps) else 0.0  # this process's steps stand for all processes'
    scale_full = co2_full / sum(full_steps) if sum(full_steps) else 0.0
    run_g = sum(h.get("co2_g", 0.0) for h in history)
    full_g = sum(h.get("co2_full_ft_reference_g", 0.0) for h in history)
    every = -(-len(log) // TIMELINE_POINTS)
    timeline = []
    for i, (x, gi, c, f) in enumerate(zip(log, g, co2_steps, full_steps)):
        run_g, full_g = run_g + c * scale, full_g + f * scale_full
        if i % every == 0 or i == len(log) - 1:
            t = ctx.grid.time_at(x[1])
            timeline.append({"step": x[0], "train_s": x[1], "trace_time": t, "g_per_kwh": gi, "co2_g": run_g,
                             "co2_full_ft_reference_g": full_g, "flops_fraction": x[3] / x[4] if x[4] else None})
    out["timeline"] = timeline
    return out


def _log_step(ctx, recent_losses: list) -> None:
    """Loss, learning rate, measured FLOPs, the fraction of full fine-tuning so far and the trainable set, to
    the trackers (--report-to; every process takes part in the FLOPs sums, the first one writes)."""
    spent, reference = ctx.global_flops()
    trainable = [p for p in ctx.model.parameters() if p.requires_grad]
    ctx.accelerator.log({"train/loss": float(np.mean(recent_losses)),
                         "train/lr": float(ctx.scheduler.get_last_lr()[0]),
                         "flops/total": spent, "flops/full_ft_reference": reference,
                         "flops/fraction_of_full": spent / reference if reference else 0.0,
                         "trainable/tensors": len(trainable),
                         "trainable/params": sum(p.numel() for p in trainable)}, step=ctx.global_step)


def _plain(x):
    """numpy scalars and arrays as Python numbers and lists (what ``weights_only`` loading accepts)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return x


def training_state(ctx, method, ep: EpochProgress, history: list, elapsed: float) -> dict:
    """Everything needed to continue exactly: weights, optimizer, scheduler, scaler, every RNG, the data
    position, the method's state, FLOPs counters and history (tensors and plain Python only, so it loads
    with ``torch.load(weights_only=True)``)."""
    return {"model": {k: v.detach().clone() for k, v in ctx.model.state_dict().items()},
            "optimizer": ctx.optimizer.state_dict(), "scheduler": ctx.scheduler.state_dict(),
            "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
            "method": _plain(method.state_dict()), "rng": rng_state(), "probe_rng": ctx._probe_rng.getstate(),
            "global_step": ctx.global_step, "flops": _plain(ctx.flops), "flops_reference": _plain(ctx.flops_reference),
            "history": _plain(history),
            "epoch": {"epoch": ep.epoch, "generator_state": ep.generator_state, "steps_done": ep.steps_done,
                      "flops_before": ep.flops_before, "reference_before": ep.reference_before,
                      "losses": ep.losses, "elapsed": elapsed, "val_curve": ep.val_curve,
                      "energy": ep.energy, "step_log": ep.step_log}}


def restore_training_state(ctx, method, state: dict, history: list) -> EpochProgress:
    """Put a :func:`training_state` back (the method first: it may rebuild the optimizer, e.g. SMT)."""
    method.load_state_dict(state["method"], ctx)
    ctx.model.load_state_dict(state["model"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scheduler.load_state_dict(state["scheduler"])
    if ctx.scaler is not None and state.get("scaler"):
        ctx.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    ctx._probe_rng.setstate(as_tuples(state["probe_rng"]))
    ctx.global_step, ctx.flops, ctx.flops_reference = state["global_step"], dict(state["flops"]), \
        state["flops_reference"]
    history.extend(state["history"])
    e = state["epoch"]
    return EpochProgress(e["epoch"], e["generator_state"], e["steps_done"], dict(e["flops_before"]),
                         e["reference_before"], list(e["losses"]), e["elapsed"], list(e.get("val_curve", [])),
                         dict(e.get("energy", {})), [list(x) for x in e.get("step_log", [])])
