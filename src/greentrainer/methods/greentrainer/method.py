"""GreenTrainer as a plug-in of the training loop: a thin driver of :class:`.controller.GreenTrainerController`,
whose host is the loop's :class:`~greentrainer.engine.context.TrainContext`."""
from __future__ import annotations

from ..base import Method
from ..registry import register_method
from .artifacts import write_artifacts
from .budget import within_budget
from .config import GreenTrainerConfig
from .controller import GreenTrainerController


@register_method("greentrainer", config_cls=GreenTrainerConfig)
class GreenTrainerMethod(Method):
    """GreenTrainer: the most important tensors whose backward fits ρ of full FT's FLOPs train.

    Optimizer state follows the selection: the optimizer is built once over every tensor, but after each
    selection the AdamW state (moments and step count) of each tensor that is no longer selected leaves the
    optimizer, and its ``.grad`` is freed, so between selections the training device holds state only for
    the tensors that train (a tensor never selected never gets any). ``deselected_state``:

    * ``"drop"`` (default): the state is discarded; a re-selected tensor starts afresh like a newly
      selected one (zero moments, step 0: the bias correction of its first step is that of a fresh
      AdamW, which is exact for fresh moments). The probe scores deselected tensors with the same fresh
      moments, i.e. the step they would really take.
    * ``"cpu"``: the state moves to host memory and comes back when the tensor is selected again, so
      training is exactly that of ``"keep"`` (bit for bit) without the device holding it in between;
      before each probe the stored states of the tensors the probe can reach come back so that it scores
      them with their own moments, and those not selected leave again after it. (On a CPU-only run host
      memory *is* the training memory: it saves nothing there.)
    * ``"keep"``: the former behaviour, every tensor's state stays in the optimizer once created (for
      comparisons).

    What a re-selected tensor starts from, measured (``python bench/memory.py --validation``,
    bench/results/memory_validation.md): SmolLM2-135M, SciTLDR 32 train / 24 validation items, 3 epochs with
    a selection at each, lr 3e-4, ρ 0.6; 41 tensors left at the second selection and 39 of them came back at
    the third. Validation loss after epoch 3: "drop" 2.8322, "cpu" (= "keep") 2.8297; training loss of that
    epoch 1.502 vs 1.454 (one seed; epochs 1-2 are identical by construction). Keeping the moments helps a
    little (0.1% of the validation loss); "drop" is the default because it saves the memory on every device,
    CPU-only runs included, and moves nothing between devices. The option for the CLI/config:
    ``deselected_state`` (also read from ``cfg.deselected_state`` when the constructor is not given one).
    """

    default_lr = 1e-4  # the validation sweep's winner at rho 0.5 (bench/results/accuracy_sweep_scitldr.md)
    DESELECTED_STATE = ("drop", "cpu", "keep")

    def __init__(self, cfg, deselected_state: str | None = None, base_model: str | None = None,
                 gradient_checkpointing: bool = False):
        self.cfg = cfg
        self.controller = GreenTrainerController(cfg, base_model, gradient_checkpointing,
                                                 deselected_state=deselected_state)

    @classmethod
    def from_config(cls, train_config):
        return cls(train_config.method_config, base_model=train_config.model,
                   gradient_checkpointing=train_config.gradient_checkpointing)

    # what tests and reports read; the controller holds it
    selections = property(lambda self: self.controller.selections)
    current = property(lambda self: self.controller.current)
    warmup = property(lambda self: self.controller.warmup)
    names = property(lambda self: self.controller.names)
    profile = property(lambda self: self.controller.profile)
    deselected_state = property(lambda self: self.controller.deselected_state)

    def check(self, model, profile, steps_per_epoch, total_steps, micro_batches=1):
        self.controller.check(model, profile, steps_per_epoch, total_steps, micro_batches)

    def prepare(self, model, ctx):
        return self.controller.setup(model, ctx)

    def rebind(self, model) -> None:
        c = self.controller
        c.params = c.candidates.parameters(model, c.names)

    def schedule_steps(self, total_steps: int) -> int:
        return self.controller.schedule_steps(total_steps)

    def optimizer_parameters(self, model):
        return self.controller.optimizer_parameters()

    def flops_allowed(self, reference: float) -> float:
        return self.controller.flops_allowed(reference)

    def budget_report(self, spent: float, reference: float) -> dict:
        allowed = self.flops_allowed(reference)
        return {"flops_allowed_fraction": allowed / reference, "within_budget": within_budget(spent, allowed, reference),
                "step_policy": self.cfg.policy}  # ("auto" resolved)

    def on_epoch_start(self, ctx):
        self.controller.on_epoch_start(ctx)

    def on_step_start(self, ctx):
        self.controller.on_step_start(ctx)

    def skips_step(self, ctx) -> bool:
        return self.controller.skip

    def after_optimizer_step(self, ctx):
        self.controller.after_optimizer_step(ctx)

    def epoch_report(self):
        out = {"selections": self.controller.epoch_selections}
        if self.cfg.policy != "select":
            out["steps_by_kind"] = dict(self.controller.steps_by_kind)
        return out

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict, ctx) -> None:
        self.controller.load_state_dict(state)
        self.controller.reinstate(ctx.model, ctx)

    def finalize(self, model):
        return self.controller.candidates.finalize(model)

    def save(self, model, tokenizer, path) -> None:
        self.controller.candidates.save(model, tokenizer, path, self.controller.base_model)

    def write_artifacts(self, out_dir) -> None:
        write_artifacts(out_dir, self.controller.names, self.controller.selections)
