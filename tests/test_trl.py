"""GreenTrainerCallback in TRL's SFTTrainer: conversational and prompt/completion data, assistant-only and
completion-only loss, packing and padding-free batches, gradient accumulation and checkpointing. Each run
trains, stays within ρ, leaves the tensors no selection chose unchanged, and logs its measured FLOPs."""
import pytest
import torch
import transformers

from conftest import make_tiny
from test_prompt_format import chat_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

# ChatML with the {% generation %} markers TRL's assistant_only_loss needs
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<assistant>{% generation %}{{ m['content'] }}"
            "</s>{% endgeneration %}{% else %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def conversations(n=32):
    return datasets.Dataset.from_list([{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"what is {i} plus one"},
        {"role": "assistant", "content": f"{i + 1}"}, {"role": "user", "content": "and plus two"},
        {"role": "assistant", "content": f"{i + 2}"}]} for i in range(n)])


def prompt_completions(n=32, chat=False):
    if chat:
        return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"name cat {i}"}],
                                            "completion": [{"role": "assistant", "content": f"cat {i}"}]}
                                           for i in range(n)])
    return datasets.Dataset.from_list([{"prompt": f"the cat number {i} sat on the mat. Summary:",
                                        "completion": f" cat {i}"} for i in range(n)])


def run(data, tmp_path, warmup=0, **sft):
    from trl import SFTConfig, SFTTrainer
    from greentrainer.callback import GreenTrainerCallback
    tok = chat_tokenizer()
    tok.chat_template = TEMPLATE
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = GreenTrainerCallback(rho=0.6, full_warmup_steps=warmup, select_every=4, energy=False, log=lambda *a: None)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, report_to=[],
                     use_cpu=True, save_strategy="no", logging_steps=2, max_length=64, disable_tqdm=True,
                     learning_rate=1e-3, **sft)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[cb])
    cb.attach(trainer)  # ahead of the loggers, which then see its values
    trainer.seen = []
    trainer.add_callback(type("Logs", (transformers.TrainerCallback,), {
        "on_log": lambda self, args, state, control, logs=None, **kw: trainer.seen.append(dict(logs))})())
    trainer.train()
    return cb, trainer, before


def check(cb, trainer, before):
    r = cb.report
    assert r["within_budget"] and r["flops"] > 0 and r["flops_fraction_of_full"] <= 0.6 + 0.005
    logged = [h for h in trainer.seen if "greentrainer/flops" in h]  # what report_to integrations receive
    assert logged and logged[-1]["greentrainer/flops"] == pytest.approx(r["flops"])
    chosen = {n for s in cb.selections for n in s["selected"]}
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n in before if n not in chosen]
    assert unchanged and all(torch.equal(before[n], after[n].detach()) for n in unchanged)
    assert any(not torch.equal(before[n], after[n].detach()) for n in chosen)


@pytest.mark.parametrize("setting", [
    dict(data="conversations", assistant_only_loss=True),
    dict(data="conversations", packing=True),
    dict(data="prompt-completion", completion_only_loss=True),
    dict(data="prompt-completion-chat", padding_free=True, packing=True),
    dict(data="conversations", gradient_accumulation_steps=2, gradient_checkpointing=True),
], ids=["assistant-only-loss", "packing", "completion-only-loss", "padding-free", "accumulation+checkpointing"])
def test_sft_trainer_with_the_callback_trains_within_rho(tmp_path, setting):
    setting = dict(setting)
    data = {"conversations": conversations(), "prompt-completion": prompt_completions(),
            "prompt-completion-chat": prompt_completions(chat=True)}[setting.pop("data")]
    cb, trainer, before = run(data, tmp_path, **setting)
    check(cb, trainer, before)
    if setting.get("assistant_only_loss"):  # the loss covered the assistant turns only
        batch = next(iter(trainer.get_train_dataloader()))
        tok = trainer.processing_class
        kept = tok.decode([t for t, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist())
                           if lab != -100])
        assert "plus" not in kept and "</s>" in kept


def test_sft_trainer_with_a_warm_up_stays_within_rho(tmp_path):
    cb, trainer, _ = run(conversations(), tmp_path, warmup=4)
    assert cb.selections[0]["kind"] == "warm-up" and cb.report["within_budget"]
