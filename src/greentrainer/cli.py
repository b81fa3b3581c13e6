"""Command line: argument parsing only. Turns arguments into a config and calls the library."""
from __future__ import annotations

import argparse
import json
import sys

from .config import GreenTrainerConfig, PeftMethodConfig, SMTConfig, TrainConfig, METHODS
from .errors import UsageError

DEMO = ["--max-train", "32", "--max-eval", "12", "--epochs", "2", "--max-input-length", "320",
        "--eval-before", "--output-dir", "runs/demo", "--overwrite"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        raise UsageError(message)


def _add_train_args(p):
    d = TrainConfig()
    g, pe, s = GreenTrainerConfig(), PeftMethodConfig(), SMTConfig()
    p.add_argument("--model", default=d.model, help="smollm2-135m (packaged), a local HF folder, or a hub name")
    p.add_argument("--dataset", default=d.dataset, help="scitldr, dialogsum, webquestions, piqa, samsum or a .jsonl file")
    p.add_argument("--method", default=d.method, choices=METHODS)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--max-input-length", type=int, default=d.max_input_length)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--num-beams", type=int, default=d.num_beams)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--no-eval", action="store_true", help="skip generation-based evaluation")
    p.add_argument("--eval-before", action="store_true", help="also evaluate before training")
    p.add_argument("--no-progress", action="store_true")
    gt = p.add_argument_group("greentrainer")
    gt.add_argument("--rho", type=float, default=g.rho, help="fraction of full fine-tuning FLOPs per step")
    gt.add_argument("--rho-schedule", default=None, help="file: JSON {step: rho} or lines 'step rho'")
    gt.add_argument("--select-every", type=int, default=None, help="re-select every K steps (default: every epoch)")
    gt.add_argument("--select-once", action="store_true")
    gt.add_argument("--importance", default=g.importance, choices=("dw_grad", "dw", "grad"))
    gt.add_argument("--selector-resolution", type=int, default=None, help="coarse DP resolution (paper Table 7)")
    pg = p.add_argument_group("lora / dora / prefix")
    pg.add_argument("--lora-r", type=int, default=pe.lora_r)
    pg.add_argument("--lora-alpha", type=int, default=pe.lora_alpha)
    pg.add_argument("--lora-dropout", type=float, default=pe.lora_dropout)
    pg.add_argument("--lora-targets", default=None, help="comma-separated module names (default: query, value)")
    pg.add_argument("--prefix-tokens", type=int, default=pe.prefix_tokens)
    pg.add_argument("--prefix-init", default=pe.prefix_init, choices=("data", "random"),
                    help="data: the base model's keys/values on the first training prompts (decoder-only); "
                         "random: peft's default")
    sg = p.add_argument_group("smt")
    sg.add_argument("--smt-warmup", type=int, default=s.warmup_steps)
    sg.add_argument("--smt-targets", default=s.targets, help="comma list of q,k,v,o,gate,up,down")
    sg.add_argument("--smt-params", type=float, default=s.params_percent, help="trainable %% of all parameters")
    sg.add_argument("--smt-block", type=int, default=s.block_size)


def config_from_args(a) -> TrainConfig:
    return TrainConfig(
        model=a.model, dataset=a.dataset, method=a.method, output_dir=a.output_dir, overwrite=a.overwrite,
        epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
        warmup_steps=a.warmup_steps, max_input_length=a.max_input_length, max_train=a.max_train,
        max_eval=a.max_eval, seed=a.seed, device=a.device, bf16=a.bf16, num_beams=a.num_beams,
        max_new_tokens=a.max_new_tokens, eval_batch_size=a.eval_batch_size, do_eval=not a.no_eval,
        eval_before=a.eval_before,
        greentrainer=GreenTrainerConfig(rho=a.rho, rho_schedule=a.rho_schedule, select_every=a.select_every,
                                        select_once=a.select_once, importance=a.importance,
                                        resolution=a.selector_resolution),
        peft=PeftMethodConfig(lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                              lora_targets=a.lora_targets, prefix_tokens=a.prefix_tokens,
                              prefix_init=a.prefix_init),
        smt=SMTConfig(warmup_steps=a.smt_warmup, targets=a.smt_targets, params_percent=a.smt_params,
                      block_size=a.smt_block))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="greentrainer", description="FLOPs-bounded fine-tuning of language models")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    t = sub.add_parser("train", help="fine-tune (no arguments: a ~10 minute demo on SciTLDR)")
    _add_train_args(t)
    e = sub.add_parser("eval", help="evaluate a model, run folder or adapter folder")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--dataset", default="scitldr")
    e.add_argument("--max-eval", type=int, default=None)
    e.add_argument("--num-beams", type=int, default=4)
    e.add_argument("--max-new-tokens", type=int, default=None)
    e.add_argument("--max-input-length", type=int, default=512)
    e.add_argument("--eval-batch-size", type=int, default=4)
    e.add_argument("--seed", type=int, default=42)
    e.add_argument("--device", default="auto")
    e.add_argument("--output", default=None, help="write metrics and predictions to this JSON file")
    sub.add_parser("datasets", help="list the bundled datasets")
    pr = sub.add_parser("profile", help="per-tensor backward FLOPs of a model (GreenTrainer §3.1)")
    pr.add_argument("--model", default="smollm2-135m", help="model name or a folder (config.json is enough)")
    pr.add_argument("--batch-size", type=int, default=4)
    pr.add_argument("--seq-len", type=int, default=512)
    pr.add_argument("--target-len", type=int, default=None, help="decoder length for encoder-decoder models")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_libraries()
    try:
        return _main(argv)
    except UsageError as e:
        print(f"greentrainer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("greentrainer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _main(argv) -> int:
    demo = argv == ["train"]
    if demo:
        argv = argv + DEMO
        print("demo: GreenTrainer (rho 0.6) on 32 SciTLDR training items for 2 epochs, evaluated on 12 test "
              "items before and after (see `greentrainer train --help` for the real options)")
    a = build_parser().parse_args(argv)
    if a.command is None:
        build_parser().print_help()
        return 2
    if a.command == "train":
        from .run import run_training
        run_training(config_from_args(a), progress=not a.no_progress)
        return 0
    if a.command == "eval":
        from .run import run_eval
        for name in ("max_eval", "num_beams", "max_new_tokens", "max_input_length", "eval_batch_size"):
            v = getattr(a, name)
            if v is not None and v <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")
        res = run_eval(a.model, a.dataset, a.max_eval, a.num_beams, a.max_new_tokens, a.max_input_length,
                       a.seed, a.eval_batch_size, a.device)
        print(json.dumps(res["metrics"], indent=2))
        if a.output:
            with open(a.output, "w") as f:
                json.dump(res, f, indent=2)
        return 0
    if a.command == "datasets":
        from .data import DATASETS, load_examples
        print(f"{'name':14} {'task':14} {'train':>6} {'eval':>6}  licence")
        for name, spec in DATASETS.items():
            n_tr = len(load_examples(name, "train"))
            n_ev = len(load_examples(name, "eval"))
            print(f"{name:14} {spec.task:14} {n_tr:6d} {n_ev:6d}  {spec.licence}" + (f"  ({spec.note})" if spec.note else ""))
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
