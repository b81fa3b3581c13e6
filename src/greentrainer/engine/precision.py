"""The run's precision (Lightning's names): autocast for the -mixed modes; -true casts the model itself."""
from __future__ import annotations

import torch


def precision_of(cfg) -> str:
    """The run's precision; ``bf16=True`` (the older flag) means bf16-mixed."""
    return "bf16-mixed" if cfg.precision == "32-true" and cfg.bf16 else cfg.precision


def autocast_for(cfg, device):
    p = precision_of(cfg)
    dtype = torch.float16 if p == "16-mixed" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=p.endswith("-mixed"))
