"""Training methods. Each is a small plug-in to the one loop (see :class:`base.Method`) and registers itself
(see :mod:`.registry`): a new method is one module in this package or in another package."""
from __future__ import annotations

from .registry import MethodSpec, method_spec, register_method, registered_methods

__all__ = ["MethodSpec", "build_method", "method_spec", "register_method", "registered_methods"]


def build_method(cfg):
    """The method plug-in named by ``cfg.method``, configured by ``cfg.method_config``."""
    return method_spec(cfg.method).method_cls.from_config(cfg)
