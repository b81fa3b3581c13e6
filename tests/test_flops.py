import copy
import random

import pytest
import torch

from greentrainer.flops import (FLOP_OVERRIDES, FlopCounter, measure_step_flops, meta_model_from_config,
                                profile_config, profile_model, sdpa_backward_parts, supports_sdpa,
                                trainable_exactly, unique_named_parameters)
from greentrainer.models import tiny_config

ARCHS = ["llama", "opt", "bloom", "gpt2", "qwen2", "t5"]


@pytest.mark.parametrize("arch", ARCHS)
def test_prediction_matches_measured_flops_for_random_selections(arch):
    model = meta_model_from_config(tiny_config(arch, "small"))
    tgt = 32 if arch == "t5" else None  # summarisation-like: short targets
    prof = profile_model(model, 2, 128, tgt)
    assert prof.predict(prof.names) == prof.t_full == measure_step_flops(model, prof.names, 2, 128, tgt)
    rng = random.Random(0)
    worst_chain = 0.0
    for _ in range(50):
        sel = rng.sample(prof.names, rng.randint(1, len(prof.names)))
        measured = measure_step_flops(model, sel, 2, 128, tgt)
        # Eq. 5 with side branches (Q/K/V siblings, T5 cross-attention K/V) paid only when needed: exact.
        assert prof.predict(sel) == measured
        chain = prof.predict(sel, exact=False)
        assert chain >= measured  # the paper's pure chain never under-predicts
        worst_chain = max(worst_chain, (chain - measured) / measured)
    print(f"{arch}: pure chain over-predicts by up to {100 * worst_chain:.3f}%")


@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])  # transformers' default kernel and the loop
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_moe_prediction_matches_the_measured_step_for_any_routing(arch, experts):
    """Mixture of experts: an expert's FLOPs follow the tokens routed to it, but every token goes to top-k experts,
    so a layer's experts together multiply tokens × top-k rows whatever the routing. The meta profile (its experts
    as batched matmuls) predicts the live step of a real model (random weights: its own routing) exactly, for
    any trainable set, with the grouped kernel (counted by our formula) or the eager loop over experts."""
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(arch)
    prof = profile_model(meta_model_from_config(cfg), 2, 16)
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
            "model.layers.0.mlp.gate.weight"} <= set(prof.names)  # the experts (fused) and the router: candidates
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), experts_implementation=experts)
    params = unique_named_parameters(model)
    rng = random.Random(0)
    for seed, sel in enumerate([prof.names] + [rng.sample(prof.names, rng.randint(1, len(prof.names)))
                                               for _ in range(12)]):
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))  # other routings
        with trainable_exactly(params, set(sel)):
            with FlopCounter() as c:
                model(input_ids=ids, labels=ids).loss.backward()
        assert c.total == prof.predict(sel), sel


@pytest.mark.parametrize("arch", ["llama", "qwen2", "t5"])
def test_single_tensor_costs_match_measured_flops(arch):
    model = meta_model_from_config(tiny_config(arch))
    tgt = 8 if arch == "t5" else None
    prof = profile_model(model, 1, 16, tgt)
    assert prof.branches  # these architectures have sibling branches
    for j, name in enumerate(prof.names):
        assert prof.t_fp + prof.single_costs[j] == measure_step_flops(model, [name], 1, 16, tgt)


def test_tied_embedding_is_one_tensor_at_the_bottom():
    model = meta_model_from_config(tiny_config("llama"))
    prof = profile_model(model, 1, 16)
    assert prof.names[-1] == "model.embed_tokens.weight"
    assert "lm_head.weight" not in prof.names
    assert len(prof.names) == len(unique_named_parameters(model))


def test_opt_final_layer_norm_is_ordered_by_backward_reach():
    prof = profile_model(meta_model_from_config(tiny_config("opt")), 1, 16)
    # HF OPT registers final_layer_norm before the layers; the backward pass reaches it first.
    assert prof.names[0].startswith("model.decoder.final_layer_norm")
    assert prof.names.index("model.decoder.layers.1.fc2.weight") < prof.names.index("model.decoder.layers.0.fc2.weight")


