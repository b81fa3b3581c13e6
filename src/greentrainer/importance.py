"""Tensor importance (GreenTrainer §3.2): I_k = -Σ Δw·∂L/∂w over tensor k, from one probing step.

Δw is a real optimizer step (AdamW with its current moments and learning rate) on a probing batch, and
∂L/∂w the gradient at the current weights. The probe leaves no trace: weights, optimizer moments and step
counters, learning-rate scheduler and RNG states are restored exactly. Its backward stops at the deepest
tensor that could fit the budget (paper Eq. 12), so tensors below it get no gradient and no memory.
"""
from __future__ import annotations

import copy
import random
from contextlib import nullcontext

import numpy as np
import torch


def importance_scores(deltas: list[torch.Tensor], grads: list[torch.Tensor], metric: str = "dw_grad") -> np.ndarray:
    """Importance per tensor from its weight update and gradient, scaled by max |I| (paper Table 4 variants)."""
    out = []
    for dw, g in zip(deltas, grads):
        if dw is None or g is None:
            out.append(0.0)
        elif metric == "dw_grad":
            out.append(-float((dw.double() * g.double()).sum()))
        elif metric == "dw":
            out.append(float(dw.double().abs().sum()))
        elif metric == "grad":
            out.append(float(g.double().pow(2).sum()))
        else:
            raise ValueError(f"unknown importance metric {metric!r}")
    scores = np.asarray(out)
    top = np.abs(scores).max() if len(scores) else 0.0
    return scores / top if top > 0 else scores


def _rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def probe_importance(model, optimizer, scheduler, batch: dict, names: list[str], probe_upto: int,
                     metric: str = "dw_grad", count=None, autocast=None) -> dict:
    """Importance of ``names[:probe_upto + 1]`` (backward order); the rest score 0 (not reachable).

    Returns {"importance": array over all names, "grad_bytes": probe gradient memory,
    "grad_bytes_full": what a backward to the bottom would hold}.
    """
    params = dict(model.named_parameters())
    probe = [params[n] for n in names[: probe_upto + 1]]
    probe_ids = {id(p) for p in probe}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    snapshot = [p.detach().to("cpu", copy=True) for p in probe]
    opt_state = _to_cpu(optimizer.state_dict())
    sched_state = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    rng = _rng_state()
    old_grads = {id(p): p.grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in probe_ids)
            p.grad = None
        with (count("overhead") if count else nullcontext()), (autocast() if autocast else nullcontext()):
            loss = model(**batch).loss
            loss.backward()
        grads = [p.grad.detach().clone() if p.grad is not None else None for p in probe]
        optimizer.step()
        deltas = [p.detach().cpu() - s if g is not None else None for p, s, g in zip(probe, snapshot, grads)]
        grads = [g.cpu() if g is not None else None for g in grads]
    finally:
        with torch.no_grad():
            for p, s in zip(probe, snapshot):
                p.copy_(s.to(p.device))
        optimizer.load_state_dict(opt_state)
        if scheduler is not None:
            scheduler.load_state_dict(sched_state)
        _set_rng_state(rng)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = old_grads[id(p)]
    scores = importance_scores(deltas, grads, metric)
    full = np.zeros(len(names))
    full[: len(scores)] = scores
    elem = probe[0].element_size() if probe else 4
    return {"importance": full,
            "grad_bytes": sum(p.numel() for p in probe) * elem,
            "grad_bytes_full": sum(params[n].numel() for n in names) * elem}
