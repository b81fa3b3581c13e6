"""A training run end to end: validate, load, (evaluate,) train, evaluate, save a run folder."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import TrainConfig, prepare_output_dir
from .data import encode_all, load_examples, resolve_dataset
from .errors import UsageError
from .loop import fmt_flops
from .models import is_seq2seq, load_config, load_model, pick_device


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def default_output_dir(cfg: TrainConfig) -> str:
    return f"runs/{cfg.method}-{Path(cfg.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_training(cfg: TrainConfig, log=print, progress=True) -> dict:
    """Run ``cfg``; returns the metrics written to ``<output_dir>/metrics.json``."""
    cfg.validate()
    spec, _ = resolve_dataset(cfg.dataset)
    out_dir = cfg.output_dir or default_output_dir(cfg)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UsageError(f"output folder {out} is not empty; pass --overwrite to replace it")
    train_ex = load_examples(cfg.dataset, "train", cfg.max_train, cfg.seed)
    eval_ex = load_examples(cfg.dataset, "eval", cfg.max_eval, cfg.seed)
    load_config(cfg.model)  # fails fast on a bad model name before the weights load
    log(f"loading model {cfg.model} ...")
    model, tok = load_model(cfg.model)
    seq2seq = is_seq2seq(model)
    train_enc = encode_all(train_ex, tok, spec.task, seq2seq, cfg.max_input_length)
    val_enc = encode_all(eval_ex, tok, spec.task, seq2seq, cfg.max_input_length)
    from .methods import build_method
    method = build_method(cfg)
    device = pick_device(cfg.device)
    from .flops import profile_config
    from .loop import typical_shape
    steps_per_epoch = -(-len(train_enc) // cfg.batch_size)
    method.check(model, profile_config(model.config, *typical_shape(train_enc, cfg.batch_size, seq2seq)),
                 steps_per_epoch, steps_per_epoch * cfg.epochs)
    out = prepare_output_dir(out_dir, cfg.overwrite)
    _write_json(out / "train_config.json", cfg.to_dict())
    max_new = cfg.max_new_tokens or spec.max_new_tokens
    metrics = {"status": "running", "config": cfg.to_dict(), "dataset": spec.name,
               "n_train": len(train_ex), "n_eval": len(eval_ex), "device": str(device)}
    from .evaluate import evaluate
    model.to(device)
    if cfg.eval_before and cfg.do_eval:
        log(f"evaluating before training on {len(eval_ex)} examples ...")
        m, _ = evaluate(model, tok, eval_ex, spec.task, seq2seq, cfg.max_input_length, max_new,
                        cfg.num_beams, cfg.eval_batch_size, progress)
        metrics["eval_before"] = m
        log("before: " + _fmt(m))

    def checkpoint(history):
        _write_json(out / "progress.json", {"status": "running", "history": history})

    from .loop import train
    try:
        result = train(model, tok, method, train_enc, val_enc, cfg, device, log, progress, checkpoint)
    except KeyboardInterrupt as e:
        log("interrupted: saving the model as it is now")
        method.save(method.finalize(getattr(e, "model", model)), tok, out / "model")
        metrics["status"] = "interrupted"
        _write_json(out / "metrics.json", metrics)
        raise
    model = method.finalize(result["model"])
    metrics.update({"history": result["history"], "totals": result["totals"],
                    "profile_shape": result["profile_shape"]})
    if cfg.do_eval:
        log(f"evaluating on {len(eval_ex)} examples (beam {cfg.num_beams}, max {max_new} new tokens) ...")
        m, preds = evaluate(model, tok, eval_ex, spec.task, seq2seq, cfg.max_input_length, max_new,
                            cfg.num_beams, cfg.eval_batch_size, progress)
        metrics["eval"] = m
        with open(out / "predictions.jsonl", "w") as f:
            for r in preds:
                f.write(json.dumps(r) + "\n")
        log("after: " + _fmt(m))
    method.save(model, tok, out / "model")
    extra = getattr(method, "write_artifacts", None)
    if extra is not None:
        extra(out)
    (out / "progress.json").unlink(missing_ok=True)
    metrics["status"] = "complete"
    _write_json(out / "metrics.json", metrics)
    t = metrics["totals"]
    log(f"done: {fmt_flops(t['flops_total'])} measured "
        f"(forward {fmt_flops(t['flops_forward'])}, backward {fmt_flops(t['flops_backward'])}, "
        f"overhead {fmt_flops(t['flops_overhead'])}) = {100 * t['flops_fraction_of_full']:.1f}% of full "
        f"fine-tuning on the same data; {t['time_s']:.1f} s training; peak memory "
        f"{t['peak_memory_bytes'] / 2**20:.0f} MiB; run folder {out}")
    return metrics


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, float))


def run_eval(model_dir: str, dataset: str, max_eval: int | None, num_beams: int, max_new_tokens: int | None,
             max_input_length: int, seed: int, batch_size: int, device: str, log=print, progress=True) -> dict:
    """Evaluate a saved model (full model folder or PEFT adapter folder) or a model name."""
    spec, _ = resolve_dataset(dataset)
    exs = load_examples(dataset, "eval", max_eval, seed)
    model, tok = load_any(model_dir)
    model.to(pick_device(device))
    seq2seq = is_seq2seq(model)
    from .evaluate import evaluate
    m, preds = evaluate(model, tok, exs, spec.task, seq2seq, max_input_length,
                        max_new_tokens or spec.max_new_tokens, num_beams, batch_size, progress)
    log(_fmt(m))
    return {"metrics": m, "predictions": preds}


def load_any(path: str):
    """A model name/folder, a run folder (uses its model/), or a PEFT adapter folder."""
    p = Path(path)
    if (p / "model").is_dir() and (p / "train_config.json").exists():
        p = p / "model"
    if (p / "adapter_config.json").exists():
        info = p / "greentrainer_base.json"
        base = json.loads(info.read_text())["base_model"] if info.exists() else \
            json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        model, tok = load_model(base)
        from peft import PeftModel
        return PeftModel.from_pretrained(model, str(p)), tok
    return load_model(str(p) if p.exists() else path)
