"""Every option with its default, validated once before anything heavy is loaded.

Each config dataclass (TrainConfig here, one per method in that method's module) declares its fields with
:func:`option`: the field's default, its help and its flat name. The command line (``--lr``, ``--rho``) and
the YAML files (``lr: 1e-4``) are generated from these fields, so no option is restated by hand."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import typing
from pathlib import Path

from .data import PROMPT_FORMATS
from .errors import UsageError

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")  # Lightning's / litgpt's names


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


def _method_names():
    from .methods.registry import registered_methods
    return list(registered_methods())


@dataclasses.dataclass
class TrainConfig(Options):
    """A training run. AdamW with a linear schedule, wd 0.01, batch 4, 5 epochs as in the paper; the learning
    rate is the method's own default unless given.

    ``method_config`` is the chosen method's own config dataclass (None: its defaults)."""

    model: str = option("smollm2-135m", "smollm2-135m (packaged), a local HF folder, or a hub name")
    dataset: str = option("scitldr", "scitldr, dialogsum, webquestions, piqa, samsum or a .jsonl file")
    eval_dataset: str | None = option(None, "your own test set (.jsonl) for a .jsonl --dataset (default: a fixed "
                                            "10%% held out of it)")
    method: str = option("greentrainer", "the training method", choices=_method_names)
    output_dir: str | None = option(None, "the run folder (default: runs/METHOD-DATASET-TIME)")
    overwrite: bool = option(False, "replace the run folder of an earlier run (only a greentrainer run folder)")
    epochs: int = option(5, "passes over the training set")
    batch_size: int = option(4, "examples per micro-batch and process")
    lr: float | None = option(None, "peak learning rate (AdamW, linear decay); default: the method's, chosen on "
                                    "the validation split (bench/results/accuracy_sweep_scitldr.md); the "
                                    "paper's is 2e-5")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: int = option(0, "linear learning-rate warm-up, in optimizer steps")
    prompt_format: str = option("auto", "auto: the tokenizer's chat template where it has one, else plain; chat; "
                                        "plain: the GreenTrainer paper's text format", choices=PROMPT_FORMATS)
    instruction: str | None = option(None, "what the chat format asks before the source (default: the dataset's)")
    max_input_length: int = option(512, "tokens per example (prompt + target); longer ones are truncated")
    max_train: int | None = option(None, "use only the first N training examples")
    max_eval: int | None = option(None, "validate and test on N examples of each split, sampled with --eval-seed")
    seed: int = option(42, "random seed (data order, probes, initialisation)")
    eval_seed: int | None = option(None, "seed that samples the --max-eval items (default: --seed); give every "
                                         "seed of a comparison the same one to score them on the same items")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    bf16: bool = option(False, "the same as --precision bf16-mixed")
    precision: str = option("32-true", "32-true; bf16-mixed (autocast); bf16-true (bf16 weights, half the memory); "
                                       "16-mixed (fp16 autocast with a gradient scaler)", choices=PRECISIONS)
    grad_accum: int = option(1, "micro-batches per optimizer step (effective batch = batch size × processes × this)")
    save_every: int | None = option(None, "write checkpoint/ every N optimizer steps (default: at the end of "
                                          "each epoch)")
    attn_implementation: str = option("sdpa", "sdpa: fused attention where the model has it (its FLOPs are counted "
                                              "exactly); eager", choices=("sdpa", "eager"))
    gradient_checkpointing: bool = option(False, "recompute activations in the backward (less memory; the recompute "
                                                 "is counted and budgeted)")
    report_to: str = option("none", "trackers (Accelerate's): none, tensorboard (offline, in the run folder's "
                                    "logs/), wandb, mlflow, ...; comma-separated")
    logging_steps: int = option(10, "log loss, lr, measured FLOPs, the fraction of full FT and the trainable set "
                                    "every N steps")
    eval_steps: int | None = option(None, "also compute the validation loss every N optimizer steps (and before "
                                          "the first): each epoch's val_curve in metrics.json")
    track_energy: bool = option(True, "do not measure energy and carbon (CodeCarbon's offline tracker)",
                                flag="no_energy", negate=True)
    carbon_intensity: str | None = option(None, "grid intensity for CO2: gCO2eq/kWh, or a 3-letter country code "
                                                "(its yearly mean in CodeCarbon's offline table) or a US state (USA/CA); "
                                                "default: the world average, 475 (IEA)")
    carbon_trace: str | None = option(None, "CSV of 'timestamp,gco2_per_kwh' rows: the grid's intensity over time, "
                                            "read along the run's clock (instead of --carbon-intensity)")
    carbon_start: str | None = option(None, "where in --carbon-trace the run starts (ISO 8601; default: its first "
                                            "row)")
    carbon_time_scale: float = option(1.0, "trace seconds per second of measured training (3600: each second of "
                                           "training moves an hour along the trace)")
    num_beams: int = option(4, "beams for generation in evaluation")
    max_new_tokens: int | None = option(None, "generated tokens per test item (default: from the dataset)")
    eval_batch_size: int = option(4, "test items per generation batch")
    do_eval: bool = option(True, "skip generation-based evaluation", flag="no_eval", negate=True)
    eval_before: bool = option(False, "also evaluate before training")
    method_config: typing.Any = None

    def __post_init__(self):
        from .methods.registry import registered_methods
        spec = registered_methods().get(self.method)
        if spec is not None and self.method_config is None and spec.config_cls is not None:
            self.method_config = spec.config_cls()
        if spec is not None and self.lr is None:
            self.lr = spec.method_cls.default_lr

    def validate(self) -> None:
        from .methods.registry import method_spec
        spec = method_spec(self.method)  # a clear error for an unknown method
        self.check_options()
        self.trackers()  # names known and installed
        if self.gradient_checkpointing and not spec.method_cls.supports_gradient_checkpointing:
            raise UsageError(f"--gradient-checkpointing does not work with --method {self.method}; drop one of them")
        if self.bf16 and self.precision not in ("32-true", "bf16-mixed"):
            raise UsageError(f"--bf16 and --precision {self.precision} contradict each other; give one of them")
        for name in ("epochs", "batch_size", "eval_batch_size", "num_beams", "grad_accum", "logging_steps"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{dashed(name)} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.eval_before and not self.do_eval:
            raise UsageError("--eval-before and --no-eval contradict each other; give one of them")
        if self.seed < 0:
            raise UsageError(f"--seed must be ≥ 0, got {self.seed}")
        if self.eval_seed is not None and self.eval_seed < 0:
            raise UsageError(f"--eval-seed must be ≥ 0, got {self.eval_seed}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise UsageError("--weight-decay and --warmup-steps must be ≥ 0")
        if self.max_input_length < 8:
            raise UsageError(f"--max-input-length must be at least 8, got {self.max_input_length}")
        for name in ("max_train", "max_eval", "max_new_tokens", "save_every", "eval_steps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise UsageError(f"{dashed(name)} must be positive, got {v}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        from .energy import build_grid
        build_grid(self.carbon_intensity, self.carbon_trace, self.carbon_start, self.carbon_time_scale)
        if getattr(self.method_config, "carbon_aware", False) and self.carbon_trace is None:
            raise UsageError("--carbon-aware needs --carbon-trace FILE (the grid's intensity over time)")
        if spec.config_cls is not None:
            if not isinstance(self.method_config, spec.config_cls):
                raise UsageError(f"--method {self.method} takes a {spec.config_cls.__name__}, "
                                 f"got {type(self.method_config).__name__}")
            self.method_config.validate()

    def trackers(self) -> list[str]:
        """The --report-to trackers (Accelerate's names); a clear error for an unknown or missing one."""
        names = [t.strip() for t in self.report_to.split(",") if t.strip() and t.strip() != "none"]
        import accelerate.utils as au
        for t in names:
            check = getattr(au, f"is_{t}_available", None)
            if check is None:
                raise UsageError(f"--report-to: unknown tracker {t!r}; choose from none, tensorboard, wandb, mlflow, "
                                 f"comet_ml, aim, clearml, dvclive, swanlab, trackio")
            if not check():
                hint = "pip install 'greentrainer[tensorboard]'" if t == "tensorboard" else f"pip install {t}"
                raise UsageError(f"--report-to {t}: the {t} package is not installed ({hint})")
        return names

    def to_dict(self) -> dict:
        """Plain data (a run folder's train_config.json): every field, the method's config as a dict."""
        return dataclasses.asdict(self)


def config_from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from its ``to_dict()`` (a run folder's train_config.json); unknown keys are refused."""
    from .methods.registry import method_spec
    d = dict(d)
    sub = d.pop("method_config", None)
    try:
        spec = method_spec(d.get("method", TrainConfig.method))
        if spec.config_cls is not None:
            sub = spec.config_cls(**(sub or {}))
        return TrainConfig(**d, method_config=sub)
    except TypeError as e:
        raise UsageError(f"train_config.json does not describe a run of this version: {e}") from None


RUN_MARKER = ".greentrainer-run"
# Everything a run writes at the top of its folder; --overwrite replaces a folder only if it holds nothing else.
def items_seed(seed: int, eval_seed: int | None) -> int:
    """The seed that samples a run's validation and test items: its --eval-seed, else its --seed."""
    return seed if eval_seed is None else eval_seed


RUN_ENTRIES = {RUN_MARKER, "train_config.json", "train_config.yaml", "logs", "metrics.json", "progress.json",
               "predictions.jsonl", "predictions_before.jsonl", "model", "selections.json", "selection_heatmap.png",
               "carbon.png",
               "model.tmp", "model.old", "checkpoint", "checkpoint.tmp", "checkpoint.old"}


def is_run_folder(out: Path) -> bool:
    """A folder this program made: our marker (or, from older versions, train_config.json + metrics.json or
    progress.json)."""
    return (out / RUN_MARKER).is_file() or ((out / "train_config.json").is_file()
                                            and ((out / "metrics.json").is_file() or (out / "progress.json").is_file()))


def check_output_dir(path: str, overwrite: bool) -> Path:
    """Refuse an output path we may not write to, before anything is loaded or written.

    A non-empty folder is replaced only with ``--overwrite`` and only if it is one of our run folders that
    holds nothing we did not write; anything else is never touched."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output folder {out} is not empty; pass --overwrite to replace it")
        if not is_run_folder(out):
            raise UsageError(f"output folder {out} is not empty and is not a greentrainer run folder; "
                             f"--overwrite only replaces run folders (choose another --output-dir)")
        foreign = sorted(e.name for e in out.iterdir() if e.name not in RUN_ENTRIES and not e.name.endswith(".tmp"))
        if foreign:
            raise UsageError(f"output folder {out} holds files greentrainer did not write "
                             f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); not replacing it")
    return out


def prepare_output_dir(path: str, overwrite: bool) -> Path:
    """Create the run folder (replacing our own previous run there when ``overwrite``) and mark it as ours."""
    out = check_output_dir(path, overwrite)
    if out.is_dir():
        for e in out.iterdir():  # only our own entries (checked above); links are removed, never followed
            if e.is_symlink() or not e.is_dir():
                e.unlink()
            else:
                shutil.rmtree(e)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"output folder {out} is not writable")
    (out / RUN_MARKER).write_text(json.dumps({"created_by": "greentrainer"}) + "\n")
    return out


# ---------------------------------------------------------------- one flat name per option (CLI and YAML)

def method_option_specs(method: str) -> list[OptionSpec]:
    """The flat options of ``method``'s own config (none for a method without one)."""
    from .methods.registry import method_spec
    cls = method_spec(method).config_cls
    return option_specs(cls) if cls is not None else []


def config_from_options(options: dict) -> TrainConfig:
    """A TrainConfig from flat options ({"method": "greentrainer", "rho": 0.5, "no_eval": True, ...}).

    Options of other methods than the chosen one are ignored (the command line warns about them)."""
    from .methods.registry import method_spec

    def fields(specs):
        return {o.field: (not options[o.name]) if o.negate else options[o.name] for o in specs if o.name in options}
    cfg = fields(option_specs(TrainConfig))
    spec = method_spec(cfg.get("method", TrainConfig.method))
    sub = spec.config_cls(**fields(option_specs(spec.config_cls))) if spec.config_cls is not None else None
    return TrainConfig(**cfg, method_config=sub)


def options_from_config(cfg: TrainConfig) -> dict:
    """The flat options of ``cfg``: every general one and those of its method (the inverse of
    :func:`config_from_options`)."""
    out = {}
    for obj in (cfg, cfg.method_config):
        for o in option_specs(type(obj)) if obj is not None else []:
            v = getattr(obj, o.field)
            out[o.name] = (not v) if o.negate else v
    return out


def option_names() -> list[str]:
    """Every flat option: the general ones, then each registered method's (the command line and YAML keys)."""
    from .methods.registry import registered_methods
    names = [o.name for o in option_specs(TrainConfig)]
    for spec in registered_methods().values():
        if spec.config_cls is not None:
            names += [o.name for o in option_specs(spec.config_cls) if o.name not in names]
    return names
