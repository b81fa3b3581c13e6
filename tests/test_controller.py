"""One GreenTrainer controller, two drivers: the CLI's training loop and the Trainer callback make the same
decisions on the same run."""
import pytest
import torch

from conftest import make_tiny
from greentrainer.config import TrainConfig
from greentrainer.data import Example, collate, encode_all, typical_shape
from greentrainer.errors import UsageError
from greentrainer.loop import train
from greentrainer.methods.greentrainer import GreenTrainerConfig, GreenTrainerMethod
from greentrainer.models import tiny_tokenizer

TOK = tiny_tokenizer()
FLOPS_TOLERANCE = 1e-3  # relative: both count the same operations on the same batches


def _data(n=32):
    exs = [Example(source=" ".join(["word"] * (3 + i % 7)) + f" fox {i}", target=f"fox {i % 3}",
                   targets=[f"fox {i % 3}"]) for i in range(n)]
    return encode_all(exs, TOK, "summarization", False, 64)


def _through_the_loop(data, seed, epochs, gt):
    cfg = TrainConfig(method="greentrainer", epochs=epochs, batch_size=4, lr=1e-3, weight_decay=0.0, seed=seed,
                      method_config=GreenTrainerConfig(**gt))
    method = GreenTrainerMethod(cfg.method_config)
    out = train(make_tiny("llama"), TOK, method, data, [], cfg, torch.device("cpu"), log=lambda *a: None,
                progress=False)
    return out, method


def _through_the_callback(data, seed, epochs, gt, tmp_path):
    """The same run as a Trainer script: the loop's data order (its per-epoch permutations), its optimizer
    (AdamW, linear schedule, no weight decay, no clipping) and its profiled batch shape."""
    from transformers import Trainer, TrainingArguments
    from greentrainer.callback import GreenTrainerCallback
    generator = torch.Generator().manual_seed(seed)
    order = [i for _ in range(epochs) for i in torch.randperm(len(data), generator=generator).tolist()]

    class LoopOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return iter_epochs(order, len(data))

    items = [dict(input_ids=e.input_ids, labels=e.labels) for e in data]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=epochs,
                             learning_rate=1e-3, weight_decay=0.0, max_grad_norm=0.0, seed=seed, report_to=[],
                             save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
                             optim="adamw_torch", lr_scheduler_type="linear")
    seq_len = typical_shape(data, 4, False)[1]
    cb = GreenTrainerCallback(seq_len=seq_len, energy=False, log=lambda *a: None, **gt)
    from greentrainer.data import Encoded
    trainer = LoopOrder(model=make_tiny("llama"), args=args, train_dataset=items, callbacks=[cb],
                        data_collator=lambda b: collate([Encoded(i["input_ids"], i["labels"], []) for i in b],
                                                        TOK.pad_token_id, False))
    trainer.train()
    return cb


class iter_epochs(torch.utils.data.Sampler):
    """Each epoch's slice of a fixed order (the Trainer sets the epoch before iterating)."""

    def __init__(self, order, n):
        self.order, self.n, self.epoch = order, n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(self.order[self.epoch * self.n: (self.epoch + 1) * self.n])


@pytest.mark.parametrize("gt", [dict(rho=0.7, full_warmup_steps=2),
                                dict(rho=0.8, select_every=4, full_warmup_steps=4, importance="grad")],
                         ids=["per-epoch", "every-4-steps"])
def test_the_loop_and_the_callback_make_the_same_selections_and_spend_the_same_flops(tmp_path, gt):
    data, seed, epochs = _data(), 3, 3
    out, method = _through_the_loop(data, seed, epochs, gt)
    cb = _through_the_callback(data, seed, epochs, gt, tmp_path)
    loop_sel = [(s["kind"], s["step"], s["selected"]) for s in method.selections]
    cb_sel = [(s["kind"], s["step"], s["selected"]) for s in cb.selections]
    assert len(loop_sel) >= 3 and cb_sel == loop_sel
    t = out["totals"]
    spent = cb.flops["steps"] + cb.flops["probes"]
    assert cb.flops["full_ft_reference"] == t["flops_full_ft_reference"]
    assert abs(spent - t["flops_total"]) <= FLOPS_TOLERANCE * t["flops_total"]
    assert t["within_budget"] and cb.report["within_budget"]


def test_the_callback_takes_every_option_of_the_cli_or_refuses_it_in_one_line(tmp_path):
    from greentrainer.callback import GreenTrainerCallback
    from greentrainer.config import option_specs
    cb = GreenTrainerCallback(rho=0.5, select_once=True, importance="grad", selector_resolution=64,
                              deselected_state="cpu", probe_batches=2, log=lambda *a: None)
    assert cb.config.select_once and cb.config.resolution == 64 and cb.controller.deselected_state == "cpu"
    sched = tmp_path / "rho.txt"
    sched.write_text("0 0.8\n4 0.6\n")
    assert GreenTrainerCallback(rho_schedule=str(sched)).controller.schedule == {0: 0.8, 4: 0.6}
    with pytest.raises(UsageError, match="over='blocks'"):
        GreenTrainerCallback(over="blocks")
    with pytest.raises(UsageError, match="carbon_trace"):
        GreenTrainerCallback(carbon_aware=True)
    for policy in ("frontier", "fewer"):
        with pytest.raises(UsageError, match="skips batches"):
            GreenTrainerCallback(step_policy=policy)
    assert GreenTrainerCallback().config.policy == "select"  # "auto" here: the Trainer owns the schedule
    with pytest.raises(UsageError, match="unknown option 'rhoo'"):
        GreenTrainerCallback(rhoo=0.5)
    # every GreenTrainer option of the command line is a keyword of the callback (by the option's name)
    for o in option_specs(GreenTrainerConfig):
        if o.name not in ("over", "carbon_aware", "rho_min", "rho_max", "rho_schedule", "step_policy"):  # above
            assert getattr(GreenTrainerCallback(**{o.name: o.default}).config, o.field) == o.default


def test_the_callback_drops_the_optimizer_state_of_deselected_tensors(tmp_path):
    """The Trainer builds its optimizer over every tensor; after each selection only the selected tensors keep
    AdamW state (deselected_state="drop", the default), as in the loop."""
    from test_training import tiny_trainer
    from greentrainer.callback import GreenTrainerCallback
    cb = GreenTrainerCallback(rho=0.6, full_warmup_steps=0, energy=False, log=lambda *a: None)
    trainer = tiny_trainer(make_tiny("llama"), tmp_path, 32, [cb], num_train_epochs=2)
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    held = {names[id(p)] for p in opt.state}
    assert held and held <= set(cb.current) and len(held) < len(names)
    assert cb.selections[-1]["optimizer_state_bytes"] > 0
