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
