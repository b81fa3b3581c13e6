"""Accuracy you can compare: every method on the default model, tuned on the validation split, reported on the
test split with 95% bootstrap confidence intervals and a Pareto plot of ROUGE-L against measured FLOPs.

Stages, each one JSON per run in bench/results/accuracy/<dataset>/ (a run whose file exists is skipped, so
the script can be stopped and started again, across sessions, and a run stopped midway continues from its last
checkpoint, written every 1/8 of the run; several processes, e.g. one per core with
`OMP_NUM_THREADS=1 taskset -c N`, can run a stage together: each run is claimed by a lock file holding its pid):

  sweep   each method's learning rate (then LoRA/DoRA rank, prefix length, SMT budget) on the VALIDATION split:
          a short run per setting, the lowest final validation loss wins (a winner at the edge of the lr grid
          is tried one step further, ×3 or ÷3, up to twice); writes accuracy_sweep_<dataset>.md
  ablate  GreenTrainer ρ 0.5 at its swept lr with one change each (importance metric, probe batches,
          re-selection, warm-up, ρ schedule), on the validation split as the sweep; accuracy_ablations_<dataset>.md
  final   each method at its winning setting for --steps optimizer steps and --seeds seeds, evaluated on
          --test-items test items (greedy decoding), and the untrained model on the same items (the zero-shot
          row); writes accuracy_<dataset>.{md,json,png}. Before it trains it prints how many runs are left and
          about how long they take on one core. Full FT for fewer steps at GreenTrainer's FLOPs (full@0.45 to
          full@0.7: at most ρ·steps optimizer steps with a linear schedule over those steps) is the baseline
          a skeptic asks for first: does choosing tensors beat simply training everything for less long?
          GreenTrainer's own step policies run at their own swept lr: gt-fewer0.5 (the default, "fewer":
          those full steps inside the tool) and gt-frontier0.5 (skip, partial or full backward per step).

python bench/accuracy.py --dataset scitldr --stage sweep
python bench/accuracy.py --dataset scitldr --stage ablate
python bench/accuracy.py --dataset scitldr --stage final
python bench/accuracy.py --dataset scitldr --stage report     # tables and plot from the runs done so far
python bench/accuracy.py --dataset scitldr --stage plan       # what the final stage has left, and its cost
python bench/accuracy.py --dataset scitldr --stage final --until 17:30   # only the runs that should end by then

A study of another length (issue 34: a task where more compute still helps) has its own folder, report and
per-FLOP curves (validation loss every steps/8 against the FLOPs spent, probes included):
python bench/accuracy.py --dataset dialogsum --stage final --steps 512 --epochs 1 \
    --methods full,full@0.5,gt0.5,gt-frontier0.5,gt-fewer0.5          # 2048 items, each seen once
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, machine
from greentrainer.files import write_json_atomic, write_text_atomic

PAPER_LR = 2e-5  # the paper's one lr for every method
# Methods of the comparison: label -> (method, options). GreenTrainer's lr is swept at ρ 0.5 and shared.
VARIANTS = {
    "full": ("full", {}),
    "gt0.4": ("greentrainer", {"rho": 0.4}),  # refused on the default model (smallest feasible ρ 0.406): 0.45 instead
    "gt0.45": ("greentrainer", {"rho": 0.45}),
    "gt0.5": ("greentrainer", {"rho": 0.5}),
    "gt0.6": ("greentrainer", {"rho": 0.6}),
    "gt0.7": ("greentrainer", {"rho": 0.7}),
    "top2": ("top2", {}),
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "prefix": ("prefix", {}),
    "smt": ("smt", {}),
    "gt-lora0.5": ("greentrainer", {"over": "lora", "rho": 0.5}),     # beyond the papers (--over)
    "gt-blocks0.5": ("greentrainer", {"over": "blocks", "rho": 0.5}),
    # at another method's measured FLOPs (ρ = the mean fraction its final runs measured): equal-cost comparisons
    "gt@lora": ("greentrainer", {"rho": "lora"}),
    "gt-lora@lora": ("greentrainer", {"over": "lora", "rho": "lora"}),
    "gt-blocks@smt": ("greentrainer", {"over": "blocks", "rho": "smt"}),
    # the paper's second claim at the paper's single lr for every method ("lr" sets it instead of the sweep's):
    # whether "LoRA + 2" comes from LoRA's lr rather than from the selection (issue 14, item 6)
    "lora@paper-lr": ("lora", {"lr": PAPER_LR}),
    "gt@lora@paper-lr": ("greentrainer", {"rho": "lora", "lr": PAPER_LR}),
    # full FT for fewer steps at GreenTrainer ρ's FLOPs (issue 34): ``fewer_steps`` becomes the epochs and items
    # of a run of at most ρ·steps optimizer steps (see fewer_steps), its linear schedule over those steps;
    # ``each_item_once``: the data-budget setting, one epoch over ρ·steps·batch items
    "full@0.45": ("full", {"fewer_steps": 0.45}),  # the long run cut at step 115 (--max-steps)
    "full@0.5": ("full", {"fewer_steps": 0.5}),
    "full@0.6": ("full", {"fewer_steps": 0.6}),  # cut at step 154
    "full@0.7": ("full", {"fewer_steps": 0.7}),  # the long run cut at step 179 (--max-steps)
    "full@0.7-once": ("full", {"fewer_steps": 0.7, "each_item_once": True}),
    # GreenTrainer choosing per step between skipping the batch, a partial and a (nearly) full backward
    "gt-frontier0.5": ("greentrainer", {"rho": 0.5, "step_policy": "frontier"}),
    # the tool's default policy: full FT for the steps that fit ρ, at its own swept lr (full@0.5 is the same steps
    # at full FT's): against full@0.5 the learning rate alone, against the frontier policy the policy alone
    "gt-fewer0.5": ("greentrainer", {"rho": 0.5, "step_policy": "fewer"}),
    # full FT over every step at GreenTrainer's lr: whether the long run's swept 3e-5 (tuned at 64 SciTLDR steps)
    # is too low for longer runs: on DialogSum's 512 steps full FT for half of them at 1e-4 ended below it, on
    # SciTLDR's 256 it scored higher ROUGE-L (a check, 1 seed)
    "full-lr1e-4": ("full", {"lr": 1e-4}),
    # the paper's selection at a higher lr (a check, 1 seed): its 1e-4 was swept on SciTLDR's 64 steps, and on
    # DialogSum's one pass full FT's better rate is higher than SciTLDR's (1e-4 against 3e-5)
    "gt0.5-lr3e-4": ("greentrainer", {"rho": 0.5, "lr": 3e-4}),
}
# whose sweep winner (lr and knobs) a variant takes: GreenTrainer over LoRA adapters trains LoRA's tensors at
# LoRA's setting; over SMT's blocks, SMT's
SETTING_FROM = {"gt-lora0.5": "lora", "gt-blocks0.5": "smt", "gt-lora@lora": "lora", "gt-blocks@smt": "smt"}
LABELS = {"full": "Full FT", "gt0.4": "GreenTrainer ρ=0.4", "gt0.45": "GreenTrainer ρ=0.45",
          "gt0.5": "GreenTrainer ρ=0.5", "gt0.6": "GreenTrainer ρ=0.6", "gt0.7": "GreenTrainer ρ=0.7",
          "top2": "FT-Top2", "lora": "LoRA",
          "dora": "DoRA", "prefix": "Prefix", "smt": "SMT",
          "gt-lora0.5": "GT over LoRA ρ=0.5", "gt-blocks0.5": "GT over blocks ρ=0.5",
          "gt@lora": "GreenTrainer at LoRA's FLOPs", "gt-lora@lora": "GT over LoRA at LoRA's FLOPs",
          "gt-blocks@smt": "GT over blocks at SMT's FLOPs", "lora@paper-lr": "LoRA at the paper's lr 2e-5",
          "gt@lora@paper-lr": "GreenTrainer at LoRA's FLOPs, lr 2e-5", "zeroshot": "Zero-shot (untrained)",
          "full@0.45": "Full FT, 45% of the steps", "full@0.5": "Full FT, 50% of the steps",
          "full@0.6": "Full FT, 60% of the steps", "full@0.7": "Full FT, 70% of the steps",
          "full@0.7-once": "Full FT, 70% of the steps, each item once",
          "gt-frontier0.5": "GreenTrainer ρ=0.5, frontier step policy",
          "gt-fewer0.5": "GreenTrainer ρ=0.5, fewer full steps (the default)",
          "full-lr1e-4": "Full FT at lr 1e-4", "gt0.5-lr3e-4": "GreenTrainer ρ=0.5 at lr 3e-4"}
# The sweep: learning rates per method (at the method's other defaults), then one more knob at the best lr.
SWEEP_LRS = {"full": [3e-5, 1e-4, 3e-4], "greentrainer": [1e-4, 3e-4, 1e-3], "top2": [1e-4, 3e-4, 1e-3],
             "lora": [3e-4, 1e-3, 3e-3], "dora": [3e-4, 1e-3, 3e-3], "prefix": [1e-3, 3e-3, 1e-2],
             "smt": [1e-4, 3e-4, 1e-3]}
SWEEP_KNOB = {"lora": [{"lora_r": 16, "lora_alpha": 32}], "dora": [{"lora_r": 16, "lora_alpha": 32}],
              "prefix": [{"prefix_tokens": 40}], "smt": [{"smt_params": 5.0}]}
# variants swept on their own (their lr is not the method's): the frontier step policy mostly trains full steps
SWEEP_VARIANTS = {"gt-frontier0.5": [3e-5, 1e-4, 3e-4],
                  "gt-fewer0.5": [3e-5, 1e-4, 3e-4]}  # full FT on half the steps: its lr need not be full FT's
SWEEP_ORDER = ["full", "lora", "smt", "top2", "dora", "prefix", "greentrainer", *SWEEP_VARIANTS]
# Ablations of GreenTrainer ρ 0.5 at its swept lr on the validation split (the sweep's protocol), one change each
SCHEDULES = Path(__file__).parent / "schedules"
ABLATIONS = {
    "importance dw (Σ\\|Δw\\|)": {"importance": "dw"},  # escaped: the table's columns stay
    "importance grad (Σ g²)": {"importance": "grad"},
    "probe over 4 batches": {"probe_batches": 4},
    "re-select every 8 steps": {"select_every": 8},
    "select once": {"select_once": True},
    "no full FT warm-up (the paper)": {"full_warmup_steps": 0},
    "ρ 0.55 then 0.45 (no warm-up; the mean is 0.5)": {"rho_schedule": str(SCHEDULES / "rho_0.55_then_0.45.json")},
}
NOISE_SEEDS = (1, 2)  # the ablations' defaults run again with these seeds: the bar a variant must clear
FINAL_SEEDS = {"full": 3, "gt0.45": 3, "gt0.5": 3, "gt0.6": 3, "gt0.7": 3, "full@0.45": 3, "full@0.6": 3,
               "full@0.7-once": 3, "lora": 3, "smt": 3, "gt-lora0.5": 3, "gt-blocks0.5": 3,
               "gt@lora": 3, "gt-lora@lora": 3, "gt-blocks@smt": 3, "full@0.5": 3, "full@0.7": 3,
               "gt-frontier0.5": 3, "gt-fewer0.5": 3}
# the rest: 1 seed
# Paired comparisons on the same test items (variant, against, target ROUGE-L difference or None, why): the
# paper's two claims (issue 14), then budgeted selection over adapters and blocks against its peers (issue 16)
COMPARISONS = [("gt0.5", "full", -1.0, "the paper: ρ 0.5 within 1.0 ROUGE-L of full FT"),
               ("gt@lora", "lora", 2.0, "the paper: at LoRA's FLOPs, at least LoRA + 2"),
               ("gt@lora@paper-lr", "lora@paper-lr", 2.0, "the same claim at the paper's lr 2e-5 for both"),
               ("gt-lora@lora", "lora", None, "adapters chosen under ρ against all adapters, equal FLOPs"),
               ("gt-lora@lora", "gt@lora", None, "over adapters against over tensors, equal FLOPs"),
               ("gt-lora0.5", "gt0.5", None, "over adapters against over tensors, ρ 0.5"),
               ("gt-lora0.5", "lora", None, "adapters chosen under ρ 0.5 against all adapters at their own FLOPs"),
               ("gt-blocks@smt", "smt", None, "blocks under ρ against SMT's blocks, equal FLOPs"),
               ("gt-blocks0.5", "gt0.5", None, "over blocks against over tensors, ρ 0.5"),
               ("gt-blocks0.5", "smt", None, "blocks under ρ 0.5 against SMT's blocks at their own FLOPs"),
               # issue 34: choosing tensors against training every tensor for fewer steps, at the same FLOPs
               ("gt0.45", "full@0.45", None, "selection against full FT for fewer steps, equal FLOPs (ρ 0.45)"),
               ("gt0.5", "full@0.5", None, "selection against full FT for fewer steps, equal FLOPs (ρ 0.5)"),
               ("gt0.6", "full@0.6", None, "selection against full FT for fewer steps, equal FLOPs (ρ 0.6)"),
               ("gt0.7", "full@0.7", None, "selection against full FT for fewer steps, equal FLOPs (ρ 0.7)"),
               ("gt0.7", "full@0.7-once", None, "the same, full FT on fresh items each seen once (data budget)"),
               ("gt-frontier0.5", "full@0.5", None, "skip / partial / full chosen per step against fewer full steps"),
               ("gt-fewer0.5", "full@0.5", None, "fewer full steps at GreenTrainer's lr against at full FT's"),
               ("gt0.5", "gt-fewer0.5", None, "selection against fewer full steps, both at GreenTrainer's lr"),
               ("full-lr1e-4", "full", None, "full FT at GreenTrainer's lr against at its swept lr"),
               ("gt-fewer0.5", "full-lr1e-4", None, "fewer full steps against every step, the same lr"),
               ("gt0.5-lr3e-4", "gt0.5", None, "the selection at 3e-4 against at its swept lr"),
               ("gt0.5-lr3e-4", "gt-fewer0.5", None, "the selection at 3e-4 against fewer full steps"),
               ("gt-frontier0.5", "gt-fewer0.5", None, "the frontier policy against fewer full steps, the same lr"),
               ("gt-frontier0.5", "gt0.5", None, "the frontier step policy against a partial step every step")]
# the plot of issue 16's comparison: these variants, each family joined by a line
FAMILIES = {"GreenTrainer (tensors)": ["gt0.45", "gt0.5", "gt@lora", "gt0.6", "gt0.7"],
            "GT over LoRA": ["gt-lora0.5", "gt-lora@lora"], "LoRA": ["lora"],
            "GT over blocks": ["gt-blocks0.5", "gt-blocks@smt"], "SMT": ["smt"], "Full FT": ["full"],
            "Full FT, fewer steps": ["full@0.45", "full@0.5", "full@0.6", "full@0.7"]}
# issue 34's question in one picture (_fewer.png): choosing tensors against training every tensor for fewer steps
FEWER_FAMILIES = {"Full FT, every step": ["full"], "Full FT at lr 1e-4, every step": ["full-lr1e-4"],
                  "Full FT, fewer steps (full FT's lr)": FAMILIES["Full FT, fewer steps"],
                  "Fewer full steps at 1e-4 (the default)": ["gt-fewer0.5"],
                  "The paper's selection (select)": ["gt0.45", "gt0.5", "gt0.6", "gt0.7"],
                  "Skip / partial / full per step (frontier)": ["gt-frontier0.5"],
                  "The paper's selection at lr 3e-4": ["gt0.5-lr3e-4"]}
# joined by a line in the main plot too (every other row there is a point of its own)
JOINED = {"Full FT, fewer steps": FAMILIES["Full FT, fewer steps"]}
# the pace of a 256-step full FT run on one core when no final run of full FT measured it (issue 34: 45–60 min of
# training, ~10 min to load, validate and test on 200 items)
PACE_S_PER_STEP, PACE_OVERHEAD_S = 52.5 * 60 / 256, 600.0


def shown(v):
    """An option as run names and tables show it: a schedule file by its stem."""
    return Path(v).stem if isinstance(v, str) and v.endswith(".json") else v


def run_id(method: str, opts: dict, lr: float, seed: int, steps: int) -> str:
    opts = {k: shown(v) for k, v in opts.items()}
    knobs = "".join(f"-{k}{v:g}" if isinstance(v, float) else f"-{k}{v}" for k, v in sorted(opts.items()))
    return f"{method}{knobs}-lr{lr:g}-s{seed}-{steps}steps"


def long_study(a) -> bool:
    """A final study of another length than the table's (256 steps in 2 epochs): its own folder and report."""
    return (getattr(a, "stage", "final") not in ("sweep", "ablate") and not getattr(a, "quick", False)
            and (a.steps, a.epochs) != (256, 2))


