"""Methods register themselves, as in PEFT's ``register_peft_method``: a new method is one module.

    @register_method("mymethod", config_cls=MyConfig)
    class MyMethod(Method): ...

Every module in this package is imported on first use, and so is every entry point of the group
``greentrainer.methods`` (a method in another package: ``[project.entry-points."greentrainer.methods"]
mymethod = "mypackage.mymethod"``). The command line and the YAML keys come from the config dataclass's
fields (see :func:`greentrainer.options.option`)."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from ..errors import UsageError, one_line, warn

ENTRY_POINT_GROUP = "greentrainer.methods"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    method_cls: type
    config_cls: type | None
    help: str


_REGISTRY: dict[str, MethodSpec] = {}
_discovered = False


def register_method(name: str, config_cls: type | None = None):
    """Class decorator: make the :class:`~greentrainer.methods.base.Method` subclass available as
    ``--method name``, configured by ``config_cls`` (a dataclass of :func:`~greentrainer.config.option`
    fields, or None for a method without options)."""
    def register(method_cls):
        old = _REGISTRY.get(name)
        if old is not None and old.method_cls.__qualname__ != method_cls.__qualname__:
            raise ValueError(f"method {name!r} is registered twice ({old.method_cls.__module__} and "
                             f"{method_cls.__module__})")
        if config_cls is not None:
            _check_flags(name, config_cls)
        doc = (method_cls.__doc__ or name).strip().splitlines()[0]
        _REGISTRY[name] = MethodSpec(name, method_cls, config_cls, doc)
        if "name" not in method_cls.__dict__:
            method_cls.name = name
        return method_cls
    return register


_RESERVED: dict[str, str] = {}  # option names taken outside the methods (the general ones) -> whose


def reserve_flags(names, owner: str) -> None:
    """Option names no method may declare (config.py reserves the general options' names)."""
    _RESERVED.update(dict.fromkeys(names, owner))
    for spec in _REGISTRY.values():
        if spec.config_cls is not None:
            _check_flags(spec.name, spec.config_cls)


def _check_flags(name: str, config_cls: type) -> None:
    """A method's flat option names must not collide with the general ones or another method's, unless
    both declare the very same option (e.g. LoRA's rank, shared through a base dataclass)."""
    from ..options import option_specs
    mine = {o.name: o for o in option_specs(config_cls)}
    taken = dict(_RESERVED)
    for spec in _REGISTRY.values():
        if spec.config_cls is not None and spec.config_cls is not config_cls and spec.name != name:
            taken.update({o.name: f"method {spec.name}" for o in option_specs(spec.config_cls)
                          if mine.get(o.name) != o})
    clash = sorted(set(mine) & set(taken))
    if clash:
        raise ValueError(f"method {name!r}: option {clash[0]!r} is already an option of {taken[clash[0]]}")


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(__package__)
    for m in pkgutil.iter_modules(package.__path__):
        if m.name not in ("base", "registry"):
            importlib.import_module(f"{__package__}.{m.name}")
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001  (someone else's package must not break ours)
            warn(f"method plug-in {ep.name} ({ep.value}) did not load: {one_line(e)}")


def registered_methods() -> dict[str, MethodSpec]:
    """Every method: greentrainer first, then the other built-in ones, then plug-ins, each by name (an order that
    does not depend on which module was imported first, so --help and docs/cli.md are stable)."""
    _discover()

    def order(kv):
        name, spec = kv
        return name != "greentrainer", not spec.method_cls.__module__.startswith(__package__ + "."), name
    return dict(sorted(_REGISTRY.items(), key=order))


def method_spec(name: str) -> MethodSpec:
    methods = registered_methods()
    if name not in methods:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(methods)}")
    return methods[name]
