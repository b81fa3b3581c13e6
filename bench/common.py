"""Shared helpers for the benchmark scripts: result files and model configs built in code."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import os

RESULTS = Path(os.environ.get("GREENTRAINER_BENCH_RESULTS", Path(__file__).parent / "results"))


def big_configs(quick: bool = False) -> dict:
    """Configs of the paper's models (no weights needed: profiles run on the meta device)."""
    from transformers import BloomConfig, LlamaConfig, OPTConfig, T5Config
    from greentrainer.models import load_config
    cfgs = {"SmolLM2-135M": load_config("smollm2-135m")}
    if quick:
        return cfgs
    cfgs["OPT-2.7B"] = OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                                 vocab_size=50272, word_embed_proj_dim=2560, max_position_embeddings=2048)
    cfgs["BLOOMZ-3B"] = BloomConfig(hidden_size=2560, n_layer=30, n_head=32, vocab_size=250880)
    cfgs["FLAN-T5-3B"] = T5Config(d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_decoder_layers=24,
                                  num_heads=32, feed_forward_proj="gated-gelu", vocab_size=32128,
                                  tie_word_embeddings=False, decoder_start_token_id=0)
    cfgs["LLaMA-7B"] = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                   tie_word_embeddings=False)
    return cfgs


def machine() -> str:
    import torch
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_results(name: str, title: str, rows: list[dict], columns: list[str], notes: str = "",
                  extra: dict | None = None) -> None:
    """bench/results/<name>.{json,md}: the rows as JSON and as a markdown table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, **(extra or {})}, indent=1,
                                                     default=str))
    lines = [f"# {title}", "", f"`{meta['command']}` — {meta['date']}, {meta['machine']}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
