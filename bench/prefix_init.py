"""Where prefix tuning starts: validation loss of SmolLM2 on SciTLDR without a prefix, with peft's random
prefix, and with the prefix initialised from the model's own keys/values on training prompts (our default).

python bench/prefix_init.py [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import types

import torch

from common import write_results
from greentrainer.methods.peft_methods import PrefixMethod, PrefixMethodConfig
from greentrainer.data import collate, encode_all, load_examples, resolve_dataset
from greentrainer.methods.peft_methods import PeftMethod
from greentrainer.models import load_model


def val_loss(model, data, pad_id) -> float:
    losses = []
    with torch.no_grad():
        for i in range(0, len(data), 4):
            losses.append(model(**collate(data[i: i + 4], pad_id, False)).loss.item())
    return sum(losses) / len(losses)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prefix-tokens", type=int, default=20)
    a = ap.parse_args()
    n_val = 8 if a.quick else 32
    spec, _ = resolve_dataset("scitldr")
    model, tok = load_model("smollm2-135m")
    exs = load_examples("scitldr", "train", 8 + n_val, 42)
    enc = encode_all(exs, tok, spec.task, False, 256)
    train, val = enc[:8], enc[8:]
    rows = [{"prefix": "none (base model)", "val_loss": val_loss(model, val, tok.pad_token_id)}]
    for init in ("random", "data"):
        torch.manual_seed(0)
        m, _ = load_model("smollm2-135m")
        ctx = types.SimpleNamespace(train_data=train, device=torch.device("cpu"), log=print,
                                    count=lambda kind: contextlib.nullcontext())
        pm = PrefixMethod(PrefixMethodConfig(prefix_tokens=a.prefix_tokens, prefix_init=init)).prepare(m, ctx)
        rows.append({"prefix": f"{a.prefix_tokens} tokens, --prefix-init {init}",
                     "val_loss": val_loss(pm, val, tok.pad_token_id)})
        print(rows[-1])
    write_results("prefix_init" + ("_quick" if a.quick else ""), "Prefix tuning: where training starts", rows,
                  ["prefix", "val_loss"], f"SmolLM2-135M, SciTLDR: {n_val} training items (not used to build the "
                  "prefix) scored before any training step; the data prefix comes from the first 8 training prompts.")


if __name__ == "__main__":
    main()
