"""--prompt-format: the tokenizer's chat template (instruction + source as the user turn, target as the
assistant turn, loss on the assistant's tokens only), recorded in the run folder and used again by eval."""
import json

import pytest

from conftest import make_tiny, train_args
from greentrainer.cli import main
from greentrainer.data import (PLAIN, Example, PromptFormat, encode_example, encode_prompt, resolve_prompt_format,
                               stop_token_ids)
from greentrainer.errors import UsageError
from greentrainer.models import tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_chat_format_puts_the_target_in_the_assistant_turn_and_masks_the_rest():
    tok = chat_tokenizer()
    fmt = resolve_prompt_format("auto", tok, False, "Summarize.")
    assert fmt == PromptFormat("chat", "Summarize.")
    ex = Example("the cat sat on the mat", "cat sat", ["cat sat"])
    enc = encode_example(ex, tok, "summarization", False, 200, fmt=fmt)
    assert tok.decode(enc.input_ids) == "<user>Summarize.\n\nthe cat sat on the mat</s><assistant>cat sat</s>"
    assert tok.decode([t for t in enc.labels if t != -100]) == "cat sat</s>"  # the answer and its end of turn
    assert enc.labels[:len(enc.prompt_ids)] == [-100] * len(enc.prompt_ids)
    assert encode_prompt(ex, tok, "summarization", False, 200, fmt) == enc.prompt_ids  # generation: same prompt
    assert tok.decode(enc.prompt_ids).endswith("<assistant>")
    assert stop_token_ids(tok, fmt) == [tok.eos_token_id]


def test_only_the_source_is_truncated_in_the_chat_format():
    tok = chat_tokenizer()
    fmt = PromptFormat("chat", "Summarize.")
    enc = encode_example(Example("word " * 100, "short", ["short"]), tok, "summarization", False, 60, fmt=fmt)
    text = tok.decode(enc.input_ids)
    assert len(enc.input_ids) == 60 and text.startswith("<user>Summarize.") and text.endswith("<assistant>short</s>")


def test_auto_falls_back_to_plain_and_chat_without_a_template_is_refused():
    assert resolve_prompt_format("auto", tiny_tokenizer(), False) == PLAIN
    assert resolve_prompt_format("auto", chat_tokenizer(), True) == PLAIN  # encoder-decoder
    assert resolve_prompt_format("plain", chat_tokenizer(), False) == PLAIN
    with pytest.raises(UsageError, match="no chat template"):
        resolve_prompt_format("chat", tiny_tokenizer(), False)


def test_a_template_that_prompts_differently_in_training_is_refused():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<go>{% endif %}")  # the answer's turn lacks <go>
    with pytest.raises(UsageError, match="differently"):
        encode_example(Example("a b", "c", ["c"]), tok, "summarization", False, 50, fmt=PromptFormat("chat", ""))


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_chat")
    make_tiny("llama").save_pretrained(d)
    chat_tokenizer().save_pretrained(d)
    return str(d)


def test_a_run_records_its_prompt_format_and_eval_uses_it_again(capsys, tmp_path, chat_model_dir, data):
    run = tmp_path / "run"
    assert main(train_args(chat_model_dir, data, run, "--instruction", "Shorten this.")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["prompt_format"] == "chat" and metrics["instruction"] == "Shorten this."
    assert json.loads((run / "model" / "greentrainer_prompt.json").read_text())["prompt_format"] == "chat"
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run), "--dataset", data, "--num-beams", "1", "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["prompt_format"] == "chat" and res["instruction"] == "Shorten this."
    assert main(["eval", "--model", str(run), "--dataset", data, "--num-beams", "1", "--max-new-tokens", "4",
                 "--prompt-format", "plain"]) == 0
    assert "trained with the chat prompt format" in capsys.readouterr().err
