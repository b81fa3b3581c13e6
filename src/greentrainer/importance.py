"""Tensor importance (GreenTrainer §3.2): I_k = -Σ Δw·∂L/∂w over tensor k, from one probing step.

Δw is a real optimizer step (AdamW with its current moments) on a probing batch, and ∂L/∂w the gradient at
the current weights. The probe is a measurement, not a training step: it steps at each parameter group's
base learning rate (a warm-up's current rate may be 0, which would leave every Δw = 0), and it steps
float32 copies of bfloat16/float16 weights so that Δw does not round to 0. It leaves no trace: weights
(bit for bit), optimizer moments, step counters and learning rates, learning-rate scheduler and RNG states
are restored exactly. Its backward stops at the deepest tensor that could fit the budget (paper Eq. 12), so
tensors below it get no gradient and no memory. A NaN or infinite score raises :class:`NonFiniteError`.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import numpy as np
import torch

from .errors import NonFiniteError
from .shards import local, local_rows
from .rng import rng_state, set_rng_state


def elementwise_importance(dw: torch.Tensor, g: torch.Tensor, metric: str = "dw_grad") -> torch.Tensor:
    """Each element's share of its tensor's importance (the tensor's score is its sum)."""
    if metric == "dw_grad":
        return -(dw.double() * g.double())
    if metric == "dw":
        return dw.double().abs()
    if metric == "grad":
        return g.double().pow(2)
    raise ValueError(f"unknown importance metric {metric!r}")


def block_sums(x: torch.Tensor, l: int) -> np.ndarray:
    """Sums over the l×l blocks of a 2-D tensor: an array [rows // l, cols // l]."""
    out_f, in_f = x.shape
    return x.reshape(out_f // l, l, in_f // l, l).sum(dim=(1, 3)).numpy()


def importance_scores(deltas: list[torch.Tensor], grads: list[torch.Tensor], metric: str = "dw_grad",
                      names: list[str] | None = None, hint: str = "", normalize: bool = True,
                      sum_parts=None) -> np.ndarray:
    """Importance per tensor from its weight update and gradient, scaled by max |I| (paper Table 4 variants).
    ``sum_parts``: sums per-tensor scores over processes when each holds a slice of every tensor (--fsdp).

    Raises :class:`NonFiniteError` naming the tensors (``names``) whose score is NaN or infinite; ``hint``
    is added to its message."""
    out = []
    for dw, g in zip(deltas, grads):
        out.append(0.0 if dw is None or g is None else float(elementwise_importance(dw, g, metric).sum()))
    scores = np.asarray(out, dtype=np.float64)
    if sum_parts is not None:
        scores = sum_parts(scores)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        shown = ", ".join(names[i] if names is not None and i < len(names) else f"#{i}" for i in bad[:3])
        more = ", ..." if len(bad) > 3 else ""
        raise NonFiniteError(f"non-finite importance for {len(bad)} of {len(scores)} tensors ({shown}{more}): "
                             f"the probe step produced NaN/inf {hint or 'gradients or updates'}; "
                             f"lower --lr or check the model's weights")
    top = np.abs(scores).max() if len(scores) else 0.0
    return scores / top if top > 0 and normalize else scores


LOW_PRECISION = (torch.bfloat16, torch.float16)  # probed in float32: their Δw would mostly round to 0


def _base_lr(group: dict):
    """A parameter group's learning rate before any schedule (torch's schedulers keep it as initial_lr)."""
    base = group.get("initial_lr", group["lr"])
    if isinstance(group["lr"], torch.Tensor):  # a tensor lr (capturable / fused optimizers): same kind
        return torch.as_tensor(float(base), dtype=group["lr"].dtype, device=group["lr"].device)
    return base


def probe_importance(model, optimizer, scheduler, batch, names: list[str], probe_upto: int,
                     metric: str = "dw_grad", count=None, autocast=None, reduce_grads=None,
                     blocks: dict[str, int] | None = None, sum_parts=None) -> dict:
    """Importance of ``names[:probe_upto + 1]`` (backward order); the rest score 0 (not reachable).

    ``batch``: one batch, or ``(micro-batches, weights)`` of one optimizer step (the probed loss is
    Σ weight·loss, e.g. each micro-batch's share of the step's target tokens).
    ``reduce_grads(params)``: sums the probed gradients over processes before the step (several
    processes), so the probe measures the global step and every process gets the same scores.
    ``sum_parts``: sharded tensors (--fsdp): each process scores its slices and this sums the scores.

    The optimizer steps once at each group's base learning rate, on float32 copies of reduced-precision
    weights (their optimizer state cast to float32 for the step); everything is restored afterwards.
    Returns {"importance": array over all names, "grad_bytes": probe gradient memory,
    "grad_bytes_full": what a backward to the bottom would hold}. Raises :class:`NonFiniteError` when a
    score is NaN or infinite. ``blocks``: {name: l} of 2-D tensors whose l×l blocks are scored too
    (``"blocks"``: {name: array of block scores}, on the tensors' scale).
    """
    params = dict(model.named_parameters())
    probe_names = names[: probe_upto + 1]
    probe = [params[n] for n in probe_names]
    probe_ids = {id(p) for p in probe}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    snapshot = [p.detach().to("cpu", copy=True) for p in probe]
    low = {id(p): p.data for p in probe if p.dtype in LOW_PRECISION}  # the original tensors, never written
    # only the probed tensors' optimizer state can change (the others get no gradient): keep a host copy of it
    saved_state = {id(p): {k: (v.device, v.detach().to("cpu", copy=True)) if isinstance(v, torch.Tensor)
                           else (None, copy.deepcopy(v)) for k, v in optimizer.state[p].items()}
                   for p in probe if p in optimizer.state}
    saved_lrs = [g["lr"] for g in optimizer.param_groups]
    sched_state = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    rng = rng_state()
    old_grads = {id(p): p.grad for p in model.parameters()}
    loss_finite = True
    group_params = [list(g["params"]) for g in optimizer.param_groups]
    shadow: dict = {}  # id(p) -> the float32 stand-in of a sharded low-precision tensor
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in probe_ids)
            p.grad = None
        batches, weights = batch if isinstance(batch, tuple) else ([batch], [1.0])
        for b, w in zip(batches, weights):
            with (count("overhead") if count else nullcontext()), (autocast() if autocast else nullcontext()):
                loss = model(**b).loss * w
                loss.backward()
            loss_finite = loss_finite and bool(torch.isfinite(loss.detach()).all())
        if reduce_grads is not None:
            reduce_grads([p for p in probe if p.requires_grad])
        grads = [p.grad.detach() if p.grad is not None else None for p in probe]  # AdamW leaves .grad as is
        for group in optimizer.param_groups:  # a measurement: a warm-up's current lr (0 at first) would
            group["lr"] = _base_lr(group)    # make every Δw 0 and the selection arbitrary
        for p in probe:
            if id(p) in low and hasattr(p, "to_local"):  # sharded: its .data cannot change dtype, so the step
                q = torch.nn.Parameter(p.detach().float())  # updates a float32 stand-in in its place
                q.grad = p.grad.float() if p.grad is not None else None
                if p in optimizer.state:
                    optimizer.state[q] = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype in LOW_PRECISION
                                          else v for k, v in optimizer.state[p].items()}
                shadow[id(p)] = q
            elif id(p) in low:
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()
                for k, v in optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.dtype in LOW_PRECISION:
                        optimizer.state[p][k] = v.float()
        for group in optimizer.param_groups:
            group["params"] = [shadow.get(id(x), x) for x in group["params"]]
        optimizer.step()
        deltas = [(shadow.get(id(p), p).detach().cpu() - (s.float() if id(p) in low else s)) if g is not None
                  else None for p, s, g in zip(probe, snapshot, grads)]
        grads = [g.cpu() if g is not None else None for g in grads]
        starts = [0] * len(probe)
        if sum_parts is not None:  # each process's rows (their scores are summed below)
            starts = [local_rows(g)[0] if g is not None else 0 for g in grads]
            deltas = [local(d) if d is not None else None for d in deltas]
            grads = [local(g) if g is not None else None for g in grads]
    finally:
        for group, members in zip(optimizer.param_groups, group_params):
            group["params"] = members
        for q in shadow.values():
            optimizer.state.pop(q, None)
        with torch.no_grad():
            for p, s in zip(probe, snapshot):
                if id(p) in low:
                    p.grad = None
                    p.data = low[id(p)]  # bit for bit: the step wrote to a float32 copy
                else:
                    local(p).copy_(local(s).to(p.device))  # (sharded: each process its slice)
        for p in probe:  # moments and step counts as they were (fresh state made by the probe is dropped)
            if id(p) in saved_state:
                optimizer.state[p] = {k: v.to(dev) if dev is not None else v
                                      for k, (dev, v) in saved_state[id(p)].items()}
            else:
                optimizer.state.pop(p, None)
        for g, lr in zip(optimizer.param_groups, saved_lrs):
            g["lr"] = lr
        if scheduler is not None:
            scheduler.load_state_dict(sched_state)
        set_rng_state(rng)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = old_grads[id(p)]
    raw = importance_scores(deltas, grads, metric, probe_names, "" if loss_finite else "loss", normalize=False,
                            sum_parts=sum_parts)
    top = np.abs(raw).max() if len(raw) else 0.0
    top = top if top > 0 else 1.0
    full = np.zeros(len(names))
    full[: len(raw)] = raw / top
    block_scores = {}
    for n, dw, g, start in zip(probe_names, deltas, grads, starts):
        if not (blocks and n in blocks and dw is not None and g is not None):
            continue
        x, l = elementwise_importance(dw, g, metric), blocks[n]
        if sum_parts is None:
            block_scores[n] = block_sums(x, l) / top
        else:  # this process's rows, summed over column blocks, in place among all rows; then over processes
            rows = np.zeros((params[n].shape[0], x.shape[1] // l))
            rows[start: start + x.shape[0]] = x.reshape(x.shape[0], -1, l).sum(-1).numpy()
            block_scores[n] = sum_parts(rows).reshape(rows.shape[0] // l, l, -1).sum(1) / top
    elem = probe[0].element_size() if probe else 4
    return {"importance": full, "blocks": block_scores,
            "grad_bytes": sum(p.numel() for p in probe) * elem,
            "grad_bytes_full": sum(params[n].numel() for n in names) * elem}
