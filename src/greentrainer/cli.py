"""Command line: argument parsing only. Turns arguments into a config and calls the library."""
from __future__ import annotations

import argparse
import json
import math
import sys

from .config import TrainConfig, config_from_options, dashed, method_option_specs, option_names, option_specs
from .methods.registry import registered_methods
from .errors import RunFailed, UsageError, one_line, warn

class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("allow_abbrev", False)  # --rh is not --rho: every option given is known exactly
        super().__init__(*a, **kw)

    def error(self, message):  # one line, exit code 2
        raise UsageError(message)


def _number(kind):
    """argparse type: a finite number of ``kind`` (float('inf') and float('nan') parse but are not numbers)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        return v
    parse.__name__ = kind.__name__
    return parse


FLOAT, INT = _number(float), _number(int)

TYPES = {int: INT, float: FLOAT, str: str}


def _add_options(group, specs) -> None:
    """One argument per option of a config dataclass (see :func:`greentrainer.config.option`)."""
    for o in specs:
        if o.type is bool:
            assert o.default is (True if o.negate else False), f"{o.name}: a flag's default must be off"
            group.add_argument(dashed(o.name), dest=o.name, action="store_true", help=o.help)
        else:
            group.add_argument(dashed(o.name), dest=o.name, type=TYPES[o.type], default=o.default,
                               choices=o.choices, help=o.help)


def _add_train_args(p):
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="options from a YAML file (rho: 0.5, method: lora, ...); the command line overrides it; "
                        "every run folder's train_config.yaml re-runs that run")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint/, with its saved config")
    p.add_argument("--accept-changed-inputs", action="store_true",
                   help="with --resume: continue even though the data or the model changed since the run started "
                        "(otherwise refused: their fingerprints are recorded in metrics.json)")
    p.add_argument("--quiet", action="store_true", help="errors and warnings only (no progress bars)")
    p.add_argument("--no-progress", action="store_true")
    _add_options(p, option_specs(TrainConfig))
    general = {o.name for o in option_specs(TrainConfig)}
    owners: dict[str, list[str]] = {}  # option -> the methods that take it (LoRA's rank: lora, dora, greentrainer)
    where: dict[str, tuple] = {}       # option -> (its spec, the dataclass that declares it)
    for spec in registered_methods().values():
        for o in option_specs(spec.config_cls) if spec.config_cls is not None else []:
            if o.name not in general:
                owners.setdefault(o.name, []).append(spec.name)
                where.setdefault(o.name, (o, _declared_in(spec.config_cls, o.field)))
    groups: dict[tuple, list[str]] = {}
    for name, methods in owners.items():
        groups.setdefault(tuple(methods), []).append(name)
    order = list(registered_methods())
    for methods, names in sorted(groups.items(), key=lambda g: (order.index(g[0][0]), len(g[0]))):
        _add_options(p.add_argument_group(" / ".join(methods), where[names[0]][1].__doc__),
                     [where[n][0] for n in names])


def _declared_in(cls, field: str) -> type:
    """The dataclass in ``cls``'s bases that declares ``field`` (its docstring describes the option)."""
    return next((c for c in cls.__mro__ if field in c.__dict__.get("__annotations__", {})), cls)


def config_from_args(a) -> TrainConfig:
    known = set(option_names())
    return config_from_options({k: v for k, v in vars(a).items() if k in known})


