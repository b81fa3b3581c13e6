"""A training run end to end: validate, load, (evaluate,) train, save, evaluate, and a run folder that
always says truthfully how far it got (``status``: running, complete, failed or interrupted)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .config import TrainConfig, config_from_dict, items_seed, total_steps
from .run_folder import (check_output_dir, in_use, is_run_folder, lock_run_folder, prepare_output_dir,
                         release_run_folder)
from .data import (PROMPT_FILE, check_no_overlap, encode_all, load_examples, recorded_prompt_format,
                   resolve_dataset, resolve_prompt_format)
from .errors import RunFailed, UsageError, one_line, warn
from .fingerprint import check_unchanged, data_fingerprint, model_fingerprint
from .files import clear_scratch, replace_dir, save_dir_atomic, scratch_of, write_json_atomic, write_text_atomic
from .loop import fmt_flops
from .models import check_input_length, is_seq2seq, load_config, load_model, pick_device


def options_yaml(cfg: TrainConfig) -> str:
    """The run's every option as flat YAML: ``greentrainer train --config train_config.yaml`` re-runs it."""
    import yaml
    from .config import options_from_config
    opts = {k: v for k, v in options_from_config(cfg).items() if k != "overwrite"}
    return "# greentrainer train --config this_file  (re-runs this run; options given on the command line win)\n" \
        + yaml.safe_dump(opts, sort_keys=False)


def default_output_dir(cfg: TrainConfig) -> str:
    return f"runs/{cfg.method}-{Path(cfg.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def nonfinite_parameters(model) -> list[str]:
    import torch
    return [n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]


def _save_model(method, model, tok, out: Path, fmt) -> None:
    """Save the weights atomically; refuse weights that are not finite (they are not a result)."""
    bad = nonfinite_parameters(model)
    if bad:
        raise RunFailed(f"{len(bad)} tensor(s) hold NaN/inf (e.g. {bad[0]}); not saving them")
    try:
        def write(tmp: Path) -> None:
            method.save(model, tok, tmp)
            (tmp / PROMPT_FILE).write_text(json.dumps(fmt.to_dict()) + "\n")  # eval prompts the same way
        save_dir_atomic(out / "model", write)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001  (safetensors reports a full disk as its own error type)
        if "I/O error" in str(e) or "os error" in str(e):
            raise RunFailed(f"could not save the model in {out / 'model'}: {one_line(e)}") from None
        raise


