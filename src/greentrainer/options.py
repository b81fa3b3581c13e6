"""The ``option()`` field helper: a config dataclass field that is also a command-line option and a YAML key.

Each config dataclass (TrainConfig, one per method) declares its fields with :func:`option`; the command line
and the YAML loader are generated from them (:func:`option_specs`), so no option is restated by hand. A leaf
module: the method registry and every method's config import it without importing the run's config."""
from __future__ import annotations

import dataclasses
import math
import typing

from .errors import UsageError


def option(default=None, help: str = "", *, flag: str | None = None, choices=None, negate: bool = False):
    """A config field that is also a command-line option and a YAML key.

    ``flag``: its flat name when not the field's (``--smt-warmup`` for SMTConfig.warmup_steps); ``choices``:
    the allowed values (or a function returning them); ``negate``: a boolean given as its opposite
    (``--no-eval`` sets ``do_eval`` False)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                                        "negate": negate})


def dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One flat option: its name, the field it sets, the field's type (int, float, str or bool) and help."""

    name: str
    field: str
    type: type
    default: object
    help: str
    choices: tuple | None
    negate: bool


def option_specs(cls) -> list[OptionSpec]:
    """The flat options of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue  # not an option (e.g. TrainConfig.method_config)
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
        kind = kinds[0]
        if kind not in (int, float, str, bool) or len(kinds) != 1:
            raise TypeError(f"{cls.__name__}.{f.name}: an option must be int, float, str or bool (or None)")
        choices = f.metadata["choices"]
        choices = tuple(choices() if callable(choices) else choices) if choices is not None else None
        out.append(OptionSpec(f.metadata["flag"] or f.name, f.name, kind, f.default, f.metadata["help"], choices,
                              f.metadata["negate"]))
    return out


class Options:
    """Base of the config dataclasses: checks every option's type, finiteness and choices in one place."""

    def check_options(self) -> None:
        for o in option_specs(type(self)):
            v = getattr(self, o.field)
            if v is None and o.default is None:
                continue
            ok = isinstance(v, o.type) and not (o.type is not bool and isinstance(v, bool))
            if o.type is float and isinstance(v, int) and not isinstance(v, bool):
                ok = True
            if not ok:
                raise UsageError(f"{dashed(o.name)} must be {_KIND[o.type]}, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{dashed(o.name)} must be a finite number, got {v}")
            if o.choices is not None and v not in o.choices:
                raise UsageError(f"{dashed(o.name)} must be one of {', '.join(map(str, o.choices))}, got {v!r}")

    def validate(self) -> None:
        self.check_options()


_KIND = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