def load_options_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Flat options from a YAML file (keys as on the command line, without dashes: ``rho: 0.5``), checked
    like the command line's; a run folder's train_config.yaml re-runs that run."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: not a readable YAML file ({one_line(e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: expected a mapping of option: value")
    actions = {a.dest: a for a in parser._actions}
    known = set(option_names())
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"--config {path}: unknown option {key!r}")
        act = actions[name]
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key} must be true or false, got {value!r}")
        elif value is not None:
            if act.type is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise UsageError(f"--config {path}: {key}: expected a number, got {value!r}")
                try:
                    value = act.type(str(value))
                except argparse.ArgumentTypeError as e:
                    raise UsageError(f"--config {path}: {key}: {e}") from None
            elif not isinstance(value, str):
                value = str(value)
            if act.choices is not None and value not in act.choices:
                raise UsageError(f"--config {path}: {key} must be one of {', '.join(map(str, act.choices))}, "
                                 f"got {value!r}")
        out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="greentrainer", description="FLOPs-bounded fine-tuning of language models")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    t = sub.add_parser("train", help="fine-tune (no arguments: a ~10 minute demo on SciTLDR)")
    _add_train_args(t)
    e = sub.add_parser("eval", help="evaluate a model, run folder or adapter folder")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--dataset", default="scitldr", help="a bundled set (its test split) or a .jsonl (its held-out part)")
    e.add_argument("--eval-dataset", default=None, help="evaluate on every row of this .jsonl instead")
    e.add_argument("--max-eval", type=INT, default=None)
    e.add_argument("--num-beams", type=INT, default=4)
    e.add_argument("--max-new-tokens", type=INT, default=None)
    e.add_argument("--max-input-length", type=INT, default=512)
    e.add_argument("--eval-batch-size", type=INT, default=4)
    e.add_argument("--seed", type=INT, default=None,
                   help="samples the --max-eval items (default: a run folder's own --eval-seed, so with its "
                        "--max-eval it scores the items the run was tested on; 42 for anything else)")
    e.add_argument("--device", default="auto")
    e.add_argument("--output", default=None, help="write metrics and predictions to this JSON file")
    e.add_argument("--prompt-format", default="auto", choices=("auto", "chat", "plain"),
                   help="auto: the format a run folder's model was trained with, else the chat template where "
                        "the tokenizer has one, else plain")
    e.add_argument("--instruction", default=None, help="what the chat format asks (default: the dataset's)")
    d = sub.add_parser("demo", help="fine-tune the default model with GreenTrainer on SciTLDR (~5 minutes) and "
                                    "show zero-shot against fine-tuned ROUGE, predictions, FLOPs and time saved")
    d.add_argument("--output-dir", default="runs/demo", help="the demo's run folder (replaced on each run)")
    d.add_argument("--tune", action="store_true", help="run on the validation split (how the demo was set up)")
    d.add_argument("--model", default=None)
    d.add_argument("--dataset", default=None)
    d.add_argument("--rho", type=FLOAT, default=None)
    d.add_argument("--lr", type=FLOAT, default=None)
    d.add_argument("--max-train", type=INT, default=None)
    d.add_argument("--max-eval", type=INT, default=None)
    d.add_argument("--epochs", type=INT, default=None)
    d.add_argument("--quiet", action="store_true")
    sub.add_parser("datasets", help="list the bundled datasets")
    pr = sub.add_parser("profile", help="per-tensor backward FLOPs of a model (GreenTrainer §3.1)")
    pr.add_argument("--model", default="smollm2-135m", help="model name or a folder (config.json is enough)")
    pr.add_argument("--batch-size", type=INT, default=4)
    pr.add_argument("--seq-len", type=INT, default=512)
    pr.add_argument("--target-len", type=INT, default=None, help="decoder length for encoder-decoder models")
    pr.add_argument("--json", action="store_true")
    return p


