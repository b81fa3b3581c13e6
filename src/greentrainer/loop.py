"""The one training loop. Methods plug in through :class:`greentrainer.methods.base.Method`.

Every forward, backward and method overhead pass runs under a FLOPs counter, so the reported cost is what
was executed. The cost of full fine-tuning on the same batches is measured on a weightless (meta) copy,
which gives every run its fraction of full fine-tuning without running it.
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

from .data import collate
from .errors import NonFiniteError, RunFailed
from .interrupts import critical
from .flops import FlopCounter, full_step_flops, meta_model_from_config, profile_config


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
    _probe_rng: random.Random = dataclasses.field(default_factory=lambda: random.Random(0))

    @contextlib.contextmanager
    def count(self, kind: str):
        """Count the FLOPs executed inside the block under ``kind`` (forward/backward/overhead)."""
        counter = FlopCounter()
        with counter:
            yield counter
        self.flops[kind] = self.flops.get(kind, 0) + counter.total

    def collate(self, items):
        return {k: v.to(self.device) for k, v in
                collate(items, self.tokenizer.pad_token_id, self.seq2seq).items()}

    def sample_batch(self):
        """A random training batch (for probes and warm-ups), drawn from a separate RNG."""
        items = self._probe_rng.sample(self.train_data, min(self.cfg.batch_size, len(self.train_data)))
        return self.collate(items)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.cfg.bf16))


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


def typical_shape(data, batch_size: int, seq2seq: bool) -> tuple[int, int, int | None]:
    """Batch shape used for the FLOPs profile: the 90th-percentile padded lengths of the training data."""
    lens = sorted(len(e.input_ids) for e in data)
    seq = -(-lens[int(0.9 * (len(lens) - 1))] // 8) * 8
    tgt = None
    if seq2seq:
        tl = sorted(len(e.labels) for e in data)
        tgt = -(-tl[int(0.9 * (len(tl) - 1))] // 8) * 8
    return batch_size, seq, tgt


def mean_padded_size(data, batch_size: int, seq2seq: bool, rounds: int = 20, seed: int = 0) -> float:
    """Expected padded length per batch (input + target for seq2seq) over random shuffles of the data, a
    short last batch counted by its share of a full one (its FLOPs are that much smaller)."""
    rng = random.Random(seed)
    idx, sizes = list(range(len(data))), []
    for _ in range(rounds):
        rng.shuffle(idx)
        for i in range(0, len(idx), batch_size):
            items = [data[j] for j in idx[i: i + batch_size]]
            size = max(len(e.input_ids) for e in items)
            if seq2seq:
                size += max(len(e.labels) for e in items)
            sizes.append(size * len(items) / batch_size)
    return sum(sizes) / max(len(sizes), 1)


@torch.no_grad()
def eval_loss(model, ctx, data, batch_size: int) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = ctx.collate(data[i: i + batch_size])
        with ctx.autocast():
            loss = model(**batch).loss
        k = len(data[i: i + batch_size])
        total += float(loss) * k
        n += k
    model.train()
    return total / max(n, 1)


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


def train(model, tokenizer, method, train_data, val_data, cfg, device, log=print, progress=True,
          on_epoch_end=None) -> dict:
    """Train ``model`` with ``method``; returns per-epoch history and totals (FLOPs, time, memory)."""
    seed_everything(cfg.seed)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    meta_model = meta_model_from_config(model.config)
    shape = typical_shape(train_data, cfg.batch_size, seq2seq)
    profile = profile_config(model.config, *shape)
    model.to(device)
    ctx = TrainContext(model=model, tokenizer=tokenizer, cfg=cfg, device=device, train_data=train_data,
                       profile=profile, meta_model=meta_model, seq2seq=seq2seq, log=log)
    ctx._probe_rng = random.Random(cfg.seed + 1)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(train_data, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                         collate_fn=lambda items: items)
    ctx.steps_per_epoch = len(loader)
    ctx.total_steps = len(loader) * cfg.epochs
    model = method.prepare(model, ctx)
    ctx.model = model
    model.to(device)
    model.train()
    from transformers import get_linear_schedule_with_warmup
    params = method.optimizer_parameters(model)
    if not params:
        raise RuntimeError(f"method {method.name} left no parameter to train")
    ctx.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ctx.scheduler = get_linear_schedule_with_warmup(ctx.optimizer, cfg.warmup_steps, ctx.total_steps)
    ref_cache: dict = {}
    history = []
    try:
        _epochs(ctx, method, loader, val_data, history, ref_cache, cfg, progress, log, on_epoch_end)
    except (KeyboardInterrupt, RunFailed) as e:  # the caller saves the weights of the last completed step
        e.model, e.step = ctx.model, ctx.global_step
        raise
    totals = {k: sum(h[k] for h in history) for k in
              ("flops_forward", "flops_backward", "flops_overhead", "flops_total", "flops_full_ft_reference",
               "time_s")}
    totals["flops_fraction_of_full"] = totals["flops_total"] / totals["flops_full_ft_reference"]
    totals["peak_memory_bytes"] = max(h["peak_memory_bytes"] for h in history)
    totals.update(method.trainable_summary(ctx.model))
    return {"history": history, "totals": totals, "model": ctx.model, "profile_shape": list(shape)}


def _epochs(ctx, method, loader, val_data, history, ref_cache, cfg, progress, log, on_epoch_end):
    model, device, meta_model = ctx.model, ctx.device, ctx.meta_model
    for epoch in range(cfg.epochs):
        ctx.epoch = epoch
        before = dict(ctx.flops)
        ref_epoch, losses, bookkeeping = 0, [], 0.0
        t0 = time.perf_counter()
        with PeakMemory(device) as mem:
            method.on_epoch_start(ctx)
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs} [{method.name}]", disable=not progress,
                       leave=False, dynamic_ncols=True)
            for items in bar:
                batch = ctx.collate(items)
                method.on_step_start(ctx)
                with ctx.count("forward"), ctx.autocast():
                    loss = model(**batch).loss
                if not loss.requires_grad:
                    raise RuntimeError("no tensor is trainable in this step (everything is frozen)")
                check_finite_loss(loss, ctx)
                with ctx.count("backward"):
                    loss.backward()
                check_finite_grads(ctx.optimizer, ctx)
                with critical():  # an interrupt never leaves a half-updated model
                    ctx.optimizer.step()
                    ctx.scheduler.step()
                    ctx.optimizer.zero_grad(set_to_none=True)
                    ctx.global_step += 1
                    method.after_optimizer_step(ctx)
                key = (tuple(batch["input_ids"].shape), tuple(batch["labels"].shape))
                if key not in ref_cache:  # bookkeeping, not training: kept out of the epoch's time
                    r0 = time.perf_counter()
                    ref_cache[key] = full_step_flops(meta_model, batch)
                    bookkeeping += time.perf_counter() - r0
                ref_epoch += ref_cache[key]
                ctx.flops_reference += ref_cache[key]
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        elapsed = time.perf_counter() - t0 - bookkeeping
        val = eval_loss(model, ctx, val_data, cfg.eval_batch_size) if val_data else None
        spent = {k: ctx.flops[k] - before.get(k, 0) for k in ctx.flops}
        total = sum(spent.values())
        rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val,
               "flops_forward": spent["forward"], "flops_backward": spent["backward"],
               "flops_overhead": spent["overhead"], "flops_total": total,
               "flops_full_ft_reference": ref_epoch, "flops_fraction_of_full": total / ref_epoch,
               "time_s": elapsed, "peak_memory_bytes": mem.peak, **method.epoch_report()}
        history.append(rec)
        val_text = f"{val:.4f}" if val is not None else "n/a"
        log(f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f}  val loss {val_text}  "
            f"{fmt_flops(total)} ({100 * rec['flops_fraction_of_full']:.1f}% of full FT)  "
            f"{elapsed:.1f} s  peak mem {mem.peak / 2**20:.0f} MiB")
        if on_epoch_end is not None:
            on_epoch_end(history)
