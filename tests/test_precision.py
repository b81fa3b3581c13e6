"""Every method trains under every precision (--precision 32-true, bf16-mixed, bf16-true, 16-mixed)."""
import math

import pytest
import torch

from conftest import make_tiny
from greentrainer.config import config_from_options
from greentrainer.data import Example, encode_all
from greentrainer.loop import train
from greentrainer.methods import build_method
from greentrainer.models import tiny_tokenizer

TOK = tiny_tokenizer()
DATA = encode_all([Example(source=f"the quick brown fox {i} jumps over the lazy dog", target=f"fox {i % 3}",
                           targets=["x"]) for i in range(16)], TOK, "summarization", False, 64)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-mixed"])
@pytest.mark.parametrize("method", ["full", "greentrainer", "top2", "lora", "dora", "prefix", "smt"])
def test_every_method_trains_under_every_precision(method, precision):
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config_from_options(dict(method=method, precision=precision, epochs=2, batch_size=4, lr=1e-3, seed=0,
                                   rho=0.8, smt_warmup=2, smt_block=16))
    m = build_method(cfg)
    out = train(model, TOK, m, DATA, DATA[:4], cfg, torch.device("cpu"), log=lambda *a: None, progress=False)
    trained = m.finalize(out["model"])
    assert all(math.isfinite(h["train_loss"]) for h in out["history"])
    assert out["totals"]["precision"] == precision
    params = dict(trained.named_parameters())
    if precision == "bf16-true":  # bf16 weights: half the memory
        assert all(p.dtype == torch.bfloat16 for p in params.values())
    if method == "prefix":  # the prefix starts from the data; it trains and stays finite
        assert any("prompt_encoder" in n for n in params) and out["totals"]["trainable_params"] > 0
    elif method in ("lora", "dora"):  # peft starts lora_B at zero: trained adapters are non-zero
        assert any("lora_B" in n and p.float().abs().sum() > 0 for n, p in params.items()), "nothing trained"
    else:
        changed = [n for n, p in params.items() if n in before and not torch.equal(p.float(), before[n].float())]
        assert changed, "nothing trained"
    assert all(torch.isfinite(p.float()).all() for p in params.values())
