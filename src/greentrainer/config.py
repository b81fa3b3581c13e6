"""Every option with its default, validated once before anything heavy is loaded.

Each config dataclass (TrainConfig here, one per method in that method's module) declares its fields with
:func:`option`: the field's default, its help and its flat name. The command line (``--lr``, ``--rho``) and
the YAML files (``lr: 1e-4``) are generated from these fields, so no option is restated by hand."""
from __future__ import annotations

import dataclasses
import typing

from .data import PROMPT_FORMATS
from .errors import UsageError
from .methods.registry import method_spec, registered_methods, reserve_flags
from .options import Options, OptionSpec, dashed, option, option_specs  # noqa: F401  (re-exported)

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")  # Lightning's / litgpt's names


def _method_names():
    return list(registered_methods())


@dataclasses.dataclass
class TrainConfig(Options):
    """A training run. AdamW with a linear schedule, wd 0.01, batch 4, 5 epochs as in the paper; the learning
    rate is the method's own default unless given.

    ``method_config`` is the chosen method's own config dataclass (None: its defaults)."""

    model: str = option("smollm2-135m", "smollm2-135m (packaged), a local HF folder, or a hub name")
    dataset: str = option("scitldr", "scitldr, dialogsum, webquestions, piqa, samsum; or your data: a .jsonl, "
                                     ".json, .csv or .parquet file, a save_to_disk folder or a hub dataset name")
    eval_dataset: str | None = option(None, "your own test set (any --dataset file type) for your --dataset "
                                            "(default: a fixed 10%% held out of it)")
    dataset_format: str = option("auto", "how your data's rows read: messages (conversations, the loss on every "
                                         "assistant turn), prompt-completion (TRL's), alpaca (instruction, input, "
                                         "output), text (the loss on every token), source-target; auto: from the "
                                         "columns", choices=("auto", "messages", "prompt-completion", "alpaca",
                                                             "text", "source-target"))
    method: str = option("greentrainer", "the training method", choices=_method_names)
    output_dir: str | None = option(None, "the run folder (default: runs/METHOD-DATASET-TIME)")
    overwrite: bool = option(False, "replace the run folder of an earlier run (only a greentrainer run folder)")
    epochs: int = option(5, "passes over the training set")
    max_steps: int | None = option(None, "stop after N optimizer steps, the learning-rate schedule spanning them "
                                         "(default: --epochs passes); the first N steps of the longer run, in its "
                                         "data order (e.g. full fine-tuning at ρ × another run's FLOPs)")
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
    group_by_length: bool = option(False, "batch items of similar length together (random runs of 50 global batches, "
                                          "each sorted by length): less padding, fewer FLOPs and less time; the "
                                          "run also reports what full fine-tuning on random batches would cost")
    packing: bool = option(False, "pack several training examples into each row of up to --max-input-length "
                                  "tokens (each with its own positions; attention never crosses an example): no "
                                  "FLOPs or time on padding, fewer and fuller steps per epoch; decoder-only models "
                                  "whose attention keeps packed examples apart (checked at the start)")
    max_train: int | None = option(None, "use only the first N training examples")
    max_eval: int | None = option(None, "validate and test on N examples of each split, sampled with --eval-seed")
    max_val: int | None = option(None, "validate on N examples instead (default: --max-eval's): the validation "
                                       "loss runs at every epoch's end and with --eval-steps; bound it for quick runs")
    seed: int = option(42, "random seed (data order, probes, initialisation)")
    eval_seed: int | None = option(None, "seed that samples the --max-eval items (default: --seed); give every "
                                         "seed of a comparison the same one to score them on the same items")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    bf16: bool = option(False, "the same as --precision bf16-mixed")
    precision: str = option("32-true", "32-true; bf16-mixed (autocast); bf16-true (bf16 weights, half the memory); "
                                       "16-mixed (fp16 autocast with a gradient scaler)", choices=PRECISIONS)
    fsdp: bool = option(False, "shard weights, gradients and optimizer state over the processes (torch's FSDP2, "
                               "each decoder layer and the root; launch with torchrun or accelerate launch)")
    grad_accum: int = option(1, "micro-batches per optimizer step (effective batch = batch size × processes × this)")
    save_every: int | None = option(None, "write checkpoint/ every N optimizer steps (default: at the end of "
                                          "each epoch)")
    attn_implementation: str = option("sdpa", "sdpa: fused attention where the model has it (its FLOPs are counted "
                                              "exactly); eager", choices=("sdpa", "eager"))
    experts_implementation: str | None = option(None, "mixture-of-experts models: transformers' experts kernel "
                                                      "(default: its own, grouped_mm; eager loops over the "
                                                      "experts); every one is counted exactly",
                                                choices=("grouped_mm", "eager", "batched_mm"))
    gradient_checkpointing: bool = option(False, "recompute activations in the backward (less memory; the recompute "
                                                 "is counted and budgeted)")
    report_to: str = option("none", "trackers (Accelerate's): none, tensorboard (offline, in the run folder's "
                                    "logs/), wandb, mlflow, ...; comma-separated")
    logging_steps: int = option(10, "log loss, lr, measured FLOPs, the fraction of full FT and the trainable set "
                                    "every N steps")
    eval_steps: int | None = option(None, "also compute the validation loss every N optimizer steps (and before "
                                          "the first): each epoch's val_curve in metrics.json, [step, loss, FLOPs spent, "
                                          "full FT's FLOPs on the same batches]")
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
        spec = registered_methods().get(self.method)
        if spec is not None and self.method_config is None and spec.config_cls is not None:
            self.method_config = spec.config_cls()
        if spec is not None and self.lr is None:
            self.lr = spec.method_cls.default_lr

    def validate(self) -> None:
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
        if self.packing and self.group_by_length:
            raise UsageError("--packing and --group-by-length contradict each other: packed rows have no padding "
                             "to save; give one of them")
        if self.packing and self.method == "prefix":
            raise UsageError("--packing does not work with --method prefix: its virtual tokens reach every "
                             "position through the attention mask and cache, so packed examples would see each "
                             "other; drop one of them")
        if self.fsdp:
            from .engine.sharding import check_sharding
            mc = self.method_config
            check_sharding(self, getattr(mc, "deselected_state", None))
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
        for name in ("max_train", "max_eval", "max_val", "max_new_tokens", "save_every", "eval_steps", "max_steps"):
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