def resume_training(run_dir: str, log=print, progress=True, accept_changed_inputs: bool = False) -> dict:
    """Continue an interrupted or failed run from its ``checkpoint/`` with the config it was started with, on the
    same data and model (their fingerprints are checked) unless ``accept_changed_inputs``."""
    out = Path(run_dir)
    if not out.is_dir() or not is_run_folder(out):
        raise UsageError(f"--resume {run_dir}: not a greentrainer run folder")
    try:
        status = json.loads((out / "metrics.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    holder = in_use(out)
    if holder:
        raise UsageError(f"--resume {run_dir}: the run is still running ({holder}); wait for it to end or stop it")
    if status == "complete":
        raise UsageError(f"--resume {run_dir}: the run is already complete")
    old = out / "checkpoint.old"
    if not (out / "checkpoint").exists() and (old / "state.pt").is_file():  # killed while replacing it
        old.rename(out / "checkpoint")
    if not (out / "checkpoint" / "state.pt").is_file():
        raise UsageError(f"--resume {run_dir}: no checkpoint/ to continue from (checkpoints are written at the end "
                         f"of each epoch, or every --save-every N steps)")
    try:
        cfg = config_from_dict(json.loads((out / "train_config.json").read_text()))
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume {run_dir}: cannot read train_config.json ({e})") from None
    cfg.output_dir = str(out)
    return run_training(cfg, log, progress, resume_dir=out, accept_changed_inputs=accept_changed_inputs)


def _load_checkpoint(out: Path) -> dict:
    import torch
    try:  # our own file, read the safe way all the same
        state = torch.load(out / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a damaged checkpoint)
        raise UsageError(f"cannot read {out / 'checkpoint' / 'state.pt'}: {one_line(e)}") from None
    if "sharded" in state:
        from .engine.sharding import SHARDS
        state["shards_path"] = str(out / "checkpoint" / SHARDS)
    return state


def _match_processes(cfg: TrainConfig, resume: dict, world: int, log) -> None:
    """Resuming on another number of processes: the same global batch (processes × --grad-accum micro-batches of
    --batch-size), so the run goes on with the same steps; refused when it cannot be kept."""
    was, accum = resume.get("world_size", world), resume.get("grad_accum", cfg.grad_accum)
    if was == world:
        return
    if (was * accum) % world:
        raise UsageError(f"--resume: the run trained on {was} process(es) × --grad-accum {accum}; on {world} "
                         f"processes its global batch ({was * accum} micro-batches) cannot be kept; resume on a "
                         f"number of processes that divides {was * accum}")
    cfg.grad_accum = was * accum // world
    log(f"resuming on {world} process(es) (the run started on {was}): --grad-accum {cfg.grad_accum} keeps its "
        f"global batch of {cfg.batch_size * was * accum} items")


def _write_checkpoint(out: Path, state: dict) -> None:
    def write(tmp: Path) -> None:
        tmp.mkdir()
        _write_checkpoint_files(tmp, state)
    save_dir_atomic(out / "checkpoint", write)


def _write_checkpoint_files(folder: Path, state: dict) -> None:
    import torch
    torch.save(state, folder / "state.pt")
    (folder / "meta.json").write_text(json.dumps({"global_step": state["global_step"],
                                                  "epoch": state["epoch"]["epoch"] + 1,
                                                  "steps_done_in_epoch": state["epoch"]["steps_done"]}))


def _write_sharded_checkpoint(parts, state: dict, handle) -> None:
    """--fsdp: every process writes its slices into a new checkpoint folder, then the first process adds state.pt
    and puts the folder in place of the old one (as :func:`_write_checkpoint` does). The first process's outcome of
    its own steps is sent to every process, so a failure there stops them all instead of leaving them waiting."""
    from .engine.distributed import from_process_zero
    from .engine.sharding import SHARDS, save_sharded
    target = parts.out / "checkpoint"
    tmp = scratch_of(target)

    def agreed(step) -> None:
        error = None
        if parts.main:
            try:
                step()
            except Exception as e:  # noqa: BLE001  (sent to the others, then raised here)
                error = e
        said = from_process_zero(None if error is None else one_line(error))
        if error is not None:
            raise error
        if said is not None:
            raise RunFailed(f"the first process could not write the checkpoint: {said}")

    agreed(lambda: clear_scratch(target).mkdir())
    state["sharded"] = save_sharded(tmp / SHARDS, handle.model, handle.optimizer)  # (DCP raises on every process)
    agreed(lambda: replace_dir(target, lambda folder: _write_checkpoint_files(folder, state)))


@dataclasses.dataclass
class RunParts:
    """What :func:`setup` prepares for a run: its data, model, method, processes and folder."""

    cfg: TrainConfig
    spec: object                  # the dataset's DatasetSpec
    fmt: object                   # the prompt format
    train_ex: list
    val_ex: list
    test_ex: list
    train_enc: list
    val_enc: list
    model: object
    tok: object
    seq2seq: bool
    method: object
    acc: object                   # the Accelerator: processes and this process's device
    out: Path
    resume: dict | None           # the checkpoint to continue from
    grid: object
    meter: object                 # EnergyMeter or None
    log: object
    fingerprints: dict = dataclasses.field(default_factory=dict)  # of the data and the model (--resume checks)
    inputs_changed: list = dataclasses.field(default_factory=list)  # what a resume accepted as changed

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def max_new(self) -> int:
        return self.cfg.max_new_tokens or self.spec.max_new_tokens


class RunRecord:
    """The run folder's ``metrics.json``, always truthful about how far the run got; written by the first
    process only."""

    def __init__(self, parts: RunParts, metrics: dict):
        self.parts, self.metrics, self.saved = parts, metrics, False
        self.write = write_json_atomic if parts.main else _no_write

    def flush(self) -> None:
        self.write(self.parts.out / "metrics.json", self.metrics)

    def finish(self, status: str, reason: str | None = None) -> None:
        for tracker in self.parts.acc.trackers:  # flush TensorBoard / W&B ... (the first process holds them)
            tracker.finish()
        if not self.parts.main:
            return
        self.metrics["status"] = status
        if reason:
            self.metrics["reason"] = reason
        self.metrics["model_saved"] = self.saved
        try:
            self.flush()
        except OSError as e:
            warn(f"could not record status {status!r} in {self.parts.out / 'metrics.json'}: {e.strerror or e}")

    def save_model(self, model) -> None:
        _save_model(self.parts.method, model, self.parts.tok, self.parts.out, self.parts.fmt)
        self.saved = True


def run_training(cfg: TrainConfig, log=print, progress=True, resume_dir: Path | None = None,
                 accept_changed_inputs: bool = False) -> dict:
    """Run ``cfg`` (or continue it from ``resume_dir``'s checkpoint) in phases — setup, open the run folder,
    fit, save, evaluate — and return the metrics written to ``<output_dir>/metrics.json``."""
    parts = setup(cfg, log, resume_dir, accept_changed_inputs)
    try:
        return _run_in_folder(parts, progress)
    finally:
        release_run_folder(parts.out)  # (the kernel releases it too, if the process is killed)


def _run_in_folder(parts: RunParts, progress: bool) -> dict:
    cfg = parts.cfg
    record = RunRecord(parts, open_run_folder(parts))
    from .loop import RunHandle
    handle = RunHandle()  # the model as the loop left it (after its last completed step)
    try:
        parts.model.to(parts.acc.device)
        if cfg.eval_before and cfg.do_eval and parts.main and parts.resume is None:
            parts.log(f"evaluating before training on {len(parts.test_ex)} examples ...")
            evaluate_into(parts, record, "eval_before", "predictions_before.jsonl", "before", progress)
        model = fit(parts, record, handle, progress)
        sharded = _gather_if_sharded(parts, model)
        if not parts.main:  # the first process saves and evaluates the model, which is the same on every process
            return record.metrics
        record.save_model(model)  # before the evaluation, which can fail or be interrupted
        write_outputs(parts, record)
        if cfg.do_eval:
            if sharded:  # the merged model as saved, on the first process
                parts.log("--fsdp: evaluating the saved model on the first process")
                model = load_any(str(parts.out / "model"))[0].to(parts.acc.device)
            parts.log(f"evaluating on {len(parts.test_ex)} examples (beam {cfg.num_beams}, max {parts.max_new} new "
                      f"tokens) ...")
            evaluate_into(parts, record, "eval", "predictions.jsonl", "after", progress, model)
    except KeyboardInterrupt as e:
        what = "terminated" if type(e).__name__ == "Terminated" else "interrupted"
        if _sharded(handle.model):  # the processes stopped at different points: no collective gather now
            parts.log(f"{what}: the model is sharded; the last checkpoint holds its weights (--resume continues it)")
        elif parts.main and not record.saved and handle.model is not None:
            parts.log(f"{what}: saving the model as it is after step {handle.global_step}")
            _save_last_good(record, handle, "could not save the model")
        record.finish("interrupted", f"{what} by the user or a scheduler")
        raise
    except RunFailed as e:
        if _sharded(handle.model) and not record.saved:  # every process stopped at the same check: gather
            _gather_if_sharded(parts, handle.model)
        if parts.main and not record.saved and handle.model is not None:
            # the weights of the last step whose loss and gradients were finite
            _save_last_good(record, handle, "could not save the last good weights")
        record.finish("failed", one_line(e))
        raise RunFailed(f"{one_line(e)} (run folder {parts.out} marked failed"
                        f"{'; last good weights in model/' if record.saved else ''})") from None
    except OSError as e:
        record.finish("failed", f"{e.strerror or e}: {e.filename or ''}".strip(": "))
        raise RunFailed(f"could not write the run folder {parts.out}: {e.strerror or e}"
                        f"{' (' + str(e.filename) + ')' if e.filename else ''}"
                        f"{'; the trained weights are saved in model/' if record.saved else ''}") from None
    except Exception as e:
        record.finish("failed", f"{type(e).__name__}: {one_line(e)}")
        raise
    record.finish("complete")
    import shutil
    shutil.rmtree(parts.out / "checkpoint", ignore_errors=True)  # the finished model is in model/
    report_done(parts, record.metrics["totals"])
    return record.metrics


def _sharded(model) -> bool:
    from .engine.sharding import is_sharded
    return model is not None and is_sharded(model)


def _gather_if_sharded(parts: RunParts, model) -> bool:
    """--fsdp: every process takes part in putting the full weights on the first process (to save them)."""
    if not _sharded(model) or getattr(model, "_greentrainer_gathered", False):
        return _sharded(model)
    from .engine.sharding import gather_on_main
    gather_on_main(model, parts.main)
    model._greentrainer_gathered = True
    return True


def setup(cfg: TrainConfig, log, resume_dir: Path | None, accept_changed_inputs: bool = False) -> RunParts:
    """Validate, load the data and the model, build the method and the processes, and check the method's
    settings against the run (all before anything is written)."""
    cfg.validate()
    from .engine.metric_logging import grid_of
    grid = grid_of(cfg)
    spec, _ = resolve_dataset(cfg.dataset, cfg.dataset_format)
    out_dir = cfg.output_dir or default_output_dir(cfg)
    if resume_dir is None:
        check_output_dir(out_dir, cfg.overwrite)
    train_ex = load_examples(cfg.dataset, "train", cfg.max_train, cfg.seed, cfg.eval_dataset, cfg.dataset_format)
    eval_seed = items_seed(cfg.seed, cfg.eval_seed)
    max_val = cfg.max_eval if cfg.max_val is None else cfg.max_val
    val_ex = load_examples(cfg.dataset, "validation", max_val, eval_seed, cfg.eval_dataset, cfg.dataset_format)
    test_ex = load_examples(cfg.dataset, "test", cfg.max_eval, eval_seed, cfg.eval_dataset, cfg.dataset_format)
    check_input_length(load_config(cfg.model), cfg.max_input_length)  # fails fast, before the weights load
    from .energy import EnergyMeter
    meter = EnergyMeter(pick_device(cfg.device)) if cfg.track_energy else None  # detects hardware meanwhile
    log(f"loading model {cfg.model} ...")
    model, tok = load_model(cfg.model, attn_implementation=cfg.attn_implementation,
                            experts_implementation=cfg.experts_implementation)
    seq2seq = is_seq2seq(model)
    fmt = resolve_prompt_format(cfg.prompt_format, tok, seq2seq,
                                spec.instruction if cfg.instruction is None else cfg.instruction)
    train_enc = encode_all(train_ex, tok, spec.task, seq2seq, cfg.max_input_length, fmt)
    val_enc = encode_all(val_ex, tok, spec.task, seq2seq, cfg.max_input_length, fmt)
    test_enc = encode_all(test_ex, tok, spec.task, seq2seq, cfg.max_input_length, fmt)  # every prompt fits, or stop
    for name, enc in (("training", train_enc), ("validation", val_enc), ("test", test_enc)):
        cut = sum(e.truncated for e in enc)
        if cut:
            log(f"{cut} of {len(enc)} {name} rows are longer than --max-input-length {cfg.max_input_length}: "
                f"{'their source or prompt is cut' if spec.task != 'lm' else 'their end is cut'}")
    if cfg.packing:
        train_enc = packed(train_enc, model, seq2seq, cfg.max_input_length, log)
    from .methods import build_method
    method = build_method(cfg)
    from .engine.distributed import build_accelerator
    acc = build_accelerator(pick_device(cfg.device), cfg.trackers(), Path(out_dir) / "logs")  # processes, device
    if not acc.is_main_process:
        log = _silent
    from .data import typical_shape
    from .engine.reference import run_profile
    out = Path(out_dir)
    resume = _load_checkpoint(out) if resume_dir is not None else None
    if resume is not None:
        _match_processes(cfg, resume, acc.num_processes, log)
    steps_per_epoch = -(-len(train_enc) // (cfg.batch_size * acc.num_processes * cfg.grad_accum))
    method.check(model, run_profile(model.config, typical_shape(train_enc, cfg.batch_size, seq2seq),
                                    cfg.gradient_checkpointing),
                 steps_per_epoch, total_steps(steps_per_epoch, cfg.epochs, cfg.max_steps), cfg.grad_accum)
    fingerprints = {"data": data_fingerprint({"train": train_ex, "validation": val_ex, "test": test_ex}),
                    "model": model_fingerprint(model)}
    changed = []
    if resume_dir is not None:  # the same data and model as when the run started, or said so deliberately
        changed = check_unchanged(_recorded(out).get("fingerprints"), fingerprints, str(resume_dir),
                                  accept_changed_inputs)
        if changed:
            import logging
            logging.getLogger("greentrainer").warning(
                f"warning: continuing on changed {' and '.join(changed)} (--accept-changed-inputs)")
    return RunParts(cfg, spec, fmt, train_ex, val_ex, test_ex, train_enc, val_enc, model, tok, seq2seq, method,
                    acc, out, resume, grid, meter, log, fingerprints, changed)


def _recorded(out: Path) -> dict:
    """The run folder's metrics.json as it is (empty if unreadable)."""
    try:
        m = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def packed(train_enc: list, model, seq2seq: bool, capacity: int, log) -> list:
    """--packing: the training examples in rows of up to ``capacity`` tokens, or one line saying why this model
    cannot take them."""
    from .data import keeps_packed_apart, pack
    if seq2seq:
        raise UsageError("--packing is for decoder-only models; an encoder-decoder model pads its inputs and "
                         "targets separately; train without --packing")
    if not keeps_packed_apart(model):
        raise UsageError(f"--packing: this model ({model.config.model_type}) lets packed examples attend to each "
                         "other (its attention ignores per-example positions); train without --packing")
    rows = pack(train_enc, capacity)
    tokens = sum(len(e.input_ids) for e in train_enc)
    log(f"packing: {len(train_enc)} training examples in {len(rows)} rows of up to {capacity} tokens "
        f"({100 * tokens / (len(rows) * capacity):.0f}% filled)")
    return rows


def open_run_folder(parts: RunParts) -> dict:
    """Create (or, resuming, reopen) the run folder with its config files, start the trackers, and return the
    metrics the folder records from now on (``status: running``)."""
    cfg, acc, out, resume = parts.cfg, parts.acc, parts.out, parts.resume
    if parts.main and resume is not None:
        lock_run_folder(out)  # (a run killed earlier left none: the kernel let its lock go)
    if parts.main and resume is None:  # only the first process writes; the others wait until the folder exists
        parts.out = out = prepare_output_dir(str(out), cfg.overwrite)
        write_json_atomic(out / "train_config.json", cfg.to_dict())
        write_text_atomic(out / "train_config.yaml", options_yaml(cfg))
    acc.wait_for_everyone()
    if cfg.trackers():
        from .config import options_from_config
        acc.init_trackers("greentrainer", config={k: v for k, v in options_from_config(cfg).items()
                                                  if isinstance(v, (int, float, str, bool))})
    spec = parts.spec
    test_name = cfg.eval_dataset or f"{spec.name} {spec.eval_split}"
    metrics = {"status": "running", "config": cfg.to_dict(), "dataset": spec.name, **parts.fmt.to_dict(),
               "n_train": len(parts.train_ex), "n_validation": len(parts.val_ex), "n_eval": len(parts.test_ex),
               "splits": {"train": f"{spec.name} {spec.train_split}",
                          "validation": (f"{len(parts.val_ex)} items, for the per-epoch val_loss (steers nothing but "
                                         "is the split to choose settings on)") if parts.val_ex
                          else "none (too few rows)",
                          "eval": f"{test_name}: the final report (eval, eval_before, predictions.jsonl)"},
               "device": str(acc.device), "world_size": acc.num_processes,
               "effective_batch_size": cfg.batch_size * acc.num_processes * cfg.grad_accum}
    metrics["fingerprints"] = parts.fingerprints
    if resume is not None:
        previous = _recorded(out)
        metrics.update({k: v for k, v in previous.items() if k in ("eval_before", "fingerprints")})
        if parts.inputs_changed:  # accepted: what it continued on
            metrics["inputs_changed_at_resume"] = {k: parts.fingerprints[k] for k in parts.inputs_changed}
        metrics["resumed_from_step"] = resume["global_step"]
        parts.log(f"resuming {out} from its checkpoint at optimizer step {resume['global_step']}")
    (write_json_atomic if parts.main else _no_write)(out / "metrics.json", metrics)
    return metrics


def fit(parts: RunParts, record: RunRecord, handle, progress: bool):
    """Train with the one loop (checkpoints into the run folder, each epoch's history into metrics.json);
    returns the model to save."""
    from .loop import train

    def epoch_done(history):
        record.metrics["history"] = history
        record.flush()

    def checkpoint(state):
        if "sharded" in state:
            _write_sharded_checkpoint(parts, state, handle)
        elif parts.main:
            _write_checkpoint(parts.out, state)

    result = train(parts.model, parts.tok, parts.method, parts.train_enc, parts.val_enc, parts.cfg, parts.acc.device,
                   log=parts.log, progress=progress and parts.main, on_epoch_end=epoch_done, accelerator=parts.acc,
                   resume=parts.resume,
                   on_checkpoint=checkpoint, handle=handle, grid=parts.grid, energy_meter=parts.meter)
    record.metrics.update({"history": result["history"], "totals": result["totals"],
                           "profile_shape": result["profile_shape"], "grid": parts.grid.describe()})
    return parts.method.finalize(result["model"])


def write_outputs(parts: RunParts, record: RunRecord) -> None:
    """The method's own files (selections, heatmap), the carbon plot and the finished metrics."""
    parts.method.write_artifacts(parts.out)
    if "co2_g" in record.metrics["totals"]:
        from .energy import plot_carbon
        plot_carbon(record.metrics["history"], parts.grid, parts.out / "carbon.png")
    record.flush()


def evaluate_into(parts: RunParts, record: RunRecord, key: str, predictions_file: str, label: str, progress: bool,
                  model=None) -> None:
    """Evaluate on the test items: metrics under ``key``, predictions in ``predictions_file``."""
    from .evaluate import evaluate
    cfg = parts.cfg
    m, preds = evaluate(model if model is not None else parts.model, parts.tok, parts.test_ex, parts.spec.task,
                        parts.seq2seq, cfg.max_input_length, parts.max_new, cfg.num_beams, cfg.eval_batch_size,
                        progress, parts.fmt)
    record.metrics[key] = m
    write_text_atomic(parts.out / predictions_file, "".join(json.dumps(r) + "\n" for r in preds))
    parts.log(f"{label}: " + _fmt(m))


def _save_last_good(record: RunRecord, handle, what: str) -> None:
    try:
        record.save_model(record.parts.method.finalize(handle.model))
    except (OSError, RunFailed) as err:
        warn(f"{what}: {one_line(err)}")


def report_done(parts: RunParts, t: dict) -> None:
    """The end-of-run lines: measured FLOPs against full fine-tuning, time, memory, budget, energy."""
    log = parts.log
    log(f"done: {fmt_flops(t['flops_total'])} measured "
        f"(forward {fmt_flops(t['flops_forward'])}, backward {fmt_flops(t['flops_backward'])}, "
        f"overhead {fmt_flops(t['flops_overhead'])}) = {100 * t['flops_fraction_of_full']:.1f}% of full "
        f"fine-tuning on the same {'packed ' if parts.cfg.packing else ''}batches"
        + (f" ({100 * t['flops_fraction_of_full_random_batches']:.1f}% of full fine-tuning on random padded "
           "batches)" if "flops_fraction_of_full_random_batches" in t else "")
        + f"; {t['time_s']:.1f} s training; peak memory {t['peak_memory_bytes'] / 2**20:.0f} MiB; run folder "
        f"{parts.out}")
    if t.get("within_budget") is False:  # a warning (kept by --quiet; on stderr where logging is not set up)
        import logging
        logging.getLogger("greentrainer").warning(
            f"warning: the run measured {100 * t['flops_fraction_of_full']:.1f}% of full fine-tuning's FLOPs, "
            f"above the {100 * t['flops_allowed_fraction']:.1f}% its ρ allowed: the steps after an overspend were "
            f"too few to repay it (select less often, probe fewer batches or shorten the warm-up)")
    if "co2_g" in t:
        log(energy_line(t, parts.grid))


def energy_line(t: dict, grid) -> str:
    """The end-of-run energy and carbon sentence, with what full fine-tuning would have used."""
    from .energy import fmt_co2, fmt_energy
    e, kwh = t["energy"], t["energy_kwh"]
    saved = t["co2_full_ft_reference_g"] - t["co2_g"]
    where = grid.source if grid.trace is None else f"along {grid.trace.source}"
    how = ", ".join(f"{k.upper()} {v.split(':')[0]}" for k, v in e["components"].items())
    return (f"energy: {fmt_energy(kwh)} ({e['kind']}: {how}; metrics.json says how) = {fmt_co2(t['co2_g'])} at "
            f"{t['co2_g'] / kwh if kwh else 0:.0f} gCO2eq/kWh ({where}); full fine-tuning on the same batches: "
            f"{fmt_energy(t['energy_full_ft_reference_kwh'])}, {fmt_co2(t['co2_full_ft_reference_g'])} (at this "
            f"run's energy per FLOP); saved {fmt_co2(max(saved, 0.0))}")


def _silent(*args, **kwargs) -> None:
    """Logging of processes other than the first."""


def _no_write(*args, **kwargs) -> None:
    """Writing of processes other than the first."""


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, float))


def check_eval_output(path: str | None) -> None:
    """An ``eval --output`` file must be writable before minutes of generation are spent."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--output {path} is a folder; give a file name")
    if not p.parent.is_dir():
        raise UsageError(f"--output {path}: folder {p.parent} does not exist")
    import os
    if not os.access(p.parent, os.W_OK):
        raise UsageError(f"--output {path}: folder {p.parent} is not writable")


def run_eval(model_dir: str, dataset: str, max_eval: int | None, num_beams: int, max_new_tokens: int | None,
             max_input_length: int, seed: int | None, batch_size: int, device: str, log=print, progress=True,
             eval_dataset: str | None = None, prompt_format: str = "auto", instruction: str | None = None) -> dict:
    """Evaluate a saved model (full model folder or PEFT adapter folder) or a model name on the test split
    (a user file's held-out part, or every row of ``eval_dataset``)."""
    trained = recorded_train_config(model_dir)
    data_format = (trained or {}).get("dataset_format") or "auto"  # as the run read it
    spec, _ = resolve_dataset(dataset, data_format)
    exs = load_examples(dataset, "test", max_eval, run_eval_seed(trained) if seed is None else seed, eval_dataset,
                        data_format)
    status = run_status(model_dir)
    if status is not None and trained is not None:
        _check_unseen(trained, exs, eval_dataset or dataset)
    model, tok = load_any(model_dir)
    model.to(pick_device(device))
    seq2seq = is_seq2seq(model)
    recorded = recorded_prompt_format(model_dir)
    if recorded is not None and prompt_format == "auto" and instruction is None:
        fmt = resolve_prompt_format(recorded.kind, tok, seq2seq, recorded.instruction)  # as it was trained
    else:
        fmt = resolve_prompt_format(prompt_format, tok, seq2seq,
                                    spec.instruction if instruction is None else instruction)
        if recorded is not None and fmt != recorded:
            warn(f"{model_dir} was trained with the {recorded.kind} prompt format"
                 f"{' and another instruction' if recorded.kind == fmt.kind else ''}; evaluating with {fmt.kind}")
    from .evaluate import evaluate
    m, preds = evaluate(model, tok, exs, spec.task, seq2seq, max_input_length,
                        max_new_tokens or spec.max_new_tokens, num_beams, batch_size, progress, fmt)
    log(_fmt(m))
    res = {"metrics": m, "predictions": preds, **fmt.to_dict()}
    if status is not None:
        res["run_status"] = status
    return res


def recorded_train_config(path: str) -> dict | None:
    """A run folder's train_config.json as plain data, read leniently (older versions' run folders too, whose
    fields ``config_from_dict`` would refuse); None for anything that is not a run folder."""
    try:
        cfg = json.loads((Path(path) / "train_config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def run_eval_seed(trained: dict | None, default: int = 42) -> int:
    """The seed a run sampled its test items with (``items_seed``), so that ``eval`` scores the same items;
    ``default`` for anything that is not a run folder."""
    try:
        return int(items_seed(trained["seed"], trained.get("eval_seed")))
    except (KeyError, TypeError, ValueError):
        return default


def run_status(path: str) -> str | None:
    """The status of a run folder (warning on stderr unless complete); None for anything else."""
    p = Path(path)
    if not p.is_dir() or not is_run_folder(p):
        return None
    try:
        m = json.loads((p / "metrics.json").read_text())
        status, reason = m.get("status", "unknown"), m.get("reason")
    except (OSError, ValueError, AttributeError):
        status, reason = "unknown", "metrics.json is missing or unreadable"
    if status != "complete":
        warn(f"run folder {path} has status {status!r}{' (' + reason + ')' if reason else ''}: "
             f"evaluating the weights it saved, which are not a finished run")
    if not (p / "model").is_dir():
        raise UsageError(f"run folder {path} has no saved model (status {status!r})")
    return status


def _check_unseen(cfg: dict, exs, eval_name: str) -> None:
    """Refuse to evaluate a run on items it trained on (a user file given to ``eval`` as a whole)."""
    try:
        train = load_examples(cfg["dataset"], "train", None, 0, cfg.get("eval_dataset"))
    except (OSError, ValueError, KeyError, UsageError):
        return  # training data not available here: nothing to compare with
    check_no_overlap(train, exs, cfg["dataset"], eval_name)


def load_any(path: str):
    """A model name/folder, a run folder (uses its model/), or a PEFT adapter folder."""
    p = Path(path)
    if (p / "model").is_dir() and (p / "train_config.json").exists():
        p = p / "model"
    if (p / "adapter_config.json").exists():
        try:
            info = p / "greentrainer_base.json"
            base = json.loads(info.read_text())["base_model"] if info.exists() else \
                json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"adapter folder {p}: adapter_config.json is unreadable or names no base model") from None
        model, tok = load_model(base)
        from peft import PeftModel
        from .models import describe_load_error
        try:
            return PeftModel.from_pretrained(model, str(p)), tok
        except Exception as e:  # noqa: BLE001  (a truncated or foreign adapter file)
            raise describe_load_error(str(p), e) from None
    return load_model(str(p) if p.exists() else path)

