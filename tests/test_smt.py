import json

import pytest
import torch
from torch import nn

from conftest import make_tiny
from greentrainer.config import TrainConfig
from greentrainer.methods.smt import SMTConfig
from greentrainer.errors import UsageError
from greentrainer.methods.smt import SMTMethod, block_means, effective_block_size, find_targets, select_blocks
from greentrainer.smt_layer import SMTLinear, _blocks_of, saved_activation_bytes


def test_sparse_layer_gradients_equal_dense_restricted_to_blocks_float64():
    torch.manual_seed(0)
    dense = nn.Linear(12, 8, bias=True).double()
    blocks = [(0, 1), (1, 2), (1, 0)]  # l = 4: rows 0..1, cols 0..2
    sparse = SMTLinear(nn.Linear(12, 8, bias=True).double(), blocks, 4)
    with torch.no_grad():
        sparse.linear.weight.copy_(dense.weight)
        sparse.linear.bias.copy_(dense.bias)
        sparse.blocks.copy_(_blocks_of(sparse.linear.weight, 4)[sparse.rows, sparse.cols])
    x = torch.randn(2, 3, 5, 12, dtype=torch.float64, requires_grad=True)  # any rank
    x2 = x.detach().clone().requires_grad_(True)
    y_dense, y_sparse = dense(x), sparse(x2)
    assert torch.allclose(y_dense, y_sparse)
    g = torch.randn_like(y_dense)
    y_dense.backward(g)
    y_sparse.backward(g)
    assert torch.allclose(x.grad, x2.grad)
    W = dense.weight.grad.view(2, 4, 3, 4).permute(0, 2, 1, 3)
    for k, (r, c) in enumerate(blocks):
        assert torch.allclose(sparse.blocks.grad[k], W[r, c])
    assert sparse.linear.weight.grad is None and sparse.linear.bias.grad is None
    # a step changes only the selected blocks of the dense weight
    before = sparse.linear.weight.detach().clone()
    torch.optim.SGD([sparse.blocks], lr=0.1).step()
    sparse.write_blocks()
    changed = (sparse.linear.weight != before).view(2, 4, 3, 4).permute(0, 2, 1, 3).any(-1).any(-1)
    expect = torch.zeros(2, 3, dtype=torch.bool)
    for r, c in blocks:
        expect[r, c] = True
    assert torch.equal(changed, expect)


def test_sparse_layer_saves_only_needed_input_columns_and_honours_needs_input_grad():
    layer = SMTLinear(nn.Linear(16, 8), [(0, 3)], 4)
    x = torch.randn(5, 16)  # input needs no grad
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert (5, 1, 4) in saved  # one column block of 4, not the whole input
    y.sum().backward()
    assert layer.blocks.grad is not None and x.grad is None


def test_block_selection_uses_mean_abs_grad_and_budget():
    g = torch.zeros(8, 8)
    g[0:4, 4:8] = 1.0
    g[4:8, 0:4] = torch.tensor([3.0, -3.0] * 8).view(4, 4).abs()  # signs cancel in |mean|, not in mean |g|
    scores = {"a": block_means(g.abs(), 4)}
    assert select_blocks(scores, 1) == {"a": [(1, 0)]}
    assert effective_block_size([(576, 576), (192, 576), (1536, 576)], 256) == 192


