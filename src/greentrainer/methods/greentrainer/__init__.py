"""GreenTrainer (ICLR 2024): adaptive backpropagation under a FLOPs budget.

    config.py      GreenTrainerConfig: every knob, validated before a model loads
    method.py      the method the training loop drives
    blocks.py      the l×l blocks of the attention projections as candidates (``over="blocks"``)
"""
from .method import *  # noqa: F401,F403
from .method import (GreenTrainerConfig, GreenTrainerMethod, budget_for, select_step)  # noqa: F401
