"""Users' data in the formats people use (conversations, prompt/completion, alpaca, plain text, source/target)
and file types (JSONL, JSON, CSV, Parquet, a save_to_disk folder): read through ``datasets``, the loss on what
the format trains, bad rows refused in one line with their number before anything is written."""
import json
import re

import pytest

from conftest import train_args
from greentrainer.cli import main
from greentrainer.data import PLAIN, PromptFormat, encode_example, encode_prompt, load_examples
from greentrainer.errors import UsageError
from greentrainer.formats import detect_format, load_user_examples
from test_prompt_format import chat_model_dir, chat_tokenizer  # noqa: F401  (a fixture)

CHAT = PromptFormat("chat", "")


def _conversation(i):
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"what is {i} plus one"},
                         {"role": "assistant", "content": f"{i + 1}"},
                         {"role": "user", "content": f"and {i} plus two"},
                         {"role": "assistant", "content": f"it is {i + 2}"}]}


ROWS = {
    "messages": [_conversation(i) for i in range(20)],
    "prompt-completion": [{"prompt": f"the cat number {i} sat on the mat. Summary:", "completion": f" cat {i}"}
                          for i in range(20)],
    "prompt-completion-chat": [{"prompt": [{"role": "user", "content": f"name cat {i}"}],
                                "completion": [{"role": "assistant", "content": f"cat {i}"}]} for i in range(20)],
    "alpaca": [{"instruction": "Add one." if i % 2 else f"Say {i + 1}.", "input": f"{i}" if i % 2 else "",
                "output": f"{i + 1}"} for i in range(20)],
    "text": [{"text": f"the cat number {i} sat on the mat and looked at the dog"} for i in range(20)],
    "source-target": [{"source": f"the cat number {i} sat on the mat", "target": f"cat {i} sat"} for i in range(20)],
}
FLAT = ("prompt-completion", "alpaca", "text", "source-target")  # CSV holds flat columns only


def write(tmp_path, rows, kind, name="data"):
    """``rows`` as a file of ``kind`` (jsonl, json, csv, parquet, disk) through the libraries people use."""
    import datasets
    path = tmp_path / (f"{name}.{kind}" if kind != "disk" else name)
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "disk"])
@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_reads_from_every_file_type(tmp_path, fmt, kind):
    if kind == "csv" and fmt not in FLAT:
        pytest.skip("a CSV cell holds a string, not a list of messages")
    path = write(tmp_path, ROWS[fmt], kind)
    found, exs = load_user_examples(path)
    assert found == fmt.replace("-chat", "") and len(exs) == 20
    if fmt in ("messages", "prompt-completion-chat", "alpaca"):
        assert all(e.messages and e.trained and any(e.trained) for e in exs)
    assert exs[3].target == {"messages": "it is 5", "prompt-completion": " cat 3", "prompt-completion-chat": "cat 3",
                             "alpaca": "4", "text": "", "source-target": "cat 3 sat"}[fmt]
    train, val, test = (load_examples(path, s) for s in ("train", "validation", "test"))
    assert len(train) + len(val) + len(test) == 20 and test


def test_the_loss_covers_every_assistant_turn_and_nothing_else():
    tok = chat_tokenizer()
    ex = load_examples_from(ROWS["messages"][:1])[0]
    enc = encode_example(ex, tok, "summarization", False, 400, fmt=CHAT)
    assert tok.decode(enc.input_ids) == ("<system>Be brief.</s><user>what is 0 plus one</s><assistant>1</s>"
                                         "<user>and 0 plus two</s><assistant>it is 2</s>")
    trained = [t if lab != -100 else None for t, lab in zip(enc.input_ids, enc.labels)]
    spans, cur = [], []
    for t in trained:
        if t is None and cur:
            spans, cur = spans + [tok.decode(cur)], []
        elif t is not None:
            cur.append(t)
    spans += [tok.decode(cur)] if cur else []
    assert spans == ["1</s>", "it is 2</s>"]  # each assistant turn and its end of turn
    # generation starts from every turn before the last assistant one, with the assistant header
    assert tok.decode(encode_prompt(ex, tok, "summarization", False, 400, CHAT)) == (
        "<system>Be brief.</s><user>what is 0 plus one</s><assistant>1</s><user>and 0 plus two</s><assistant>")
    assert ex.targets == ["it is 2"]


def test_without_a_chat_template_conversations_use_role_blocks():
    from greentrainer.models import tiny_tokenizer
    tok = tiny_tokenizer()
    ex = load_examples_from(ROWS["alpaca"][1:2])[0]
    enc = encode_example(ex, tok, "summarization", False, 400, fmt=PLAIN)
    assert tok.decode(enc.input_ids) == "### User:\nAdd one.\n\n1\n\n### Assistant:\n2</s>"
    assert tok.decode([t for t in enc.labels if t != -100]) == "2</s>"


