"""Fingerprints of what a run trains on, recorded when it starts, so that ``--resume`` can refuse to continue on
other data or another model (a changed file would otherwise continue silently, on other items)."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from .errors import UsageError

SAMPLE = 1024  # elements read at each end of every tensor for the model's fingerprint


def data_fingerprint(splits: dict) -> str:
    """SHA-256 of the examples each split uses (after --max-train / --max-eval sampling), in order: any change
    to an item, its order or the number of items changes it."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(name.encode())
        for ex in splits[name]:
            h.update(json.dumps(dataclasses.asdict(ex), sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """SHA-256 of the model's config and, for every tensor, its name, shape, dtype and its first and last
    ``SAMPLE`` values: cheap at any size (no full pass over the weights), and another checkpoint of the same
    architecture differs in those values."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        for part in (flat[:SAMPLE], flat[-SAMPLE:]):
            h.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes() if part.numel() else b"")
    return h.hexdigest()


def check_unchanged(recorded: dict | None, now: dict, run_dir: str, accept: bool) -> list[str]:
    """What changed since the run started (``data``, ``model``); a change refuses the resume unless ``accept``.
    A run recorded before fingerprints existed is not checked."""
    if not recorded:
        return []
    changed = [k for k in ("data", "model") if k in recorded and recorded[k] != now.get(k)]
    if changed and not accept:
        what = {"data": "the training or evaluation data", "model": "the model"}
        raise UsageError(f"--resume {run_dir}: {' and '.join(what[k] for k in changed)} changed since the run "
                         "started (its fingerprint differs); restore it, or pass --accept-changed-inputs to continue "
                         "on what is there now")
    return changed
