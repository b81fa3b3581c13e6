"""--packing: several examples per row with their own positions, attention that never crosses an example, the
loss per target token unchanged, FLOPs still counted exactly, and the run reports what padded batches would have
cost; models whose attention cannot keep packed examples apart are refused in one line."""
import copy
import json
import random

import pytest
import torch

from conftest import make_tiny, one_line, train_args
from greentrainer.cli import main
from greentrainer.errors import UsageError
from greentrainer.config import TrainConfig
from greentrainer.data import Encoded, Example, collate, encode_all, keeps_packed_apart, pack
from greentrainer.flops import (FlopCounter, meta_model_from_config, profile_model, trainable_exactly,
                                unique_named_parameters)
from greentrainer.loop import train
from greentrainer.methods import build_method
from greentrainer.models import tiny_config, tiny_tokenizer
from greentrainer.run import packed

TOK = tiny_tokenizer()


def _data(n=48):
    exs = [Example(source="word " * (2 + (i * 7) % 40) + f"fox {i}", target=f"fox {i % 3}", targets=[f"fox {i % 3}"])
           for i in range(n)]
    return encode_all(exs, TOK, "summarization", False, 256)


def test_every_example_lands_in_one_row_within_the_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(3, 200) for _ in range(500)]
    data = [Encoded(input_ids=[1] * n, labels=[-100] * (n - 2) + [5, 5], prompt_ids=[]) for n in lengths]
    rows = pack(data, 256)
    assert sorted(id(e) for r in rows for e in r.parts) == sorted(id(e) for e in data)  # each once
    assert all(len(r.input_ids) <= 256 for r in rows)
    tokens = sum(len(e.input_ids) for e in data)
    assert len(rows) <= -(-tokens // 256) * 1.05  # best fit: hardly more rows than the tokens need
    assert [[id(e) for e in r.parts] for r in pack(data, 256)] == [[id(e) for e in r.parts] for r in rows]
    for r in rows:  # positions restart per example; its first label is off (never predicted across examples)
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert len(starts) == len(r.parts) and all(r.labels[i] == -100 for i in starts)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_see_only_themselves_and_the_loss_is_unchanged(attn):
    model = make_tiny("llama")
    model.config._attn_implementation = attn
    model.eval()
    data = _data(12)
    rows = pack(data, 96)
    assert max(len(r.parts) for r in rows) > 1 and len({len(r.input_ids) for r in rows}) > 1  # packed and padded
    batch = collate(rows, TOK.pad_token_id, False)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    with torch.no_grad():
        logits = model(**batch).logits
        for i, r in enumerate(rows):
            start = 0
            for e in r.parts:
                alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
                assert torch.allclose(logits[i, start: start + len(e.input_ids)], alone, atol=1e-5)
                start += len(e.input_ids)
        packed_loss = model(**batch).loss
        padded_loss = model(**collate([e for r in rows for e in r.parts], TOK.pad_token_id, False)).loss
    assert packed_loss == pytest.approx(float(padded_loss), rel=1e-5)  # the same mean over the same target tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_profile_predicts_a_packed_step_exactly(attn):
    """Packed rows (no attention mask, per-example positions) cost what the profile predicts at their shape, for
    any trainable set: the measured count of the real step equals the meta profile's prediction."""
    cfg = tiny_config("llama")
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn).train()
    batch = collate(pack(_data(12), 96)[:2], TOK.pad_token_id, False)
    prof = profile_model(meta_model_from_config(cfg, attn), *batch["input_ids"].shape)
    params = unique_named_parameters(model)
    rng = random.Random(0)
    for sel in [prof.names] + [rng.sample(prof.names, rng.randint(1, len(prof.names))) for _ in range(8)]:
        with trainable_exactly(params, set(sel)):
            with FlopCounter() as c:
                model(**batch).loss.backward()
        assert c.total == prof.predict(sel), sel


def _run(packing, method="full", **kw):
    from greentrainer.methods.greentrainer import GreenTrainerConfig
    cfg = TrainConfig(method=method, epochs=2, batch_size=4, lr=1e-3, seed=3, packing=packing,
                      method_config=GreenTrainerConfig(rho=0.6, select_every=2) if method == "greentrainer" else None,
                      **kw)
    data = _data()
    out = train(make_tiny("llama"), TOK, build_method(cfg), pack(data, 160) if packing else data, [], cfg,
                torch.device("cpu"), log=lambda *a: None, progress=False)
    return out


def test_packing_saves_flops_and_reports_what_padded_batches_would_cost():
    plain, packed = _run(False)["totals"], _run(True)["totals"]
    assert packed["steps"] < plain["steps"] and packed["flops_total"] < 0.8 * plain["flops_total"]
    assert packed["flops_fraction_of_full"] == 1.0  # full FT on the packed batches is the reference, measured
    # what full FT would have spent on the same examples in random padded batches: about the unpacked run's
    assert packed["flops_full_ft_random_batches"] == pytest.approx(plain["flops_full_ft_reference"], rel=0.1)
    assert packed["flops_fraction_of_full_random_batches"] < 0.8


def test_greentrainer_keeps_rho_on_packed_rows():
    out = _run(True, "greentrainer")
    assert out["totals"]["flops_fraction_of_full"] <= 0.6 + 1e-9


def test_packing_from_the_cli_trains_and_refuses_what_cannot_work(capsys, tmp_path, tiny_model_dir, jsonl,
                                                                  small_rows):
    data = jsonl(small_rows)
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--packing", "--max-input-length", "256")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["totals"]["steps"] < -(-m["n_train"] // 4) and m["config"]["packing"] is True
    said = capsys.readouterr().out
    assert f"packing: {m['n_train']} training examples in " in said
    assert "of full fine-tuning on random padded batches" in said
    for extra, words in ((["--group-by-length"], "contradict each other"), (["--method", "prefix"], "prefix")):
        assert words in one_line(capsys, train_args(tiny_model_dir, data, tmp_path / "x", "--packing", *extra))
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["opt", "bloom"])
def test_a_model_whose_attention_mixes_packed_examples_is_refused(arch):
    assert not keeps_packed_apart(make_tiny(arch))
    assert keeps_packed_apart(make_tiny("llama")) and keeps_packed_apart(make_tiny("qwen2"))
    with pytest.raises(UsageError, match="lets packed examples attend to each other"):
        packed(_data(4), make_tiny(arch), False, 256, log=lambda *a: None)


def test_an_encoder_decoder_model_is_refused():
    with pytest.raises(UsageError, match="decoder-only"):
        packed(_data(4), make_tiny("t5"), True, 256, log=lambda *a: None)