def test_full_fine_tuning_flops_equal_the_analytic_count():
    cfg = tiny_config("llama")
    model = meta_model_from_config(cfg)
    B, S, H, F, V, L = 2, 32, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    hd, nh, nkv = H // cfg.num_attention_heads, cfg.num_attention_heads, cfg.num_key_value_heads
    N = B * S
    per_layer = 2 * N * H * (nh * hd + 2 * nkv * hd + H) + 2 * N * 3 * H * F + 2 * 2 * B * nh * S * S * hd
    forward = L * per_layer + 2 * N * H * V
    prof = profile_model(model, B, S)
    assert prof.t_fp == forward
    assert prof.t_full == 3 * forward  # backward = weight grads + activation grads, everything trainable


def test_profile_needs_only_a_config_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENTRAINER_CACHE", str(tmp_path))
    a = profile_config(tiny_config("gpt2"), 2, 16)
    assert list(tmp_path.rglob("*.json"))
    b = profile_config(tiny_config("gpt2"), 2, 16)
    assert a.to_json() == b.to_json()


# --- Fused attention (SDPA) is counted exactly as eager attention ---------------------------------------------

CPU_SDPA = "aten._scaled_dot_product_flash_attention_for_cpu"


def _no_dropout(cfg):
    """CPU SDPA runs its fused kernel only without dropout (with it, the math path: bmm, counted anyway)."""
    for k in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout_rate", "attention_dropout"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    return cfg