def test_smt_trains_only_selected_blocks_and_saves_a_plain_model(tmp_path):
    from greentrainer.data import Example, encode_all
    from greentrainer.loop import train
    from greentrainer.models import tiny_tokenizer
    tok = tiny_tokenizer()
    model = make_tiny("llama")
    exs = [Example(f"the fox {i} jumps over the dog", f"fox {i}", [f"fox {i}"]) for i in range(16)]
    data = encode_all(exs, tok, "summarization", False, 64)
    cfg = TrainConfig(method="smt", epochs=2, lr=1e-3,
                      method_config=SMTConfig(warmup_steps=2, params_percent=1.0, block_size=16, targets="q,k,v"))
    method = SMTMethod(cfg.method_config)
    from greentrainer.loop import RunHandle
    handle = RunHandle()
    out = train(model, tok, method, data, data[:4], cfg, torch.device("cpu"), log=lambda *a: None,
                progress=False, handle=handle)
    rep = out["history"][0]["smt"]
    assert rep["selected_params"] <= rep["budget_params"] and rep["n_blocks"] >= 1
    state_numel = sum(v.numel() for s in handle.optimizer.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    assert state_numel == 2 * rep["selected_params"]  # Adam moments over the selected blocks only
    model = method.finalize(out["model"])
    assert not any(isinstance(m, SMTLinear) for m in model.modules())
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_bad_smt_input():
    with pytest.raises(UsageError, match="unknown target"):
        SMTConfig(targets="q,zz").validate()
    with pytest.raises(UsageError, match="percentage"):
        SMTConfig(params_percent=0).validate()
    with pytest.raises(UsageError, match="percentage"):
        SMTConfig(params_percent=150).validate()
    with pytest.raises(UsageError, match="block size"):
        SMTConfig(block_size=0).validate()
    with pytest.raises(UsageError, match="no separate nn.Linear"):
        find_targets(make_tiny("gpt2"), ["q"])  # GPT-2 fuses Q/K/V into one Conv1D


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_smt_via_cli_on_tiny_models(which, tmp_path, tiny_model_dir, tiny_t5_dir, jsonl, small_rows, capsys):
    from greentrainer.cli import main
    out = tmp_path / "run"
    model_dir = tiny_model_dir if which == "llama" else tiny_t5_dir
    assert main(["train", "--model", model_dir, "--dataset", jsonl(small_rows), "--output-dir", str(out),
                 "--epochs", "2", "--no-progress", "--num-beams", "1", "--max-new-tokens", "4", "--method", "smt",
                 "--smt-warmup", "2", "--smt-block", "16", "--smt-params", "2", "--lr", "1e-3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    rep = m["history"][0]["smt"]
    assert rep["block_size"] == 16 and rep["selected_params"] <= rep["budget_params"]
    assert abs(sum(rep["budget_share_by_kind"].values()) - 1) < 1e-9
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(out / "model").model_type == ("llama" if which == "llama" else "t5")


def test_smt_warmup_longer_than_the_run_is_rejected(tmp_path, tiny_model_dir, jsonl, small_rows, capsys):
    from greentrainer.cli import main
    code = main(["train", "--model", tiny_model_dir, "--dataset", jsonl(small_rows), "--output-dir",
                 str(tmp_path / "r"), "--epochs", "1", "--method", "smt", "--smt-warmup", "100", "--no-progress"])
    assert code == 2 and "--smt-warmup" in capsys.readouterr().err


def test_sparse_weight_gradient_flops_scale_with_selected_blocks():
    from greentrainer.flops import FlopCounter
    x = torch.randn(64, 256)
    counts = {}
    for nb in (1, 2, 4):
        layer = SMTLinear(nn.Linear(256, 256, bias=False), [(i, i) for i in range(nb)], 64)
        y = layer(x)  # input needs no grad: backward is the weight-gradient work only
        with FlopCounter() as c:
            y.sum().backward()
        counts[nb] = c.total
    assert counts[1] == 2 * 64 * 64 * 64  # one 64x64 block over 64 rows
    assert counts[2] == 2 * counts[1] and counts[4] == 4 * counts[1]
    y = nn.Linear(256, 256, bias=False)(x)
    with FlopCounter() as c:
        y.sum().backward()
    assert counts[4] / c.total == pytest.approx(4 / 16)  # 4 of 16 blocks


# --- bf16 and shared saved inputs ------------------------------------------------------------------------

ALL_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def _tiny_smt(kinds=("q", "k", "v"), share=True, blocks=None):
    """Tiny llama with SMT layers (l = 16) on ``kinds``; by default q, k and v use the same column blocks."""
    from greentrainer.methods.smt import install_layers
    model = make_tiny("llama")
    targets = find_targets(model, list(kinds))
    chosen = {n: (blocks or {}).get(k, [(0, 1), (1, 3)]) for n, k in targets.items()}
    return model, install_layers(model, chosen, 16, targets, share_inputs=share)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def test_shared_inputs_give_identical_gradients_and_save_a_third_of_the_qkv_input_bytes():
    batch = _batch()
    grads, nbytes = {}, {}
    for share in (False, True):
        model, layers = _tiny_smt(("q", "k", "v"), share=share,
                                  blocks={"q": [(0, 1), (2, 3), (1, 1)], "k": [(0, 3), (1, 1)], "v": [(1, 1), (0, 3)]})
        loss, nbytes[share], _ = saved_activation_bytes(model, lambda: model(**batch).loss)
        loss.backward()
        grads[share] = {n: layer.blocks.grad for n, layer in layers.items()}
        if share:  # the cache holds nothing past the backward
            assert all(layer.share._saved() is None for layer in layers.values())
    assert grads[False].keys() == grads[True].keys() and len(grads[True]) == 6  # 2 layers x q, k, v
    for n in grads[True]:
        assert torch.equal(grads[False][n], grads[True][n]), n
    assert nbytes[False] == 3 * nbytes[True]  # q, k and v each need column blocks {1, 3} of the same input


def test_layers_sharing_a_group_but_not_an_input_each_save_their_own_columns():
    from greentrainer.smt_layer import share_inputs
    torch.manual_seed(0)
    a, b = SMTLinear(nn.Linear(16, 8), [(0, 1)], 4), SMTLinear(nn.Linear(16, 8), [(1, 2), (0, 1)], 4)
    ref_b = SMTLinear(nn.Linear(16, 8), [(1, 2), (0, 1)], 4)
    ref_b.load_state_dict(b.state_dict())
    share = share_inputs([a, b])
    assert a.col_blocks.tolist() == b.col_blocks.tolist() == [1, 2] and a.share is b.share is share
    x = torch.randn(3, 16, requires_grad=True) * 1  # a non-leaf: it may change in place
    ya = a(x)
    with torch.no_grad():
        x.mul_(2)  # same tensor, new version: b must not reuse a's saved columns
    yb = b(x)
    (ya.sum() + yb.sum()).backward()
    yr = ref_b(x.detach())
    yr.sum().backward()
    assert torch.equal(b.blocks.grad, ref_b.blocks.grad)
    y1, y2 = a(torch.randn(3, 16)), b(torch.randn(3, 16))  # different inputs: no reuse, still right
    (y1.sum() + y2.sum()).backward()
    with pytest.raises(ValueError, match="column blocks"):
        a.set_share(share, [2])


def test_input_groups_put_readers_of_one_input_together():
    from greentrainer.methods.smt import input_groups
    t = {"l.0.attn.q_proj": "q", "l.0.attn.k_proj": "k", "l.0.attn.v_proj": "v", "l.0.attn.o_proj": "o",
         "l.0.mlp.gate_proj": "gate", "l.0.mlp.up_proj": "up", "l.0.mlp.down_proj": "down",
         "l.1.attn.q_proj": "q", "d.1.EncDecAttention.q": "q", "d.1.EncDecAttention.k": "k",
         "d.1.EncDecAttention.v": "v"}
    groups = sorted(sorted(g) for g in input_groups(t))
    assert groups == sorted([["l.0.attn.k_proj", "l.0.attn.q_proj", "l.0.attn.v_proj"], ["l.0.attn.o_proj"],
                             ["l.0.mlp.gate_proj", "l.0.mlp.up_proj"], ["l.0.mlp.down_proj"], ["l.1.attn.q_proj"],
                             ["d.1.EncDecAttention.q"], ["d.1.EncDecAttention.k", "d.1.EncDecAttention.v"]])


@pytest.mark.parametrize("share", [False, True])
def test_smt_under_cpu_bf16_autocast_trains_a_step_close_to_fp32(share):
    batch = _batch()
    ref, ref_layers = _tiny_smt(ALL_KINDS, share=share)
    ref(**batch).loss.backward()
    model, layers = _tiny_smt(ALL_KINDS, share=share)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    for n, layer in layers.items():
        g, r = layer.blocks.grad, ref_layers[n].blocks.grad
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
        assert (g - r).norm() <= 0.05 * r.norm(), n
    opt = torch.optim.AdamW([layer.blocks for layer in layers.values()], lr=1e-3)
    opt.step()
    for layer in layers.values():
        layer.write_blocks()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(**batch).loss)


def test_smt_layer_with_bf16_weights_gives_bf16_gradients():
    batch = _batch()
    ref, ref_layers = _tiny_smt(ALL_KINDS)
    ref(**batch).loss.backward()
    model, layers = _tiny_smt(ALL_KINDS)
    model.to(torch.bfloat16)
    model(**batch).loss.backward()
    for n, layer in layers.items():
        g, r = layer.blocks.grad, ref_layers[n].blocks.grad
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), n
        assert (g.float() - r).norm() <= 0.1 * r.norm(), n


def test_smt_trains_end_to_end_with_bf16():
    from greentrainer.data import Example, encode_all
    from greentrainer.loop import train
    from greentrainer.models import tiny_tokenizer
    tok = tiny_tokenizer()
    exs = [Example(f"the fox {i} jumps over the dog", f"fox {i}", [f"fox {i}"]) for i in range(16)]
    data = encode_all(exs, tok, "summarization", False, 64)
    cfg = TrainConfig(method="smt", epochs=2, lr=1e-3, bf16=True,
                      method_config=SMTConfig(warmup_steps=2, params_percent=10.0, block_size=16, targets="q,k,v,gate,up"))
    method = SMTMethod(cfg.method_config)
    out = train(make_tiny("llama"), tok, method, data, data[:4], cfg, torch.device("cpu"), log=lambda *a: None,
                progress=False)
    assert method.layers and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in out["history"])
    groups = {id(layer.share) for layer in method.layers.values()}
    assert len(groups) < len(method.layers)  # some layers read one input and share its saved columns