def final_dir(a) -> Path:
    """The final runs' folder: final/ for the table's 256 steps in 2 epochs, final-<steps>steps-<epochs>epochs/
    for a study of another length (issue 34's long runs), so the two never pool."""
    name = f"final-{a.steps}steps-{a.epochs}epochs" if long_study(a) else "final"
    return RESULTS / "accuracy" / a.dataset / name


def result_path(a, stage: str, s: tuple, seed: int) -> Path:
    """The result file of one run of setting ``s`` (method, options, lr) in a stage: there when it is done."""
    folder = final_dir(a) if stage == "final" else RESULTS / "accuracy" / a.dataset / stage
    return folder / f"{run_id(*s, seed=seed, steps=a.steps)}.json"


def final_path(a, s: tuple, seed: int) -> Path:
    return result_path(a, "final", s, seed)


def report_name(a) -> str:
    """accuracy_<dataset>, with the study's length where it is not the table's."""
    return f"accuracy_{a.dataset}" + (f"_{a.steps}steps_{a.epochs}epochs" if long_study(a) else "")


def one_run(a, stage: str, method: str, opts: dict, lr: float, seed: int, log) -> dict:
    """Train (and for the final stage evaluate) one setting; its result file, or the one already there."""
    path = result_path(a, stage, (method, opts, lr), seed)
    return claimed(path, log, lambda: _train_one(a, stage, method, opts, lr, seed, log, path))


