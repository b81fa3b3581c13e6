"""Training methods. Each is a small plug-in to the one loop (see :class:`base.Method`)."""
from __future__ import annotations


def build_method(cfg, **kw):
    """The method plug-in named by ``cfg.method``."""
    name = cfg.method
    if name == "full":
        from .full import FullFineTuning
        return FullFineTuning()
    if name == "top2":
        from .top2 import Top2
        return Top2()
    if name == "greentrainer":
        from .greentrainer import GreenTrainerMethod
        return GreenTrainerMethod(cfg.greentrainer)
    if name in ("lora", "dora", "prefix"):
        from .peft_methods import PeftMethod
        return PeftMethod(name, cfg.peft, cfg.model)
    if name == "smt":
        from .smt import SMTMethod
        return SMTMethod(cfg.smt)
    raise ValueError(name)
