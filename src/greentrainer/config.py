"""Every option with its default, validated once before anything heavy is loaded."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

from .errors import UsageError

METHODS = ("greentrainer", "full", "top2", "lora", "dora", "prefix", "smt")
IMPORTANCE_METRICS = ("dw_grad", "dw", "grad")
SMT_TARGET_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")  # Lightning's / litgpt's names


def check_finite(**values) -> None:
    """Every number a user gives must be a finite number (``inf``/``nan`` parse as floats)."""
    for name, v in values.items():
        if v is not None and isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {v}")


@dataclasses.dataclass
class GreenTrainerConfig:
    """GreenTrainer (adaptive backpropagation) knobs."""

    rho: float = 0.6                 # fraction of full fine-tuning FLOPs per step
    rho_schedule: str | None = None  # JSON file {step: rho}; the latest entry at or before a selection applies
    select_every: int | None = None  # re-select every K optimizer steps (default: at every epoch start)
    select_once: bool = False        # select once at the start and keep it
    importance: str = "dw_grad"      # paper Table 4: dw_grad (-Σ Δw·g), dw (Σ|Δw|), grad (Σ g²)
    resolution: int | None = None    # coarse selector (paper Table 7); None = exact
    deselected_state: str = "drop"   # optimizer state of a deselected tensor: drop (frees it), cpu (host copy), keep

    def validate(self) -> None:
        check_finite(rho=self.rho)
        if self.select_once and self.select_every is not None:
            raise UsageError("--select-once and --select-every contradict each other; give one of them")
        if not 0 < self.rho <= 1:
            raise UsageError(f"--rho must be in (0, 1], got {self.rho}")
        if self.select_every is not None and self.select_every <= 0:
            raise UsageError(f"--select-every must be a positive number of steps, got {self.select_every}")
        if self.deselected_state not in ("drop", "cpu", "keep"):
            raise UsageError(f"--deselected-state must be drop, cpu or keep, got {self.deselected_state!r}")
        if self.importance not in IMPORTANCE_METRICS:
            raise UsageError(f"--importance must be one of {', '.join(IMPORTANCE_METRICS)}, got {self.importance!r}")
        if self.resolution is not None and self.resolution < 2:
            raise UsageError(f"--selector-resolution must be at least 2, got {self.resolution}")
        if self.rho_schedule is not None:
            load_rho_schedule(self.rho_schedule)


def config_from_dict(d: dict) -> "TrainConfig":
    """A TrainConfig from its ``to_dict()`` (a run folder's train_config.json); unknown keys are refused."""
    d = dict(d)
    try:
        subs = {"greentrainer": GreenTrainerConfig(**d.pop("greentrainer", {})),
                "peft": PeftMethodConfig(**d.pop("peft", {})), "smt": SMTConfig(**d.pop("smt", {}))}
        return TrainConfig(**d, **subs)
    except TypeError as e:
        raise UsageError(f"train_config.json does not describe a run of this version: {e}") from None


def load_rho_schedule(path: str) -> dict[int, float]:
    """Read a ρ schedule: JSON object {"0": 0.5, "100": 0.4} or lines "step rho"."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"ρ schedule file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"ρ schedule {path} is not a UTF-8 text file") from None
    except OSError as e:
        raise UsageError(f"cannot read ρ schedule {path}: {e.strerror}") from None
    try:
        raw = json.loads(text)
        items = list(raw.items()) if isinstance(raw, dict) else None
    except ValueError:
        items = [ln.replace(",", " ").split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not items:
        raise UsageError(f"ρ schedule {path}: expected JSON {{step: rho}} or lines 'step rho'")
    sched = {}
    for item in items:
        try:
            step, rho = int(item[0]), float(item[1])
        except (ValueError, IndexError, TypeError):
            raise UsageError(f"ρ schedule {path}: cannot read entry {item!r}") from None
        if not math.isfinite(rho) or step < 0 or not 0 < rho <= 1:
            raise UsageError(f"ρ schedule {path}: step must be ≥ 0 and rho in (0, 1], got {step} → {rho}")
        sched[step] = rho
    return dict(sorted(sched.items()))


@dataclasses.dataclass
class PeftMethodConfig:
    """LoRA / DoRA / Prefix tuning knobs (passed to peft)."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str | None = None   # comma-separated module names; default: the model's query and value
    prefix_tokens: int = 20
    prefix_init: str = "data"         # "data": keys/values of real training prompts; "random": peft's default

    def validate(self) -> None:
        check_finite(lora_dropout=self.lora_dropout)
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise UsageError("--lora-r and --lora-alpha must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.prefix_tokens <= 0:
            raise UsageError(f"--prefix-tokens must be positive, got {self.prefix_tokens}")


@dataclasses.dataclass
class SMTConfig:
    """Sparse Matrix Tuning knobs."""

    warmup_steps: int = 100
    targets: str = "q,k,v"
    params_percent: float = 1.0   # trainable parameters, % of all model parameters
    block_size: int = 256

    def target_kinds(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def validate(self) -> None:
        check_finite(smt_params=self.params_percent)
        kinds = self.target_kinds()
        bad = [k for k in kinds if k not in SMT_TARGET_KINDS]
        if not kinds or bad:
            raise UsageError(f"--smt-targets: unknown target {', '.join(bad) or '(empty)'}; "
                             f"choose from {','.join(SMT_TARGET_KINDS)}")
        if not 0 < self.params_percent <= 100:
            raise UsageError(f"--smt-params must be a percentage in (0, 100], got {self.params_percent}")
        if self.block_size <= 0:
            raise UsageError(f"--smt-block must be a positive block size, got {self.block_size}")
        if self.warmup_steps < 0:
            raise UsageError(f"--smt-warmup must be ≥ 0, got {self.warmup_steps}")


@dataclasses.dataclass
class TrainConfig:
    """A training run. Paper defaults: AdamW, lr 2e-5, linear schedule, wd 0.01, batch 4, 5 epochs."""

    model: str = "smollm2-135m"
    dataset: str = "scitldr"
    eval_dataset: str | None = None   # a user's own test set (JSONL) for a user's training file
    method: str = "greentrainer"
    output_dir: str | None = None
    overwrite: bool = False
    epochs: int = 5
    batch_size: int = 4
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_input_length: int = 512
    max_train: int | None = None
    max_eval: int | None = None
    seed: int = 42
    device: str = "auto"
    bf16: bool = False                # the older flag: the same as precision "bf16-mixed"
    precision: str = "32-true"        # 32-true, bf16-mixed, bf16-true (bf16 weights) or 16-mixed (GradScaler)
    grad_accum: int = 1               # micro-batches per optimizer step and process
    save_every: int | None = None     # checkpoint every N optimizer steps (default: at the end of each epoch)
    attn_implementation: str = "sdpa"  # fused attention (counted exactly), or eager
    gradient_checkpointing: bool = False  # recompute blocks in the backward (counted; the budget includes it)
    report_to: str = "none"           # trackers through Accelerate: tensorboard, wandb, mlflow, ... (comma list)
    logging_steps: int = 10           # log loss, lr, FLOPs and the fraction of full FT every N optimizer steps
    num_beams: int = 4
    max_new_tokens: int | None = None
    eval_batch_size: int = 4
    do_eval: bool = True
    eval_before: bool = False
    greentrainer: GreenTrainerConfig = dataclasses.field(default_factory=GreenTrainerConfig)
    peft: PeftMethodConfig = dataclasses.field(default_factory=PeftMethodConfig)
    smt: SMTConfig = dataclasses.field(default_factory=SMTConfig)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        self.trackers()  # names known and installed
        if self.attn_implementation not in ("sdpa", "eager"):
            raise UsageError(f"--attn-implementation must be sdpa or eager, got {self.attn_implementation!r}")
        if self.gradient_checkpointing and self.method == "prefix":
            raise UsageError("--gradient-checkpointing does not work with --method prefix (peft's prefix caches "
                             "do not survive the recompute); drop one of them")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.bf16 and self.precision not in ("32-true", "bf16-mixed"):
            raise UsageError(f"--bf16 and --precision {self.precision} contradict each other; give one of them")
        for name in ("epochs", "batch_size", "eval_batch_size", "num_beams", "grad_accum", "logging_steps"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check_finite(lr=self.lr, weight_decay=self.weight_decay)
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.eval_before and not self.do_eval:
            raise UsageError("--eval-before and --no-eval contradict each other; give one of them")
        if self.seed < 0:
            raise UsageError(f"--seed must be ≥ 0, got {self.seed}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise UsageError("--weight-decay and --warmup-steps must be ≥ 0")
        if self.max_input_length < 8:
            raise UsageError(f"--max-input-length must be at least 8, got {self.max_input_length}")
        for name in ("max_train", "max_eval", "max_new_tokens", "save_every"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self.greentrainer.validate()
        self.peft.validate()
        self.smt.validate()

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
        return dataclasses.asdict(self)


RUN_MARKER = ".greentrainer-run"
# Everything a run writes at the top of its folder; --overwrite replaces a folder only if it holds nothing else.
RUN_ENTRIES = {RUN_MARKER, "train_config.json", "train_config.yaml", "logs", "metrics.json", "progress.json", "predictions.jsonl", "model",
               "selections.json", "selection_heatmap.png", "model.tmp", "model.old", "checkpoint",
               "checkpoint.tmp", "checkpoint.old"}


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

# Options whose flat name (the command line's, without dashes) differs from their place in TrainConfig.
_PLACES = {"no_eval": ("do_eval", True), "selector_resolution": ("greentrainer.resolution", False),
           "smt_warmup": ("smt.warmup_steps", False), "smt_targets": ("smt.targets", False),
           "smt_params": ("smt.params_percent", False), "smt_block": ("smt.block_size", False)}
_SECTIONS = {"greentrainer": GreenTrainerConfig, "peft": PeftMethodConfig}


def option_place(name: str) -> tuple[str, bool]:
    """Where a flat option lives in TrainConfig ("section.field" or "field") and whether it is negated."""
    if name in _PLACES:
        return _PLACES[name]
    for section, cls in _SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            return f"{section}.{name}", False
    if name in {f.name for f in dataclasses.fields(TrainConfig)} and name not in ("greentrainer", "peft", "smt"):
        return name, False
    raise KeyError(name)


def config_from_options(options: dict) -> TrainConfig:
    """A TrainConfig from flat options ({"rho": 0.5, "lora_r": 8, "no_eval": True, ...})."""
    cfg = TrainConfig()
    for name, value in options.items():
        place, negated = option_place(name)
        obj, field = (getattr(cfg, place.split(".")[0]), place.split(".")[1]) if "." in place else (cfg, place)
        setattr(obj, field, (not value) if negated else value)
    return cfg


def options_from_config(cfg: TrainConfig, names) -> dict:
    """The flat options ``names`` of ``cfg`` (the inverse of :func:`config_from_options`)."""
    out = {}
    for name in names:
        place, negated = option_place(name)
        obj, field = (getattr(cfg, place.split(".")[0]), place.split(".")[1]) if "." in place else (cfg, place)
        value = getattr(obj, field)
        out[name] = (not value) if negated else value
    return out


def option_names() -> list[str]:
    """Every flat option of a training run, in TrainConfig's order (the command line defines exactly these)."""
    renamed = {place: name for name, (place, _) in _PLACES.items()}
    names = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("greentrainer", "peft", "smt"):
            section = {"greentrainer": GreenTrainerConfig, "peft": PeftMethodConfig, "smt": SMTConfig}[f.name]
            names += [renamed.get(f"{f.name}.{g.name}", g.name) for g in dataclasses.fields(section)]
        else:
            names.append(renamed.get(f.name, f.name))
    return names