def claimed(path: Path, log, make) -> dict:
    """The result file at ``path``: the one already there, or ``make()``'s, made by this process alone."""
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    with claim(path.with_suffix(".lock")) as mine:
        if not mine:  # another process of this script makes it now
            log(f"  {path.name}: running in another process; skipped")
            return {"error": "running in another process"}
        if path.is_file():  # finished by another process just now
            return json.loads(path.read_text())
        return make()


@contextlib.contextmanager
def claim(lock: Path):
    """Whether this process may train the run: the lock file is created atomically and holds our pid; a lock
    whose process is gone is taken over. Two processes of this script (one per core) can then walk the same
    list of runs without training any twice."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
                cmdline = Path(f"/proc/{pid}/cmdline")  # a pid reused by another program after a session ended
                if cmdline.exists() and b"accuracy.py" not in cmdline.read_bytes():
                    raise ProcessLookupError
                yield False  # alive (or not ours to signal: treat as alive)
                return
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # its process died: take the run over
                continue
            except PermissionError:
                yield False
                return
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def _train_one(a, stage, method, opts, lr, seed, log, path) -> dict:
    from greentrainer.config import config_from_options
    from greentrainer.errors import UsageError
    from greentrainer.run import resume_training, run_training
    n_train = a.steps * a.batch_size // a.epochs
    final = stage == "final"
    extra = dict(opts)  # its epochs and max_train, where it sets them (full FT for fewer steps), replace ours
    own_steps = run_steps(a, extra)
    if method == "smt":
        extra.setdefault("smt_warmup", max(1, a.steps // 4))
    if method == "greentrainer":  # what every GreenTrainer row measured (the default "auto" is "fewer" since)
        extra.setdefault("step_policy", "select")  # a quarter of the run chooses the blocks
    # our run folder while it trains, with a checkpoint every 1/8 of the run: a run stopped with its session
    # continues from there next time; the folder goes once the run's JSON is written
    work = work_dir(path)
    t0 = time.perf_counter()
    resumed = (work / "checkpoint" / "state.pt").is_file() or (work / "checkpoint.old" / "state.pt").is_file()
    try:
        if resumed:
            log(f"  {path.name}: continuing from its checkpoint")
            m = resume_training(str(work), log=lambda *x: None, progress=False)
        else:
            cfg = config_from_options({**dict(
                dataset=a.dataset, method=method, lr=lr, seed=seed, epochs=a.epochs, batch_size=a.batch_size,
                max_train=n_train, max_eval=a.test_items if final else a.val_items,
                max_input_length=a.max_input_length, num_beams=1, no_eval=not final, output_dir=str(work),
                eval_seed=0,  # every seed validated and tested on the same items (seed 0's), so they pair
                overwrite=True, save_every=own_steps // 8 if own_steps >= 64 else None,
                **(dict(eval_steps=a.eval_steps, max_val=a.val_items) if getattr(a, "eval_steps", None) else {})),
             **extra})
            m = run_training(cfg, log=lambda *x: None, progress=False)
    except UsageError as e:  # a setting this model cannot run (ρ below the smallest feasible): kept, so the
        log(f"  {path.name}: {e}")  # report can say so and the next session does not try again
        if resumed:  # a refused resume says nothing of the setting: its checkpoint stays, nothing is kept
            return {"error": f"cannot continue from its checkpoint: {e}"}
        res = {"stage": stage, "dataset": a.dataset, "method": method, "options": opts, "lr": lr, "seed": seed,
               "steps": a.steps, "error": str(e), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
        write_json_atomic(path, res)
        shutil.rmtree(work, ignore_errors=True)
        return res
    wall = time.perf_counter() - t0
    preds = [json.loads(ln) for ln in (work / "predictions.jsonl").read_text().splitlines()] if final else []
    t = m["totals"]
    res = {"stage": stage, "dataset": a.dataset, "method": method, "options": opts, "lr": lr, "seed": seed,
           "steps": a.steps, "optimizer_steps": t.get("steps"),  # steps: the study's; optimizer_steps: this run's
           "n_train": m["n_train"], "n_validation": m["n_validation"],
           "val_loss": [h["val_loss"] for h in m["history"]], "train_loss": [h["train_loss"] for h in m["history"]],
           "flops_fraction_of_full": t["flops_fraction_of_full"], "flops_total": t["flops_total"],
           "train_time_s": t["time_s"], "wall_s": wall, "resumed": resumed,
           "prompt_format": m.get("prompt_format"),
           "selector_time_s": [s["selector_time_s"] for h in m["history"] for s in h.get("selections", [])
                               if "selector_time_s" in s],  # GreenTrainer: each selection's solve
           "selections": [{k: s[k] for k in ("step", "kind", "n_selected", "predicted_fraction_of_full", "selected",
                                             "step_policy") if k in s}
                          for h in m["history"] for s in h.get("selections", [])],  # what trained
           "steps_by_kind": [h["steps_by_kind"] for h in m["history"] if "steps_by_kind" in h],  # frontier policy
           # --eval-steps: [step, validation loss, FLOPs spent so far (probes included), full FT's on those batches]
           "val_curve": [pt for h in m["history"] for pt in h.get("val_curve", [])],
           "config": m["config"], "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if final:
        res["eval"] = m["eval"]
        res["per_item_rougeL"] = per_item_rouge(preds)
        res["test_ids"] = [p["id"] for p in preds]
        res["predictions"] = preds[:3]
    write_json_atomic(path, res)
    shutil.rmtree(work, ignore_errors=True)
    log(f"  {path.name}: val loss {res['val_loss'][-1]:.4f}"
        + (f", ROUGE-L {res['eval']['rougeL_first_ref']:.1f}" if final else "") + f" ({wall:.0f} s)")
    return res


def zero_shot(a, log) -> dict:
    """The default model before any training, on the final runs' test items with their prompt format and
    decoding: the row every method's gain is measured from. One file, no seeds (greedy decoding is
    deterministic)."""
    path = RESULTS / "accuracy" / a.dataset / "final" / "zeroshot.json"

    def make():
        from greentrainer.config import TrainConfig, items_seed
        from greentrainer.run import run_eval
        cfg = TrainConfig()  # the final runs' defaults: model, prompt format, generation batch
        t0 = time.perf_counter()
        m = run_eval(cfg.model, a.dataset, a.test_items, 1, None, a.max_input_length, items_seed(0, 0),
                     cfg.eval_batch_size, cfg.device, log=lambda *x: None, progress=False,
                     prompt_format=cfg.prompt_format)
        preds = m["predictions"]
        res = {"stage": "final", "dataset": a.dataset, "method": "zeroshot", "options": {}, "eval": m["metrics"],
               "prompt_format": m["prompt_format"], "per_item_rougeL": per_item_rouge(preds),
               "test_ids": [p["id"] for p in preds], "predictions": preds[:3], "wall_s": time.perf_counter() - t0,
               "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
        write_json_atomic(path, res)
        log(f"  {path.name}: ROUGE-L {res['eval']['rougeL_first_ref']:.1f} ({res['wall_s']:.0f} s)")
        return res
    return claimed(path, log, make)


def per_item_rouge(preds: list[dict]) -> list[float]:
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [100 * scorer.score(p["references"][0], p["prediction"])["rougeL"].fmeasure for p in preds]


# ---------------------------------------------------------------- sweep

def sweep(a, log) -> dict:
    """Each method's winning setting: the lowest final validation loss over its lrs, then its knob."""
    winners = {}
    for label in SWEEP_ORDER if a.methods is None else [m for m in a.methods if m in SWEEP_ORDER]:
        method, opts = VARIANTS[label] if label in SWEEP_VARIANTS else (label, {})
        opts = {"rho": a.sweep_rho} if method == "greentrainer" and not opts else dict(opts)
        scores = {}
        lrs = list((SWEEP_VARIANTS.get(label) or SWEEP_LRS[method])[: 1 if a.quick else None])
        for lr in lrs:
            r = one_run(a, "sweep", method, opts, lr, 0, log)
            if "val_loss" in r:
                scores[(lr, json.dumps(opts))] = r["val_loss"][-1]
        if not scores:
            continue
        best_lr = min(scores, key=scores.get)[0]
        for _ in range(0 if a.quick else 2):  # the best at an edge of the grid: one more step beyond it (×3)
            if best_lr not in (min(lrs), max(lrs)):
                break
            lr = float(f"{best_lr / 3 if best_lr == min(lrs) else best_lr * 3:.0e}")
            lrs.append(lr)
            r = one_run(a, "sweep", method, opts, lr, 0, log)
            if "val_loss" in r:
                scores[(lr, json.dumps(opts))] = r["val_loss"][-1]
            best_lr = min(scores, key=scores.get)[0]
        for knob in SWEEP_KNOB.get(label, []) if not a.quick else []:
            r = one_run(a, "sweep", method, {**opts, **knob}, best_lr, 0, log)
            if "val_loss" in r:
                scores[(best_lr, json.dumps({**opts, **knob}))] = r["val_loss"][-1]
        (lr, o), loss = min(scores.items(), key=lambda kv: kv[1])
        winners[label] = {"lr": lr, "options": {k: v for k, v in json.loads(o).items() if k not in ("rho", *opts)},
                           "val_loss": loss,
                           **({"method": method, "variant": {k: v for k, v in opts.items() if k != "rho"}}
                              if label in SWEEP_VARIANTS else {}),  # a variant: the method and what it sets
                           "tried": [{"lr": k[0], "options": json.loads(k[1]), "val_loss": v} for k, v in scores.items()]}
    return winners


