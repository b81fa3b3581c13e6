"""GreenTrainer (ICLR 2024): adaptive backpropagation under a FLOPs budget.

    config.py       GreenTrainerConfig: every knob, validated before a model loads
    budget.py       what ρ buys per step, the probe's cost, the FLOPs ledger, the warm-up; both tolerances
    candidates.py   what a selection picks from: Tensors (the paper), LoraAdapters, Blocks (one class each)
    controller.py   every decision during a run, driven by the loop's method and by the Trainer callback
    method.py       the plug-in the training loop drives
    artifacts.py    selections.json and the selection heatmap
    blocks.py       SMT's l×l blocks as candidates (``over="blocks"``)
"""
from .budget import (BUDGET_TOLERANCE, SAFETY_MARGIN, FlopsLedger, budget_for, can_pay_probe, check_budget,
                     deepest_reachable, probe_cost, probe_within_budget, smallest_feasible_rho, steps_governed,
                     warmup_steps, within_budget)
from .candidates import Blocks, LoraAdapters, Tensors, lora_profile, select_step
from .config import OVER, GreenTrainerConfig, load_rho_schedule
from .controller import GreenTrainerController, in_warmup, warmup_record
from .method import GreenTrainerMethod

__all__ = ["BUDGET_TOLERANCE", "SAFETY_MARGIN", "FlopsLedger", "budget_for", "can_pay_probe", "check_budget",
           "deepest_reachable", "probe_cost", "probe_within_budget", "smallest_feasible_rho", "steps_governed",
           "warmup_steps", "within_budget", "Blocks", "LoraAdapters", "Tensors", "lora_profile", "select_step", "OVER",
           "GreenTrainerConfig", "load_rho_schedule", "GreenTrainerController", "in_warmup", "warmup_record",
           "GreenTrainerMethod"]
