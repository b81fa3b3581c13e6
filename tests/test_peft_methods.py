import json

import pytest

from conftest import make_tiny
from greentrainer.cli import main
from greentrainer.errors import UsageError
from greentrainer.methods.peft_methods import check_targets, default_lora_targets


@pytest.mark.parametrize("arch,expected", [("llama", ["q_proj", "v_proj"]), ("opt", ["q_proj", "v_proj"]),
                                           ("bloom", ["query_key_value"]), ("gpt2", ["c_attn"]),
                                           ("t5", ["q", "v"])])
def test_lora_defaults_to_query_and_value(arch, expected):
    model = make_tiny(arch)
    targets = default_lora_targets(model)
    assert targets == expected
    check_targets(model, targets)


def test_lora_on_missing_projection_is_a_clear_error():
    with pytest.raises(UsageError, match="not found"):
        check_targets(make_tiny("gpt2"), ["q_proj"])


@pytest.mark.parametrize("method", ["lora", "dora", "prefix"])
@pytest.mark.parametrize("which", ["llama", "t5"])
def test_peft_methods_train_save_and_reload(method, which, tmp_path, tiny_model_dir, tiny_t5_dir, jsonl,
                                            small_rows, capsys):
    model_dir = tiny_model_dir if which == "llama" else tiny_t5_dir
    out = tmp_path / "run"
    data = jsonl(small_rows)
    assert main(["train", "--model", model_dir, "--dataset", data, "--output-dir", str(out), "--epochs", "1",
                 "--no-progress", "--num-beams", "2", "--max-new-tokens", "4", "--method", method,
                 "--lr", "1e-3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete"
    t = m["totals"]
    assert 0 < t["trainable_params"] < t["total_params"]
    assert (out / "model" / "adapter_config.json").exists()
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--dataset", data, "--num-beams", "2", "--max-new-tokens", "4"]) == 0
    assert "rouge1_first_ref" in capsys.readouterr().out


def test_lora_bad_targets_via_cli(capsys, tmp_path, tiny_model_dir, jsonl, small_rows):
    code = main(["train", "--model", tiny_model_dir, "--dataset", jsonl(small_rows), "--method", "lora",
                 "--lora-targets", "nonexistent_proj", "--output-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not found" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_prefix_starts_from_the_models_own_keys_and_values_on_training_prompts():
    """With the data initialisation, the prefixed model on x equals the base model on (prompt tokens, x)."""
    import contextlib
    import types

    import torch
    from greentrainer.methods.peft_methods import PrefixMethod, PrefixMethodConfig
    from greentrainer.data import Encoded
    from greentrainer.methods.peft_methods import PeftMethod
    model = make_tiny("llama").eval()
    prompts = [Encoded(input_ids=[], labels=[], prompt_ids=list(range(5 + i, 12 + i))) for i in range(3)]
    counted = []
    ctx = types.SimpleNamespace(train_data=prompts, device=torch.device("cpu"), log=print,
                                count=lambda kind: counted.append(kind) or contextlib.nullcontext())
    n = 10  # spans the first two prompts
    peft_model = PrefixMethod(PrefixMethodConfig(prefix_tokens=n)).prepare(model, ctx)
    assert counted == ["overhead"]  # the initialising forward pass is counted in the run's FLOPs
    x = torch.tensor([[40, 41, 42, 43]])
    context = torch.tensor([(prompts[0].prompt_ids + prompts[1].prompt_ids)[:n]])
    with torch.no_grad():
        got = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        with peft_model.disable_adapter():
            want = peft_model(input_ids=torch.cat([context, x], 1)).logits[:, n:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_prefix_tuned_model_generates_with_its_prefix(arch, num_beams):
    """Generation runs the prefix (peft's own generate let transformers drop it): each generated token is the
    prefixed model's choice, and a padded row of a batch gets what it gets alone."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from greentrainer.evaluate import _generate
    seq2seq = arch == "t5"
    torch.manual_seed(0)
    model = get_peft_model(make_tiny(arch).eval(), PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 10.0)  # a prefix far from the base model's, so dropping it shows
    model.eval()
    pad = model.config.pad_token_id or 0
    kw = dict(num_beams=num_beams, do_sample=False, max_new_tokens=4, pad_token_id=pad, eos_token_id=None)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    rows = [prompts[0], prompts[1] + [pad] * 3] if seq2seq else [prompts[0], [pad] * 3 + prompts[1]]
    ids = torch.tensor(rows)
    with torch.no_grad():
        out = _generate(model, seq2seq, input_ids=ids, attention_mask=(ids != pad).long(), **kw)
        batch = out if seq2seq else out[:, ids.shape[1]:]
        for row, p in zip(batch, prompts):
            x = torch.tensor([p])
            alone = _generate(model, seq2seq, input_ids=x, attention_mask=torch.ones_like(x), **kw)[0]
            alone = alone if seq2seq else alone[len(p):]
            assert row.tolist() == alone.tolist()
            if num_beams > 1:
                continue
            # greedy: every token is the argmax of the prefixed model's forward on what came before it
            if seq2seq:
                fwd = dict(input_ids=x, decoder_input_ids=alone[None, :-1])
                new, at = alone[1:], slice(None)
            else:
                seq = torch.cat([x, alone[None, :-1]], 1)
                fwd = dict(input_ids=seq, attention_mask=torch.ones_like(seq))
                new, at = alone, slice(len(p) - 1, None)
            want = model(**fwd).logits[0, at].argmax(-1)
            assert new.tolist() == want.tolist()
            with model.disable_adapter():
                base = model(**fwd).logits[0, at].argmax(-1)
            assert base.tolist() != want.tolist()  # the prefix changes the choice (else the test shows nothing)