def write_sweep(a, winners: dict) -> None:
    """The sweep's table: these winners merged into the committed table's (a sweep over some ``--methods`` keeps
    the other methods' rows)."""
    path = RESULTS / f"accuracy_sweep_{a.dataset}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("steps") == a.steps and old.get("val_items") == a.val_items:
        winners = {**old["winners"], **winners}
    winners = {m: winners[m] for m in sorted(winners, key=lambda m: SWEEP_ORDER.index(m))}
    lines = [f"# Validation sweep: {a.dataset}", "",
             f"`python bench/accuracy.py --dataset {a.dataset} --stage sweep` — table written on {machine()}; "
             f"each run's own machine line is in its JSON (accuracy/{a.dataset}/sweep/)", "",
             f"Default model, prompt format auto (chat), {a.steps} optimizer steps of batch {a.batch_size} "
             f"({a.epochs} epochs), final validation loss on {a.val_items} items of the validation split "
             f"(the test split is not used). GreenTrainer at ρ 0.5. Bold: the winner, which is the method's "
             f"default in code (greentrainer.methods, `default_lr` and the config defaults).", "",
             "| method | lr | options | validation loss |", "|---|---|---|---|"]
    for method, w in winners.items():
        for t in sorted(w["tried"], key=lambda t: t["val_loss"]):
            own = {"rho", *(VARIANTS[method][1] if method in SWEEP_VARIANTS else ())}  # not knobs: the variant's
            win = t["lr"] == w["lr"] and {k: v for k, v in t["options"].items() if k not in own} == w["options"]
            b = "**" if win else ""
            lines.append(f"| {b}{method}{b} | {t['lr']:g} | {json.dumps(t['options']) if t['options'] else ''} | "
                         f"{b}{t['val_loss']:.4f}{b} |")
    write_text_atomic(RESULTS / f"accuracy_sweep_{a.dataset}.md", "\n".join(lines) + "\n")
    write_json_atomic(path, {"command": f"python bench/accuracy.py --dataset {a.dataset} --stage sweep",
                             "steps": a.steps, "val_items": a.val_items, "winners": winners})
    print("\n".join(lines))


# ---------------------------------------------------------------- ablations

def ablate(a, log) -> None:
    """GreenTrainer ρ 0.5 at its swept lr with one change each (importance metric, probe size, re-selection,
    warm-up, ρ schedule), against its defaults and full FT, on the validation split (issue 14, item 6)."""
    winners = json.loads((RESULTS / f"accuracy_sweep_{a.dataset}.json").read_text())["winners"]
    if "greentrainer" not in winners:
        log("ablations: GreenTrainer's sweep is not finished; nothing to compare against")
        return
    lr, base_opts = winners["greentrainer"]["lr"], {"rho": a.sweep_rho}
    rows = [("defaults", "", one_run(a, "sweep", "greentrainer", base_opts, lr, 0, log))]
    for label, change in ABLATIONS.items():
        if a.methods is None or label in a.methods:
            change_shown = ", ".join(f"{k}={shown(v)}" for k, v in change.items())
            run = one_run(a, "ablate", "greentrainer", {**base_opts, **change}, lr, 0, log)
            rows.append((label, change_shown, run))
    # the defaults again with other seeds (on the same validation items): how far the loss moves by chance; the
    # largest move is the bar a variant must clear
    again = {seed: one_run(a, "ablate", "greentrainer", base_opts, lr, seed, log) for seed in NOISE_SEEDS}
    full = winners.get("full")
    ref = one_run(a, "sweep", "full", full["options"], full["lr"], 0, log) if full else None
    base = rows[0][2]["val_loss"][-1]
    moves = [abs(r["val_loss"][-1] - base) for r in again.values() if "val_loss" in r]
    noise = max(moves) if len(moves) == len(again) else None
    lines = [f"# GreenTrainer ablations: {a.dataset}", "",
             f"`python bench/accuracy.py --dataset {a.dataset} --stage ablate` — {machine()}", "",
             f"GreenTrainer ρ {a.sweep_rho} at its validation-tuned lr {lr:g}, one change at a time; the sweep's "
             f"protocol ({a.steps} optimizer steps of batch {a.batch_size}, {a.epochs} epochs, validation loss on "
             f"{a.val_items} validation items, seed 0; the test split is not used). The defaults with seeds "
             f"{' and '.join(map(str, NOISE_SEEDS))} (the same validation items) show how far the loss moves by "
             "chance" + (f" (at most {noise:.4f})" if noise is not None else "") + "; a variant that is lower than "
             "the defaults by more than that wins and becomes the default.", "",
             "| variant | change | validation loss | vs defaults | wins | FLOPs % of full | train time s "
             "| selections (tensors@step) |",
             "|---|---|---|---|---|---|---|---|"]
    if ref is not None:
        lines.append(f"| full FT (lr {full['lr']:g}) | reference | {ref['val_loss'][-1]:.4f} | "
                     f"{ref['val_loss'][-1] - base:+.4f} | | 100.0 | {ref['train_time_s']:.0f} | |")
    wins = []
    seeds = [(f"defaults, seed {s}", f"seed {s}", r) for s, r in again.items()]
    for label, change_shown, r in rows[:1] + seeds + rows[1:]:
        if "val_loss" not in r:
            lines.append(f"| {label} | {change_shown} | {r.get('error', 'failed')} | | | | | |")
            continue
        delta = r["val_loss"][-1] - base
        won = any(r is v for _, _, v in rows[1:]) and noise is not None and -delta > noise  # a variant only
        wins += [label] if won else []
        lines.append(f"| {label} | {change_shown} | {r['val_loss'][-1]:.4f} | {delta:+.4f} | {'yes' if won else ''} | "
                     f"{100 * r['flops_fraction_of_full']:.1f} | {r['train_time_s']:.0f} | {selections_shown(r)} |")
    write_text_atomic(RESULTS / f"accuracy_ablations_{a.dataset}.md", "\n".join(lines) + "\n")
    write_json_atomic(RESULTS / f"accuracy_ablations_{a.dataset}.json",
                      {"lr": lr, "rho": a.sweep_rho, "defaults_val_loss": base, "seed_noise": noise, "wins": wins,
                       "full_ft_val_loss": ref["val_loss"][-1] if ref else None,
                       "rows": [{"label": l, "change": c, "val_loss": r.get("val_loss", [None])[-1],
                                 "flops_fraction_of_full": r.get("flops_fraction_of_full")} for l, c, r in rows]})
    print("\n".join(lines))


def selections_shown(r: dict) -> str:
    """A run's probed selections as "tensors@step" (runs written before selections were kept: blank)."""
    return ", ".join(f"{s['n_selected']}@{s['step']}" for s in r.get("selections", []) if s.get("kind") == "probe")


# ---------------------------------------------------------------- final runs and report

def setting(a, label: str, winners: dict) -> tuple[str, dict, float] | None:
    """A variant's whole setting: its method, the options its runs record and its lr, or None while it cannot be
    set (no sweep winner; ``rho`` naming a method whose seed-0 final run is not done). The final stage runs
    exactly this and the report pools exactly the runs recorded with it, so a variant at another lr or another
    method's FLOPs is never pooled with the method's own runs.

    Options: the variant's own, then its sweep winner's knobs (a variant over another method's tensors takes that
    method's lr and the knobs both share: LoRA's rank); ``"lr"`` in the variant overrides the winner's lr; ``rho``
    naming a method becomes the FLOPs fraction that method's seed-0 final run measured."""
    method, opts = VARIANTS[label]
    opts = dict(opts)
    source = label if label in SWEEP_VARIANTS else SETTING_FROM.get(label, method)
    if source not in winners:
        return None
    w = winners[source]
    knobs = w["options"] if source in (method, label) else {k: v for k, v in w["options"].items()
                                                    if k in ("lora_r", "lora_alpha")}
    lr = opts.pop("lr", w["lr"])
    if "fewer_steps" in opts:
        opts.update(fewer_steps(a, opts.pop("fewer_steps"), opts.pop("each_item_once", False)))
    if isinstance(opts.get("rho"), str):
        other = setting(a, opts["rho"], winners)
        path = None if other is None else final_path(a, other, 0)
        if path is None or not path.is_file() or "error" in (run := json.loads(path.read_text())):
            return None
        opts["rho"] = round(run["flops_fraction_of_full"], 3)
    return method, {**opts, **knobs}, lr