def _quiet_libraries() -> None:
    """Our own progress bars only; library chatter would bury the one-line errors."""
    import logging
    import os
    import warnings
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 a fault during a run (marked failed in its folder), 2 bad input,
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Every error is one line on stderr."""
    code = _main_once(argv)
    _leave_process_group(code)
    return code


def _leave_process_group(code: int) -> None:
    """Under torchrun: leave the process group and exit at once. A process of a gloo run that lets the
    interpreter tear torch down afterwards can abort (SIGABRT, "terminate called without an active
    exception") and make torchrun report a finished run as failed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001  (leaving anyway)
        pass
    import logging
    import os
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main_once(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_libraries()
    from .interrupts import Terminated, installed
    try:
        with installed():
            return _main(argv)
    except UsageError as e:
        print(f"greentrainer: error: {one_line(e)}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"greentrainer: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Terminated:
        print("greentrainer: terminated (SIGTERM); the run folder is marked interrupted", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("greentrainer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        print(f"greentrainer: error: {e.strerror or one_line(e)}{': ' + str(e.filename) if e.filename else ''}",
              file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001  (never a bare traceback; GREENTRAINER_DEBUG=1 shows it)
        import os
        if os.environ.get("GREENTRAINER_DEBUG"):
            raise
        print(f"greentrainer: internal error: {type(e).__name__}: {one_line(e)} "
              f"(GREENTRAINER_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _logger(quiet: bool):
    """Progress lines through Python logging (logger "greentrainer", to stdout); --quiet keeps warnings only."""
    import logging
    log = logging.getLogger("greentrainer")
    if not log.handlers:
        class _Stdout(logging.StreamHandler):  # whatever sys.stdout is when a line is written
            def emit(self, record):
                self.stream = sys.stdout
                super().emit(record)
        h = _Stdout()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    return log.info


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """``dest`` of every option written on the command line (abbreviations are off, so this is exact)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    given = set()
    for tok in argv:
        if not tok.startswith("--"):
            continue
        for p in ([parser] + (list(sub.choices.values()) if sub else [])):
            act = p._option_string_actions.get(tok.split("=", 1)[0])
            if act is not None:
                given.add(act.dest)
    return given


def warn_ignored(method: str, given: set[str]) -> None:
    """One warning for options that belong to another method than the one that runs."""
    general = {o.name for o in option_specs(TrainConfig)}
    mine = {o.name for o in method_option_specs(method)}
    other = set(option_names()) - general - mine
    ignored = sorted(o for o in option_names() if o in other and o in given)
    if ignored:
        warn(f"ignored with --method {method}: " + ", ".join("--" + o.replace("_", "-") for o in ignored))


def _main(argv) -> int:
    if argv == ["train"]:
        print("no options: running `greentrainer demo` (see `greentrainer train --help` for the real options)")
        argv = ["demo"]
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    if a.command == "train":
        from .run import resume_training, run_training
        if a.resume is not None:
            extra = given_options(parser, argv) - {"resume", "no_progress", "quiet", "accept_changed_inputs"}
            if extra:
                raise UsageError("--resume continues a run with its saved config; drop "
                                 + ", ".join("--" + o.replace("_", "-") for o in sorted(extra)))
            resume_training(a.resume, log=_logger(a.quiet), progress=not (a.no_progress or a.quiet),
                            accept_changed_inputs=a.accept_changed_inputs)
            return 0
        if a.accept_changed_inputs:
            raise UsageError("--accept-changed-inputs goes with --resume RUN_DIR (a new run has nothing to compare)")
        given = given_options(parser, argv)
        if a.config is not None:
            train_parser = _subparser(parser, "train")
            options = load_options_file(a.config, train_parser)
            train_parser.set_defaults(**options)  # what the command line gives wins
            a = parser.parse_args(argv)  # (only options written on the command line are warned about)
        cfg = config_from_args(a)
        cfg.validate()
        warn_ignored(cfg.method, given)
        run_training(cfg, log=_logger(a.quiet), progress=not (a.no_progress or a.quiet))
        return 0
    if a.command == "eval":
        from .run import check_eval_output, run_eval
        for name in ("max_eval", "num_beams", "max_new_tokens", "max_input_length", "eval_batch_size"):
            v = getattr(a, name)
            if v is not None and v <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")
        check_eval_output(a.output)
        res = run_eval(a.model, a.dataset, a.max_eval, a.num_beams, a.max_new_tokens, a.max_input_length,
                       a.seed, a.eval_batch_size, a.device, eval_dataset=a.eval_dataset,
                       prompt_format=a.prompt_format, instruction=a.instruction)
        print(json.dumps({**res["metrics"], **({"run_status": res["run_status"]} if "run_status" in res else {})},
                         indent=2))
        if a.output:
            from .files import write_json_atomic
            write_json_atomic(a.output, res)
        return 0
    if a.command == "demo":
        from .demo import run_demo
        overrides = {k: getattr(a, k) for k in ("model", "dataset", "rho", "lr", "max_train", "max_eval", "epochs")
                     if getattr(a, k) is not None}
        run_demo(a.output_dir, tune=a.tune, log=_logger(a.quiet), progress=not a.quiet, **overrides)
        return 0
    if a.command == "datasets":
        from .data import DATASETS, load_examples
        print(f"{'name':14} {'task':14} {'train':>6} {'valid':>6} {'test':>6}  licence")
        for name, spec in DATASETS.items():
            n = [len(load_examples(name, s)) for s in ("train", "validation", "test")]
            print(f"{name:14} {spec.task:14} {n[0]:6d} {n[1]:6d} {n[2]:6d}  {spec.licence}"
                  + (f"  ({spec.note})" if spec.note else ""))
        return 0
    if a.command == "profile":
        return _profile(a)
    return 2


def _profile(a) -> int:
    for name in ("batch_size", "seq_len", "target_len"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")
    from .flops import profile_config
    from .models import load_config
    prof = profile_config(load_config(a.model), a.batch_size, a.seq_len, a.target_len)
    if a.json:
        names = prof.names
        print(json.dumps({"t_fp": prof.t_fp, "t_full": prof.t_full,
                          "tensors": [{"name": t.name, "t_dw": t.t_dw, "t_dy": t.t_dy} for t in prof.tensors],
                          "branches": [{"flops": b.flops, "tensors": [names[i] for i in b.tensors],
                                        "joins": names[b.joins] if b.joins < len(names) else None}
                                       for b in prof.branches]}))
        return 0
    print(f"{a.model}: batch {a.batch_size} x {a.seq_len}; forward {prof.t_fp / 1e9:,.1f} GFLOPs, "
          f"full fine-tuning step {prof.t_full / 1e9:,.1f} GFLOPs ({len(prof.tensors)} tensors, backward order)")
    print(f"{'#':>4}  {'tensor':60} {'t_dw GFLOPs':>12} {'t_dy GFLOPs':>12}")
    for i, t in enumerate(prof.tensors):
        print(f"{i:4d}  {t.name:60} {t.t_dw / 1e9:12.3f} {t.t_dy / 1e9:12.3f}")
    if prof.branches:
        side = sum(b.flops for b in prof.branches)
        print(f"{len(prof.branches)} side branches ({side / 1e9:,.1f} GFLOPs of the t_dy above) are paid only when "
              f"one of their tensors is selected or the gradient passes their join (--json lists them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