def test_prompt_completion_strings_are_used_as_they_are_and_text_trains_every_token():
    from greentrainer.models import tiny_tokenizer
    tok = tiny_tokenizer()
    pc = load_examples_from(ROWS["prompt-completion"][:1])[0]
    enc = encode_example(pc, tok, "summarization", False, 400, fmt=CHAT)  # no template, no instruction
    assert tok.decode(enc.input_ids) == "the cat number 0 sat on the mat. Summary: cat 0</s>"
    assert tok.decode([t for t in enc.labels if t != -100]) == " cat 0</s>"
    txt = load_examples_from(ROWS["text"][:1])[0]
    enc = encode_example(txt, tok, "lm", False, 20, fmt=PLAIN)
    assert enc.labels == enc.input_ids and len(enc.input_ids) == 20 and enc.truncated


def load_examples_from(rows):
    fmt = detect_format(list(enumerate(rows, 1)), "rows")
    from greentrainer.formats import to_example
    return [to_example(r, fmt, "rows", n) for n, r in enumerate(rows, 1)]


BAD = [
    ("missing role", {"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "no role"),
    ("empty assistant turn", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "empty assistant turn"),
    ("no assistant turn", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ("non-string content", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]},
     "no string content"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "role 'robot'"),
]


@pytest.mark.parametrize("case,row,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_row_is_refused_with_its_number(jsonl, case, row, message):
    path = jsonl(ROWS["messages"][:4] + [row] + ROWS["messages"][4:8])
    with pytest.raises(UsageError, match=f"row 5: .*{message}"):
        load_examples(path, "train")


def test_a_conversation_whose_assistant_part_would_be_cut_entirely_is_refused():
    tok = chat_tokenizer()
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    ex = load_examples_from([long])[0]
    with pytest.raises(UsageError, match="row 1: the conversation is longer than --max-input-length 64"):
        encode_example(ex, tok, "summarization", False, 64, fmt=CHAT)
    ex = load_examples_from([_conversation(0)])[0]
    enc = encode_example(ex, tok, "summarization", False, 60, fmt=CHAT)  # the second turn cut: kept, counted
    assert enc.truncated and len(enc.input_ids) == 60 and any(t != -100 for t in enc.labels)


def test_unknown_columns_name_what_was_found_and_what_is_accepted(jsonl):
    with pytest.raises(UsageError, match=r"columns \(answer, question\); accepted: messages"):
        load_examples(jsonl([{"question": "q", "answer": "a"}] * 3), "train")


def test_a_hub_name_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError, match="cannot load 'no-such-org/no-such-set' from the Hugging Face Hub"):
        load_examples("no-such-org/no-such-set", "train")


@pytest.mark.parametrize("fmt,kind", [("messages", "jsonl"), ("messages", "parquet"), ("messages", "disk"),
                                      ("prompt-completion-chat", "json"), ("prompt-completion", "csv"),
                                      ("alpaca", "csv"), ("text", "parquet"), ("source-target", "json")])
def test_each_format_trains_end_to_end_from_the_cli(tmp_path, chat_model_dir, fmt, kind, capsys):
    path = write(tmp_path, ROWS[fmt], kind)
    out = tmp_path / "run"
    assert main(train_args(chat_model_dir, path, out, "--method", "greentrainer", "--rho", "0.8")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["n_train"] > 0
    if fmt == "text":
        assert set(m["eval"]) >= {"loss", "perplexity"}
    else:
        assert "rougeL_first_ref" in m["eval"]


def test_a_bad_row_from_the_cli_exits_2_and_writes_nothing(tmp_path, chat_model_dir, capsys):
    path = write(tmp_path, ROWS["messages"][:6] + [BAD[2][1]] + ROWS["messages"][6:], "jsonl")
    out = tmp_path / "run"
    assert main(train_args(chat_model_dir, path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 7" in err[0] and "no assistant turn" in err[0]
    assert not out.exists()


def test_truncated_rows_are_counted_and_reported(tmp_path, chat_model_dir, capsys):
    rows = [{"source": f"row {i} " + "word " * (5 + 60 * (i % 2)), "target": f"t {i}"} for i in range(20)]
    out = tmp_path / "run"
    assert main(train_args(chat_model_dir, write(tmp_path, rows, "jsonl"), out, "--max-input-length", "64")) == 0
    said = capsys.readouterr()
    assert re.search(r"\b\d+ of \d+ training rows are longer than --max-input-length 64: their source or prompt is "
                     r"cut", said.out + said.err)