reserve_flags([o.name for o in option_specs(TrainConfig)], "the general options")


def config_from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from its ``to_dict()`` (a run folder's train_config.json); unknown keys are refused."""
    d = dict(d)
    sub = d.pop("method_config", None)
    try:
        spec = method_spec(d.get("method", TrainConfig.method))
        if spec.config_cls is not None:
            sub = spec.config_cls(**(sub or {}))
        return TrainConfig(**d, method_config=sub)
    except TypeError as e:
        raise UsageError(f"train_config.json does not describe a run of this version: {e}") from None


def items_seed(seed: int, eval_seed: int | None) -> int:
    """The seed that samples a run's validation and test items: its --eval-seed, else its --seed."""
    return seed if eval_seed is None else eval_seed


# ---------------------------------------------------------------- one flat name per option (CLI and YAML)

def method_option_specs(method: str) -> list[OptionSpec]:
    """The flat options of ``method``'s own config (none for a method without one)."""
    cls = method_spec(method).config_cls
    return option_specs(cls) if cls is not None else []


def config_from_options(options: dict) -> TrainConfig:
    """A TrainConfig from flat options ({"method": "greentrainer", "rho": 0.5, "no_eval": True, ...}).

    Options of other methods than the chosen one are ignored (the command line warns about them); a name that
    is no option at all (a field's name such as ``do_eval`` instead of its option ``no_eval``, a typo) is
    refused, never silently dropped."""
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(unknown)} (the options are the command line's, "
                         "e.g. no_eval, not the config's field names)")

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
    names = [o.name for o in option_specs(TrainConfig)]
    for spec in registered_methods().values():
        if spec.config_cls is not None:
            names += [o.name for o in option_specs(spec.config_cls) if o.name not in names]
    return names


def total_steps(steps_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: ``epochs`` passes, cut at ``max_steps`` when given."""
    return min(steps_per_epoch * epochs, max_steps or steps_per_epoch * epochs)
