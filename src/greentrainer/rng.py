"""Every random number generator's state, as tensors and plain Python, so it survives ``torch.save`` and
``torch.load(weights_only=True)``: the importance probe leaves no trace, and a resumed run continues exactly."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Every RNG's state (torch, CUDA, Python, numpy), as tensors and plain Python (loads with weights_only)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(as_tuples(state["python"]))
    np.random.set_state(tuple(np.asarray(x, dtype=np.uint32) if isinstance(x, list) else x
                              for x in state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def as_tuples(x):
    """Lists back into the tuples Python's random state is made of."""
    return tuple(as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