def _pair(arch, dropout=False):
    """The same tiny model (same weights) with eager and with SDPA attention, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    cfg = tiny_config(arch) if dropout else _no_dropout(tiny_config(arch))
    assert supports_sdpa(cfg), f"{arch}: transformers has no SDPA attention for it"
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    out = []
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)  # a config object each: transformers records the implementation on it
        out.append(cls.from_config(copy.deepcopy(cfg), attn_implementation=impl).train())
    assert [m.config._attn_implementation for m in out] == ["eager", "sdpa"]
    return out


def _padded_batch(model):
    """A right-padded training batch from greentrainer.data.collate (so transformers passes a padding mask)."""
    from greentrainer.data import Encoded, collate
    seq2seq = model.config.is_encoder_decoder
    rng = random.Random(1)
    items = []
    for n in (21, 13, 6):
        ids = [rng.randrange(256) for _ in range(n)]
        tgt = [rng.randrange(256) for _ in range(max(2, n // 3))]
        items.append(Encoded(ids, tgt if seq2seq else [-100] * (n // 2) + ids[n // 2:], ids))
    batch = collate(items, model.config.pad_token_id, seq2seq)
    assert (batch["attention_mask"] == 0).any()
    return batch


class _OpLog(FlopCounter):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func._overloadpacket))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _step_flops(model, batch, selected=None):
    """(forward FLOPs, forward+backward FLOPs, ops seen, loss) under our counter, ``selected`` trainable."""
    params = unique_named_parameters(model)
    with trainable_exactly(params, {n for n, _ in params} if selected is None else set(selected)):
        with _OpLog() as c:
            out = model(**batch)
            forward = c.total
            if out.loss.requires_grad:
                out.loss.backward()
    return forward, c.total, c.ops, out.loss.item()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("dropout", [False, True], ids=["fused", "dropout"])
def test_sdpa_step_flops_equal_eager_on_a_padded_batch(arch, dropout):
    eager, sdpa = _pair(arch, dropout)
    batch = _padded_batch(eager)
    fe, te, ops_e, loss_e = _step_flops(eager, batch)
    fs, ts, ops_s, loss_s = _step_flops(sdpa, batch)
    assert CPU_SDPA not in ops_e
    if not dropout:
        # The fused CPU kernels really ran (T5: where its position bias needs no gradient; else the math path).
        assert {CPU_SDPA, CPU_SDPA + "_backward"} <= ops_s
        assert loss_s == pytest.approx(loss_e, rel=1e-5)
    assert abs(fs - fe) <= 1e-3 * fe and abs(ts - te) <= 1e-3 * te  # the bar (0.1%) ...
    assert (fs, ts) == (fe, te)                                       # ... met exactly
    assert ts == 3 * fs


def test_sdpa_backward_counts_only_the_gradients_needed_like_eager():
    """Each tensor trainable alone: the deepest attention then needs only some of dQ, dK, dV (and dP)."""
    eager, sdpa = _pair("llama")
    batch = _padded_batch(eager)
    names = [n for n, _ in unique_named_parameters(eager)]
    for sel in [[n] for n in names] + [["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]]:
        fe, te, _, _ = _step_flops(eager, batch, sel)
        fs, ts, ops, _ = _step_flops(sdpa, batch, sel)
        assert (fs, ts) == (fe, te), sel
    assert CPU_SDPA + "_backward" in ops


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_sdpa_profile_equals_the_eager_profile(arch):
    cfg = _no_dropout(tiny_config(arch))
    tgt = 8 if arch == "t5" else None
    eager = profile_model(meta_model_from_config(cfg), 2, 16, tgt).to_json()
    # On the meta device SDPA takes the math path (bmm) ...
    assert profile_model(meta_model_from_config(cfg, "sdpa"), 2, 16, tgt).to_json() == eager
    # ... on the CPU the fused kernel, whose backward is split over the Q/K/V edges as eager's matmuls are.
    assert profile_model(_pair(arch)[1], 2, 16, tgt).to_json() == eager


def test_sdpa_prediction_matches_measured_flops_for_llama():
    model = _pair("llama")[1]
    prof = profile_model(model, 2, 16)
    rng = random.Random(0)
    sels = [[n] for n in prof.names] + [rng.sample(prof.names, rng.randint(1, len(prof.names))) for _ in range(20)]
    for sel in sels:
        assert prof.predict(sel) == measure_step_flops(model, sel, 2, 16), sel
    with _OpLog() as c:
        model(**{"input_ids": torch.zeros(2, 16, dtype=torch.long)}).logits.sum().backward()
    assert CPU_SDPA + "_backward" in c.ops  # the measurement above did run the fused kernels


def test_sdpa_formulas_eager_equivalent_with_gqa():
    aten = torch.ops.aten
    b, hq, hkv, s_q, s_k, d = 2, 8, 2, 5, 7, 4
    q, k, v = (torch.empty(b, h, s, d, device="meta") for h, s in ((hq, s_q), (hkv, s_k), (hkv, s_k)))
    o = torch.empty(b, hq, s_q, d, device="meta")
    matmul = 2 * b * hq * s_q * s_k * d  # one of QKᵀ, PV; GQA heads broadcast to the query's
    fwd = FLOP_OVERRIDES[aten._scaled_dot_product_flash_attention_for_cpu](q, k, v, out_val=(o, None))
    assert fwd == 2 * matmul
    for op in (aten._scaled_dot_product_flash_attention_for_cpu_backward, aten._scaled_dot_product_flash_attention_backward,
               aten._scaled_dot_product_efficient_attention_backward, aten._scaled_dot_product_cudnn_attention_backward):
        # Outside autograd every gradient counts: the four matmuls, not torch's five (recomputed scores).
        assert FLOP_OVERRIDES[op](o, q, k, v, out_val=(q, k, v)) == 4 * matmul
    shapes = (o.shape, q.shape, k.shape, v.shape)
    assert sdpa_backward_parts(*shapes, (False, False, True)) == [(matmul, (2,))]
    assert sum(f for f, _ in sdpa_backward_parts(*shapes, (True, False, False))) == 2 * matmul  # dP, dQ
    assert [i for _, i in sdpa_backward_parts(*shapes)] == [(0, 1), (0,), (1,), (2,)]


def test_plain_flop_counter_mode_counts_cpu_sdpa():
    from torch.utils.flop_counter import FlopCounterMode
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert fc.get_total_flops() == 3 * 2 * (2 * 2 * 8 * 8 * 4)  # forward + backward (q needs dQ and dK: all 4)


def test_bloom_has_no_sdpa():
    assert not supports_sdpa(tiny_config("bloom")) and supports_sdpa(tiny_config("llama"))


def test_a_full_run_with_fused_attention_measures_exactly_the_full_reference(tmp_path, tiny_model_dir, jsonl,
                                                                              small_rows):
    """--attn-implementation sdpa (the default): measured full fine-tuning equals its meta-device reference."""
    import json
    from greentrainer.cli import main
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--dataset", jsonl(small_rows), "--output-dir", str(out),
                 "--epochs", "1", "--no-progress", "--no-eval", "--method", "full"]) == 0
    t = json.loads((out / "metrics.json").read_text())["totals"]
    assert json.loads((out / "train_config.json").read_text())["attn_implementation"] == "sdpa"
    assert t["flops_total"] == t["flops_full_ft_reference"]