def fewer_steps(a, fraction: float, each_item_once: bool = False) -> dict:
    """Full FT for fewer steps at ``fraction`` of the FLOPs of a ``a.steps``-step run (GreenTrainer ρ's budget):
    the epochs and items of a run of at most round(fraction·steps) optimizer steps, whose linear schedule (the
    tool's: over epochs × steps per epoch) is over those steps, not the long run's schedule cut short.

    The long run makes ``a.epochs`` passes over n = steps·batch/epochs items (seed s: the same items and, epoch
    by epoch, the same shuffles). Where the target is a whole number of its epochs, the run is the long run's
    first epochs exactly: the same n items, the same seed, so the same batches in the same order (ρ 0.5 of
    256 steps in 2 epochs: 1 epoch of the 512 items, 128 steps). Otherwise the long run is cut at exactly that
    many steps with ``--max-steps`` (ρ 0.7: its 2 epochs over its 512 items, stopped at step 179: the same
    batches in the same order, the schedule over 179 steps).

    ``each_item_once``: the data-budget setting, no item seen twice: one epoch over round(fraction·steps)·batch
    items (ρ 0.7: 716 items, 179 steps; the 512 the long run sees and more)."""
    target = max(1, round(fraction * a.steps))
    if each_item_once:
        return {"epochs": 1, "max_train": target * a.batch_size}
    n = a.steps * a.batch_size // a.epochs
    per_epoch = -(-n // a.batch_size)
    if target % per_epoch == 0:
        return {"epochs": target // per_epoch, "max_train": n}
    return {"epochs": a.epochs, "max_train": n, "max_steps": target}


def run_steps(a, opts: dict) -> int:
    """The optimizer steps of a run with these options (its epochs and items, or the study's), as the tool counts
    them: epochs × ⌈items / batch⌉."""
    items = opts.get("max_train", a.steps * a.batch_size // a.epochs)
    steps = opts.get("epochs", a.epochs) * -(-items // a.batch_size)
    return min(steps, opts.get("max_steps") or steps)


def pace(a) -> tuple[float, float]:
    """Seconds per full FT optimizer step and per run besides training (loading, validation, test generation),
    the medians over this study's full FT runs on disk (of any length or data: a step costs the same; a run
    continued from a checkpoint counts its training time over every session, not its last session's wall
    time), else the defaults."""
    folder = final_dir(a)
    runs = [json.loads(p.read_text()) for p in folder.glob("full-*.json")] if folder.is_dir() else []
    runs = [r for r in runs if "wall_s" in r and "train_time_s" in r]
    steps = [r["train_time_s"] / (r.get("optimizer_steps") or r["steps"]) for r in runs]
    rest = [r["wall_s"] - r["train_time_s"] for r in runs if not r.get("resumed")]
    return (statistics.median(steps) if steps else PACE_S_PER_STEP,
            statistics.median(rest) if rest else PACE_OVERHEAD_S * a.test_items / 200)


def final(a, log) -> None:
    """Every variant's runs, seed 0 of all of them first (a table of every method exists early; later seeds
    narrow its intervals)."""
    winners, seeds = plan(a, log)
    if a.methods is None or "zeroshot" in a.methods:
        zero_shot(a, log)
    for seed in range(max(seeds.values())):
        # settings and pace are read again each pass: runs finished in the last one (this or another process's)
        # may set a variant's FLOPs and refine the pace
        run_pace = pace(a) if getattr(a, "until", None) else None
        for label, s, names in distinct_settings(a, winners):
            if seed >= seeds_wanted(a, names, seeds):
                continue
            if s is None:
                log(f"{label}: no sweep winner, or the method whose FLOPs it matches has no seed-0 run yet; skipped")
                continue
            method, opts, lr = s
            if run_pace and not (path := final_path(a, s, seed)).is_file():
                need = run_cost(a, s, *run_pace, done=checkpoint_step(path))
                if time.time() + need > a.until:  # cut off when the machine goes back, it would lose its work
                    log(f"{label} seed {seed}: about {need / 60:.0f} min, past --until "
                        f"{time.strftime('%H:%M', time.localtime(a.until))}; left for a later call")
                    continue
            one_run(a, "final", method, opts, lr, seed, log)


def distinct_settings(a, winners: dict) -> list[tuple[str, tuple | None, list[str]]]:
    """Each variant with its setting (``setting``) and the variants that share it, once per setting: a variant
    whose setting is an earlier one's (an lr override equal to the sweep's lr) is that variant's runs, so the final
    stage, its estimate and the report train, count and show them once. Variants with no setting yet stay."""
    out = []
    for label in VARIANTS:
        s = setting(a, label, winners)
        first = next((o for o in out if s is not None and o[1] == s), None)
        if first is None:
            out.append((label, s, [label]))
        else:
            first[2].append(label)
    return out


def seeds_wanted(a, names: list[str], seeds: dict) -> int:
    """Seeds of a setting shared by these variants: the most any of them that --methods names asks for (all of
    them when it names none); 0 when it names none of them."""
    return max((seeds[n] for n in names if a.methods is None or n in a.methods), default=0)


def plan(a, log) -> tuple[dict, dict]:
    """The final stage's sweep winners and seeds per variant, after saying what is left to train and its cost
    (``--stage plan`` stops there: nothing trains, nothing is written)."""
    winners = json.loads((RESULTS / f"accuracy_sweep_{a.sweep_from}.json").read_text())["winners"]
    seeds = {label: FINAL_SEEDS.get(label, 1) if a.seeds is None else a.seeds for label in VARIANTS}
    estimate(a, winners, seeds, log)
    return winners, seeds


def estimate(a, winners: dict, seeds: dict, log) -> float:
    """Say, before anything trains, how many runs are left and about how long they take on one core: each at
    full FT's median measured step time, scaled by what the setting's steps measured against it
    (``step_share``), plus its loading, validation and test generation. Returns the seconds."""
    per_step, overhead = pace(a)
    todo, total, partly = {}, 0.0, 0
    for label, s, names in distinct_settings(a, winners):
        for seed in range(seeds_wanted(a, names, seeds)):
            path = final_path(a, s, seed) if s is not None else None
            if path is not None and path.is_file():
                continue
            todo[label] = todo.get(label, 0) + 1
            done = checkpoint_step(path) if path else 0
            partly += done > 0
            total += run_cost(a, s, per_step, overhead, done=done)
    runs = sum(todo.values())
    log(f"final stage: {runs} run(s) to train" + (" (" + ", ".join(f"{k} ×{v}" for k, v in todo.items()) + ")"
                                                   if todo else "")
        + (f", {partly} of them partly done (from a checkpoint, or running now)" if partly else "")
        + (f", about {total / 60:.0f} min ({total / 3600:.1f} h) on one core: {per_step:.1f} s per optimizer "
           f"step (the median full FT step measured here; a setting with a finished seed at its own measured "
           f"pace) + {overhead / 60:.0f} min per run to load, validate and test on {a.test_items} items"
           if runs else ""))
    return total


def run_cost(a, s: tuple | None, per_step: float, overhead: float, done: int = 0) -> float:
    """About how many seconds one run of this setting takes on one core: the steps it still has to train (all of
    them, or those after its checkpoint's step ``done``) at full FT's pace times what one of its steps costs
    against that pace (``step_share``), plus the per-run rest."""
    if s is None:  # a variant not set yet: the study's steps at full FT's pace
        return max(0, a.steps - done) * per_step + overhead
    trained = trained_steps(s[1], run_steps(a, s[1]))
    return max(0, trained - done) * per_step * step_share(a, s, per_step) + overhead


def trained_steps(opts: dict, n: int) -> int:
    """The steps of an ``n``-step run that train: the first ρ of them under the ``fewer`` policy, else all."""
    return round(opts["rho"] * n) if opts.get("step_policy") == "fewer" else n


def step_share(a, s: tuple, per_step: float) -> float:
    """What one trained step of this setting costs against full FT's pace ``per_step``: the median its finished
    final runs measured (any seed; training seconds per trained step, selection, probes and validation
    included), else 1, an upper bound until a first seed has measured it (a partial step costs more time than
    its FLOPs share)."""
    shares = []
    for seed in range(max([*FINAL_SEEDS.values(), a.seeds or 0])):
        if (path := final_path(a, s, seed)).is_file():
            run = json.loads(path.read_text())
            if run.get("train_time_s") and (steps := run.get("optimizer_steps") or run.get("steps")):
                shares.append(run["train_time_s"] / trained_steps(s[1], steps) / per_step)
    return statistics.median(shares) if shares else 1.0


def work_dir(path: Path) -> Path:
    """The run folder of the run whose result file is ``path``, while it trains (its checkpoints are there)."""
    return path.parent / ".work" / path.stem


def checkpoint_step(path: Path) -> int:
    """The optimizer step a stopped run's checkpoint reached (0 without one): where its next call continues."""
    for name in ("checkpoint", "checkpoint.old"):  # the folders _train_one continues from
        folder = work_dir(path) / name
        if (folder / "state.pt").is_file() and (folder / "meta.json").is_file():
            return int(json.loads((folder / "meta.json").read_text()).get("global_step", 0))
    return 0


def until(text: str) -> float:
    """--until HH:MM as seconds since the epoch: the next time the clock reads it (today, else tomorrow)."""
    try:
        h, m = (int(x) for x in text.split(":"))
        if not (0 <= h < 24 and 0 <= m < 60):
            raise ValueError
        now = time.localtime()
        t = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, h, m, 0, 0, 0, -1))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"a clock time HH:MM, not {text!r}") from None
    return t if t > time.time() else t + 86400


def bootstrap_ci(runs: list[list[float]], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean ROUGE-L over test items and seeds, and a 95% interval from resampling the items (seeds paired)."""
    import numpy as np
    x = np.array(runs)  # seeds × items
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[1], size=(n, x.shape[1]))
    means = x[:, idx].mean(axis=(0, 2))
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Mean of x − y over paired test items, and a 95% interval from resampling the items."""
    return bootstrap_ci([[a - b for a, b in zip(x, y)]])


def check_same_items(runs: list[dict]) -> None:
    """Seeds are pooled and methods paired item by item: every run must be scored on the same test items.
    Runs keep their items' ids; those written before they did are seed 0's, whose items the later runs share
    (``eval_seed=0``)."""
    done = [r for r in runs if "error" not in r]
    known = {tuple(r["test_ids"]) for r in done if "test_ids" in r}
    odd = [f"{r['method']} seed {r['seed']}" for r in done if "test_ids" not in r and r["seed"] != 0]
    if len(known) > 1 or odd:
        raise SystemExit("accuracy report: the final runs were not all scored on the same test items ("
                         + (", ".join(odd) or "their test_ids differ") + "), so they cannot be pooled or paired")


def report(a) -> list[dict]:
    folder = final_dir(a)
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    zs_path = RESULTS / "accuracy" / a.dataset / "final" / "zeroshot.json"  # every study's test items are the same
    if folder.name != "final" and zs_path.is_file():
        runs.append(json.loads(zs_path.read_text()))
    rows, refused, items = [], [], {}
    check_same_items(runs)
    zs = next((r for r in runs if r["method"] == "zeroshot"), None)
    runs = [r for r in runs if r["method"] != "zeroshot"]
    winners = json.loads((RESULTS / f"accuracy_sweep_{a.sweep_from}.json").read_text())["winners"]
    pooled, full_flops = {}, {}  # each variant's runs; full FT's measured FLOPs by seed
    for label, s, _ in distinct_settings(a, winners):
        if s is None:
            continue
        method, opts, lr = s
        mine = [r for r in runs if (r["method"], r["options"], r["lr"], r["steps"]) == (method, opts, lr, a.steps)]
        refused += [f"{LABELS[label]}: {r['error']}" for r in mine[:1] if "error" in r]
        mine = [r for r in mine if "error" not in r]
        if not mine:
            continue
        pooled[label] = mine
        if label == "full":
            full_flops = {r["seed"]: r["flops_total"] for r in mine if "flops_total" in r}
        mean, lo, hi = bootstrap_ci([r["per_item_rougeL"] for r in mine])
        fr = [r["flops_fraction_of_full"] for r in mine]
        if "fewer_steps" in VARIANTS[label][1]:  # a full FT run's own fraction is 1: the fraction of the
            fr = [fewer_fraction(a, r, full_flops) for r in mine]  # long full FT runs' FLOPs instead
        items[label] = [sum(x) / len(x) for x in zip(*(r["per_item_rougeL"] for r in mine))]  # mean over seeds
        rows.append({"variant": label, "label": LABELS[label], "seeds": len(mine), "lr": mine[0]["lr"],
                     "rougeL": mean, "ci_low": lo, "ci_high": hi, "rouge1": sum(r["eval"]["rouge1_first_ref"] for r in mine) / len(mine),
                     "flops_fraction": sum(fr) / len(fr), "flops_min": min(fr), "flops_max": max(fr),
                     "val_loss": sum(r["val_loss"][-1] for r in mine) / len(mine),
                     "val_min": min(r["val_loss"][-1] for r in mine), "val_max": max(r["val_loss"][-1] for r in mine),
                     "train_time_s": sum(r["train_time_s"] for r in mine) / len(mine),
                     "selector_ms": 1000 * max((x for r in mine for x in r.get("selector_time_s", [])), default=0.0),
                     "test_items": len(mine[0]["per_item_rougeL"]), "steps": mine[0]["steps"],
                     "optimizer_steps": mine[0].get("optimizer_steps") or run_steps(a, mine[0]["options"])})
    if not rows:
        return rows
    if zs is not None:  # first: what every method's gain is measured from
        mean, lo, hi = bootstrap_ci([zs["per_item_rougeL"]])
        items["zeroshot"] = zs["per_item_rougeL"]
        rows.insert(0, {"variant": "zeroshot", "label": LABELS["zeroshot"], "seeds": 0, "rougeL": mean, "ci_low": lo,
                        "ci_high": hi, "rouge1": zs["eval"]["rouge1_first_ref"], "flops_fraction": 0.0,
                        "test_items": len(zs["per_item_rougeL"])})
    cols = ["method", "seeds", "lr", "ROUGE-L (95% CI)", "vs full FT, paired (95% CI)", "ROUGE-1", "FLOPs % of full",
            "val loss", "train time s", "selector ms (max)"]
    study = f" --steps {a.steps} --epochs {a.epochs}" if long_study(a) else ""
    lines = [f"# Accuracy: {a.dataset}", "", f"`python bench/accuracy.py --dataset {a.dataset} --stage final{study}` — "
             f"{machine()}", "",
             f"Default model, chat prompt format, {a.steps} optimizer steps of batch {a.batch_size}, each "
             f"method at its validation-tuned setting (accuracy_sweep_{a.sweep_from}.md); {rows[0]['test_items']} test "
             "items, greedy decoding, ROUGE against the first reference. The interval resamples the test items "
             "(2000 bootstrap draws, seeds paired); \"vs full FT\" is the ROUGE-L difference to full FT on the same "
             "items (below). FLOPs are measured, not modelled. Train time is not a timing comparison: each run had one "
             "core while another run used the other, and some continued from a checkpoint in a later session "
             "(time_vs_flops.md compares step times).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vs = ""
        if r["variant"] != "full" and "full" in items:
            r["vs_full"], r["vs_full_low"], r["vs_full_high"] = compare(items[r["variant"]], items["full"])
            vs = f"{r['vs_full']:+.1f} ({r['vs_full_low']:+.1f} to {r['vs_full_high']:+.1f})"
        if r["variant"] == "zeroshot":  # no training: no seeds, lr, loss or time
            lines.append(f"| {r['label']} |  |  | {r['rougeL']:.1f} ({r['ci_low']:.1f}–{r['ci_high']:.1f}) | {vs} | "
                         f"{r['rouge1']:.1f} | 0 |  |  |  |")
            continue
        fl = f"{100 * r['flops_fraction']:.1f}" + (f" ({100 * r['flops_min']:.1f}–{100 * r['flops_max']:.1f})"
                                                      if r["seeds"] > 1 else "")
        sel = f"{r['selector_ms']:.1f}" if r["selector_ms"] else ""
        lines.append(f"| {r['label']} | {r['seeds']} | {r['lr']:g} | {r['rougeL']:.1f} ({r['ci_low']:.1f}–"
                     f"{r['ci_high']:.1f}) | {vs} | {r['rouge1']:.1f} | {fl} | {r['val_loss']:.4f} | "
                     f"{r['train_time_s']:.0f} | {sel} |")
    full = [r["val_loss"] for r in pooled.get("full", []) if len(r["val_loss"]) > 1]  # not the fewer-steps runs
    if full:  # the issue's rule: more steps while full FT's validation loss still falls
        curve = [sum(v) / len(v) for v in zip(*full)]
        lines += ["", f"Full FT's validation loss at the end of each of its {len(curve)} epochs (mean over seeds): "
                  + " → ".join(f"{v:.4f}" for v in curve) + f"; the last epoch changed it by "
                  f"{100 * (curve[-1] - curve[-2]) / curve[-2]:+.2f} %."]
    fewer = [r for r in rows if "fewer_steps" in VARIANTS.get(r["variant"], ("", {}))[1]]
    if fewer:
        lines += ["", "Full FT for fewer steps (issue 34): full FT at its swept lr "
                  f"({fewer[0]['lr']:g}, tuned at the sweep's 64 steps, shorter than these runs too) stopped at "
                  "GreenTrainer ρ's FLOPs, with a linear schedule over its own steps (not the long run's schedule "
                  "cut short); its FLOPs % is of the long full FT runs' measured FLOPs (the same seed's). "
                  + "; ".join(f"{r['label']}: {fewer_shown(a, r)}" for r in fewer) + "."]
    lines += ["", "Not run, refused by the tool as infeasible:", ""] + [f"- {x}" for x in refused] if refused else []
    seeds = {r["variant"]: r["seeds"] for r in rows}
    pairs = [compare(items[v], items[w]) + (v, w, target, why, val_loss_difference(pooled[v], pooled[w]))
             for v, w, target, why in COMPARISONS if v in items and w in items]
    if pairs:
        lines += ["", "## Paired differences", "",
                  "ROUGE-L of the first method minus the second's on the same test items (each item's mean over "
                  "the seeds run), with a 95% interval from resampling the items; a target is met when the whole "
                  "interval is at or above it, missed when the whole interval is below it (two decimals, so that a "
                  "bound just inside a target does not print as on it). The interval covers the choice of test items, "
                  "not the spread between seeds. The validation loss difference (lower is better: negative favours "
                  "the first method) is of the final validation loss on the same validation items, mean over the "
                  "seeds, and in brackets the smallest and largest difference between runs of the same seed (the "
                  "seeds both ran; where one ran more, the mean also counts its other seeds and can lie outside "
                  "them); ROUGE-L and validation loss need not agree.", "",
                  "| comparison | seeds | ROUGE-L difference (95% CI) | target | met | val loss difference | why |",
                  "|---|---|---|---|---|---|---|"]
        for d, lo, hi, v, w, target, why, vl in pairs:
            met = "" if target is None else "yes" if lo >= target else "no" if hi < target else "not resolved"
            vl_shown = f"{vl[0]:+.4f}" + (f" ({vl[1]:+.4f} to {vl[2]:+.4f})" if vl[1] is not None else "")
            lines.append(f"| {LABELS[v]} − {LABELS[w]} | {seeds[v]}, {seeds[w]} | {d:+.2f} ({lo:+.2f} to {hi:+.2f}) "
                         f"| {'' if target is None else f'≥ {target:+.1f}'} | {met} | {vl_shown} | {why} |")
    curves = mean_curves(pooled, full_flops)
    if curves:
        lines += curve_lines(curves, rows)
    write_text_atomic(RESULTS / f"{report_name(a)}.md", "\n".join(lines) + "\n")
    write_json_atomic(RESULTS / f"{report_name(a)}.json", {"rows": rows, "paired": [
        {"variant": v, "against": w, "difference": d, "ci_low": lo, "ci_high": hi, "target": target,
         "val_loss_difference": vl[0], "val_loss_difference_seed_range": vl[1:]}
        for d, lo, hi, v, w, target, _, vl in pairs], "curves": curves})
    if curves:
        plot_curves(curves, rows, RESULTS / f"{report_name(a)}_curves.png", a.dataset)
    plot(rows, RESULTS / f"{report_name(a)}.png", a.dataset)
    if any(r["variant"] in FAMILIES["Full FT, fewer steps"] for r in rows):
        plot_fewer(rows, RESULTS / f"{report_name(a)}_fewer.png", a.dataset)
    if any(r["variant"] in FAMILIES["GT over LoRA"] + FAMILIES["GT over blocks"] for r in rows):
        plot(rows, RESULTS / f"{report_name(a)}_over.png", a.dataset, FAMILIES)
    print("\n".join(lines))
    return rows


def mean_curves(pooled: dict, full_flops: dict) -> dict:
    """Each variant's validation loss against cumulative measured FLOPs (--eval-steps), the mean over its seeds
    at each evaluated step: {variant: [[step, val loss, FLOPs % of full FT's whole run]]}. The FLOPs are what the
    run spent up to that step, probes included, over the long full FT run's total (the same seed's, else the mean
    over seeds); without a full FT run yet, over the run's own full FT reference at its end."""
    out = {}
    for label, runs in pooled.items():
        runs = [r for r in runs if r.get("val_curve")]
        if not runs or len({len(r["val_curve"]) for r in runs}) != 1:
            continue
        pts = []
        for i in range(len(runs[0]["val_curve"])):
            denominators = [full_flops.get(r["seed"]) or (sum(full_flops.values()) / len(full_flops) if full_flops
                                                          else r["val_curve"][-1][3]) for r in runs]
            pts.append([runs[0]["val_curve"][i][0], sum(r["val_curve"][i][1] for r in runs) / len(runs),
                        100 * sum(r["val_curve"][i][2] / d for r, d in zip(runs, denominators)) / len(runs)])
        out[label] = pts
    return out


def at_flops(curve: list, x: float) -> float | None:
    """A curve's validation loss at x % of full FT's FLOPs, linear between its points (None outside them)."""
    for (_, l0, x0), (_, l1, x1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return l0 if x1 == x0 else l0 + (l1 - l0) * (x - x0) / (x1 - x0)
    return None


def curve_lines(curves: dict, rows: list) -> list[str]:
    """The per-FLOP section: each curve's points, full FT's own curve at each variant's end (what full FT had
    reached with the same FLOPs, mid-schedule), and whether full FT's loss still fell over its last stretch."""
    lines = ["", "## Validation loss against measured FLOPs", "",
             "Each variant's validation loss at every evaluated step (mean over seeds) and the FLOPs it had spent by "
             "then, probes included, as % of the long full FT run's whole FLOPs; the plot "
             "(_curves.png) draws them. \"Full FT's curve there\": the long full FT run's own validation loss at the "
             "same FLOPs (between its points, linearly), mid-schedule; lower is better.", "",
             "| method | seeds | points (step: val loss @ FLOPs %) | end: val loss @ FLOPs % | full FT's curve there |",
             "|---|---|---|---|---|"]
    seeds = {r["variant"]: r["seeds"] for r in rows}
    for label, pts in curves.items():
        there = at_flops(curves["full"], pts[-1][2]) if "full" in curves and label != "full" else None
        lines.append(f"| {LABELS[label]} | {seeds.get(label, '')} | "
                     + ", ".join(f"{s}: {v:.3f} @ {x:.0f}" for s, v, x in pts)
                     + f" | {pts[-1][1]:.4f} @ {pts[-1][2]:.1f} | {'' if there is None else f'{there:.4f}'} |")
    if "full" in curves and len(curves["full"]) > 2:
        (s0, l0, _), (s1, l1, _) = curves["full"][-2:]
        lines += ["", f"Full FT's validation loss from step {s0} to its last step {s1}: {l0:.4f} → {l1:.4f} "
                  f"({100 * (l1 - l0) / l0:+.2f} %): "
                  + ("still falling at the run's end." if l1 < l0 else "no longer falling at the run's end.")]
    return lines


def plot_curves(curves: dict, rows: list, path: Path, dataset: str) -> None:
    """Validation loss against measured FLOPs, one line per variant (mean over seeds), its test ROUGE-L in the
    legend: accuracy per FLOP at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by = {r["variant"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, pts in curves.items():
        r = by.get(label, {})
        seeds = f"{r.get('seeds')} seed" + ("s" if r.get("seeds") != 1 else "")
        name = f"{LABELS[label]} (ROUGE-L {r['rougeL']:.1f}, {seeds})" if "rougeL" in r else LABELS[label]
        ax.plot([x for _, _, x in pts], [v for _, v, _ in pts], marker="o", ms=3,
                ls="--" if label.startswith("full") else "-", label=name)
    ax.set_xlabel("measured training FLOPs so far (probes included), % of full fine-tuning's whole run")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(f"{dataset}: validation loss per FLOP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fewer_fraction(a, run: dict, full_flops: dict) -> float:
    """A full FT for fewer steps run's FLOPs as a fraction of the long full FT run's: the same seed's measured
    FLOPs, else their mean over seeds, else (no long run done yet) its steps over the study's."""
    long = full_flops.get(run["seed"]) or (sum(full_flops.values()) / len(full_flops) if full_flops else None)
    if long and "flops_total" in run:
        return run["flops_total"] / long
    return (run.get("optimizer_steps") or run_steps(a, run["options"])) / a.steps


def fewer_shown(a, row: dict) -> str:
    """What a full FT for fewer steps row trained, in words."""
    o = VARIANTS[row["variant"]][1]
    s = fewer_steps(a, o["fewer_steps"], o.get("each_item_once", False))
    n_long = a.steps * a.batch_size // a.epochs
    epochs = "1 epoch" if s["epochs"] == 1 else f"{s['epochs']} epochs"
    what = f"{row['optimizer_steps']} optimizer steps, {epochs} over {s['max_train']} items"
    if o.get("each_item_once"):
        return what + " (each seen once; the long run's items and more)"
    if "max_steps" in s:
        return what + f": the long run's first {s['max_steps']} steps exactly (--max-steps; its items, its order)"
    if s["max_train"] == n_long:
        first = "first epoch" if s["epochs"] == 1 else f"first {s['epochs']} epochs"
        return what + f": the long run's {first} exactly (its items, its order)"
    return what


def val_loss_difference(x: list[dict], y: list[dict]) -> tuple[float, float | None, float | None]:
    """Final validation loss of runs x minus runs y: the difference of the means over seeds, and the smallest and
    largest difference between runs of the same seed (None with fewer than two seeds in common)."""
    mean = lambda rs: sum(r["val_loss"][-1] for r in rs) / len(rs)
    by = {r["seed"]: r["val_loss"][-1] for r in y}
    same = [r["val_loss"][-1] - by[r["seed"]] for r in x if r["seed"] in by]
    return (mean(x) - mean(y),) + ((min(same), max(same)) if len(same) > 1 else (None, None))


def plot(rows, path, dataset, families: dict | None = None) -> None:
    """ROUGE-L against measured FLOPs with both intervals and, below, each row's paired difference to full FT:
    every row and the Pareto front, or (``families``) those variants only, each family in one colour joined by a
    line in FLOPs order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    zs = next((r for r in rows if r["variant"] == "zeroshot"), None)  # a line, not a point at 0 FLOPs
    rows = [r for r in rows if r["variant"] != "zeroshot"]
    if families:
        by = {r["variant"]: r for r in rows}
        groups = [(name, sorted((by[v] for v in vs if v in by), key=lambda r: r["flops_fraction"]))
                  for name, vs in families.items()]
        title = "budgeted selection over tensors, LoRA adapters and SMT blocks; full FT for fewer steps"
    else:  # every row a point of its own, but the rows of a JOINED family one line (full FT for fewer steps)
        joined = {v: name for name, vs in JOINED.items() for v in vs}
        by = {r["variant"]: r for r in rows}
        groups, seen = [], set()
        for r in rows:
            name = joined.get(r["variant"])
            if name is None:
                groups.append((None, [r]))
            elif name not in seen:
                seen.add(name)
                groups.append((name, sorted((by[v] for v in JOINED[name] if v in by),
                                            key=lambda r: r["flops_fraction"])))
        title = "accuracy against compute"
    paired = [r for _, g in groups for r in g if "vs_full" in r]
    if paired:  # the intervals above overlap; the paired differences below are what tells methods apart
        fig, (ax, dx) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, height_ratios=(3, 2))
    else:
        fig, ax = plt.subplots(figsize=(9, 4.8))
    markers = "osD^vP*Xh<>p"
    style = {}
    for i, (name, g) in enumerate(x for x in groups if x[1]):
        xs, ys = [100 * r["flops_fraction"] for r in g], [r["rougeL"] for r in g]
        marker, colour = markers[i % len(markers)], plt.cm.tab10(i % 10)
        style.update({r["variant"]: (marker, colour) for r in g})  # the lower panel draws each row alike
        ax.errorbar(xs, ys, yerr=[[y - r["ci_low"] for y, r in zip(ys, g)], [r["ci_high"] - y for y, r in zip(ys, g)]],
                    xerr=[[x - 100 * r["flops_min"] for x, r in zip(xs, g)],
                          [100 * r["flops_max"] - x for x, r in zip(xs, g)]],
                    fmt=marker + ("-" if name else ""), capsize=3, alpha=0.85, color=colour,
                    label=name or g[0]["label"])
    for r in paired:
        marker, colour = style[r["variant"]]
        dx.errorbar([100 * r["flops_fraction"]], [r["vs_full"]], fmt=marker, capsize=3, alpha=0.85, color=colour,
                    yerr=[[r["vs_full"] - r["vs_full_low"]], [r["vs_full_high"] - r["vs_full"]]])
    for _, g in groups:  # each family joined below as above (a group of one row draws no line)
        g = [r for r in g if "vs_full" in r]
        if len(g) > 1:
            dx.plot([100 * r["flops_fraction"] for r in g], [r["vs_full"] for r in g], "-", alpha=0.85,
                    color=style[g[0]["variant"]][1])
    if zs is not None and not families:  # the families' close differences would be squashed by it
        ax.axhline(zs["rougeL"], color="grey", lw=1, ls=":", label="zero-shot (untrained)")
        ax.axhspan(zs["ci_low"], zs["ci_high"], color="grey", alpha=0.1, lw=0)
    if not families:
        front, best = [], -math.inf
        for x, y in sorted((100 * r["flops_fraction"], r["rougeL"]) for r in rows):
            if y > best:
                front.append((x, y))
                best = y
        ax.plot(*zip(*front), "--", color="grey", lw=1, label="Pareto front")
    if paired:
        dx.axhline(0, color="grey", lw=1)
        dx.axhline(-1, color="grey", lw=1, ls=":")
        dx.text(dx.get_xlim()[0], -1, " −1: the paper's bound for ρ 0.5", va="bottom", fontsize=7, color="grey")
        dx.set_ylabel("ROUGE-L minus full FT's\n(same items, 95% CI)")
        dx.set_xlabel("measured training FLOPs, % of full fine-tuning")
    else:
        ax.set_xlabel("measured training FLOPs, % of full fine-tuning")
    ax.set_ylabel("ROUGE-L (test, 95% CI)")
    ax.set_title(f"{dataset}: {title}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the plot: points at equal FLOPs
    fig.tight_layout()                                                  # would hide labels written next to them
    fig.savefig(path, dpi=120)


def plot_fewer(rows, path, dataset) -> None:
    """Issue 34's question: validation loss (the lower the better; the bar spans the seeds) and test ROUGE-L
    (95% interval) against measured FLOPs, for full FT, full FT for fewer steps, the tool's default and the
    paper's selection at every ρ, each family one colour joined in FLOPs order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by = {r["variant"]: r for r in rows}
    fig, (vx, rx) = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for i, (name, vs) in enumerate(FEWER_FAMILIES.items()):
        g = sorted((by[v] for v in vs if v in by), key=lambda r: r["flops_fraction"])
        if not g:
            continue
        xs = [100 * r["flops_fraction"] for r in g]
        kw = dict(fmt="osD^vP"[i % 6] + "-", capsize=3, alpha=0.85, color=plt.cm.tab10(i % 10),
                  label=f"{name}; seeds {'/'.join(str(r['seeds']) for r in g)}")
        vx.errorbar(xs, [r["val_loss"] for r in g], yerr=[[r["val_loss"] - r["val_min"] for r in g],
                                                          [r["val_max"] - r["val_loss"] for r in g]], **kw)
        kw.pop("label")
        rx.errorbar(xs, [r["rougeL"] for r in g], yerr=[[r["rougeL"] - r["ci_low"] for r in g],
                                                        [r["ci_high"] - r["rougeL"] for r in g]], **kw)
    vx.set_ylabel("validation loss at the end (lower is better)")
    rx.set_ylabel("ROUGE-L (test, 95% CI)")
    for ax in (vx, rx):
        ax.set_xlabel("measured training FLOPs, % of full fine-tuning")
    fig.suptitle(f"{dataset}: choosing tensors against training every tensor for fewer steps")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="scitldr")
    ap.add_argument("--stage", choices=("sweep", "ablate", "final", "report", "plan"), required=True,
                    help="plan: what the final stage has left to train and its cost on one core, nothing run")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (sweep 64, final 256)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-input-length", type=int, default=320)
    ap.add_argument("--val-items", type=int, default=64)
    ap.add_argument("--test-items", type=int, default=200)
    ap.add_argument("--methods", default=None, help="comma-separated: methods to sweep, or variants (full, gt0.5, "
                                                     "..., zeroshot) to run")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 8 steps, 4 items, full and GreenTrainer "
                                                          "(and zero-shot)")
    ap.add_argument("--sweep-rho", type=float, default=0.5, help="GreenTrainer's ρ in the sweep")
    ap.add_argument("--sweep-from", default="scitldr", help="whose validation sweep gives the settings (the "
                                                              "defaults in code come from SciTLDR's)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method (default: 3 for the main ones, 1 else)")
    ap.add_argument("--eval-steps", type=int, default=None,
                    help="final runs: the validation loss (on --val-items items) every N steps, with the FLOPs spent "
                         "by then: the report adds loss against FLOPs (default: steps/8 for a study of another "
                         "length than 256 steps in 2 epochs, none for that table, whose runs had none)")
    ap.add_argument("--until", type=until, default=None, metavar="HH:MM",
                    help="final stage: start only the runs that should end by then, at this study's measured pace (a "
                         "run cut off when a session or lease ends loses its work since its last checkpoint; a run "
                         "continuing from one counts only its steps left), and leave the rest for a later call")
    a = ap.parse_args()
    if a.quick:  # 8 steps in one epoch: GreenTrainer's probe must be paid by the steps it governs
        a.steps, a.epochs, a.val_items, a.test_items, a.max_input_length, a.seeds = 8, 1, 4, 4, 160, 1
        a.sweep_rho = 0.7
        a.eval_steps = 4  # the per-FLOP curves too
        a.methods = a.methods or ("full,greentrainer" if a.stage == "sweep" else "full,gt0.7,zeroshot")
    a.methods = a.methods.split(",") if a.methods else None
    a.steps = a.steps or (64 if a.stage in ("sweep", "ablate") else 256)
    if a.eval_steps is None and long_study(a):
        a.eval_steps = max(1, a.steps // 8)

    def log(msg):
        print(msg, flush=True)
    if a.stage == "sweep":
        write_sweep(a, sweep(a, log))
    elif a.stage == "ablate":
        ablate(a, log)
    elif a.stage == "final":
        final(a, log)
        report(a)
    elif a.stage == "plan":
        plan(a, log)
    else:
        report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
