import pytest

from greentrainer.data import Example, collate, encode_example, format_example, load_examples
from greentrainer.errors import UsageError
from greentrainer.models import tiny_tokenizer

TOK = tiny_tokenizer()


def test_prompt_formats_follow_the_paper():
    ex = Example(source="abstract text", target="short", targets=["short"])
    assert format_example(ex, "summarization", "</s>", False) == ("abstract text", " TL;DR: ", "short</s>")
    assert format_example(ex, "summarization", "</s>", True) == ("summarize: abstract text", "", "short")
    q = Example(source="who?", target="me", targets=["me"])
    src, suf, tgt = format_example(q, "qa", "<E>", False)
    assert src + suf + tgt == "question: who?<E>answer: me<E>"
    p = Example(source="open jar", target="twist", targets=["twist"], choices=["twist", "hit"], label=0)
    src, suf, tgt = format_example(p, "piqa", "<E>", False)
    assert src + suf + tgt == "goal: open jar<E>sol1: twist<E>sol2: hit<E>label: 0<E>"


def test_loss_covers_only_target_tokens():
    ex = Example(source="some source", target="tgt", targets=["tgt"])
    enc = encode_example(ex, TOK, "summarization", False, 100)
    n_target = len(TOK("tgt</s>", add_special_tokens=False).input_ids)
    assert enc.labels[-n_target:] == enc.input_ids[-n_target:]
    assert all(x == -100 for x in enc.labels[:-n_target])
    batch = collate([enc, encode_example(Example("x", "y", ["y"]), TOK, "summarization", False, 100)],
                    TOK.pad_token_id, False)
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()


def test_truncation_keeps_suffix_and_target():
    ex = Example(source="word " * 200, target="the end", targets=["the end"])
    enc = encode_example(ex, TOK, "summarization", False, 40)
    assert len(enc.input_ids) == 40
    text = TOK.decode(enc.input_ids)
    assert text.endswith(" TL;DR: the end</s>")


def test_max_input_length_too_small():
    ex = Example(source="x", target="a long target sentence", targets=["a long target sentence"])
    with pytest.raises(UsageError, match="too small"):
        encode_example(ex, TOK, "summarization", False, 10)


def test_bundled_datasets_load_with_fixed_subsample():
    a = load_examples("scitldr", "train", limit=5, seed=1)
    b = load_examples("scitldr", "train", limit=5, seed=1)
    assert [e.id for e in a] == [e.id for e in b] and len(a) == 5
    test = load_examples("scitldr", "eval", limit=3)
    assert all(len(e.targets) >= 2 for e in test)  # SciTLDR test has several references
    piqa = load_examples("piqa", "eval", limit=2)
    assert piqa[0].choices and piqa[0].label in (0, 1)


def test_user_jsonl_and_errors(jsonl, small_rows):
    path = jsonl(small_rows)
    train, val, test = (load_examples(path, s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (17, 1, 2)
    assert not {e.source for e in train} & ({e.source for e in test} | {e.source for e in val})
    with pytest.raises(UsageError, match="line 2"):
        load_examples(jsonl(['{"source": "a", "target": "b"}', '{oops'], "bad.jsonl"), "train")
    with pytest.raises(UsageError, match="line 2"):
        load_examples(jsonl([{"source": "a", "target": "b"}, {"target": "no source"}], "nosrc.jsonl"), "train")
    with pytest.raises(UsageError, match=r"columns \(foo\); accepted: messages"):
        load_examples(jsonl([{"foo": "x"}], "nocols.jsonl"), "train")
    with pytest.raises(UsageError, match="empty"):
        load_examples(jsonl([], "empty.jsonl"), "train")
    with pytest.raises(UsageError, match="not found"):
        load_examples("/nonexistent/data.jsonl", "train")
    with pytest.raises(UsageError, match="unknown dataset"):
        load_examples("nosuchset", "train")


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    bad = tmp_path / "data.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(UsageError, match="cannot read"):
        load_examples(str(bad), "train")


def test_rho_schedule_file(tmp_path):
    from greentrainer.methods.greentrainer import load_rho_schedule
    p = tmp_path / "s.txt"
    p.write_text("# step rho\n0 0.6\n100 0.5\n")
    assert load_rho_schedule(str(p)) == {0: 0.6, 100: 0.5}
    p.write_text("0 1.5\n")
    with pytest.raises(UsageError, match="rho"):
        load_rho_schedule(str(p))
