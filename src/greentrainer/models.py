"""Model loading: the packaged default (SmolLM2-135M-Instruct GGUF), a local folder, or a hub name."""
from __future__ import annotations

import importlib.util
import os

import torch

from .errors import UsageError, one_line
from .files import save_dir_atomic
from .model_cache import PACKAGED, cache_root


def packaged_model_dir(name: str) -> tuple[str, str]:
    """Folder and GGUF file name of a packaged model: the model cache's copy (``cache_root()/gguf/``) first,
    else an installed package that holds the file (found without importing the package)."""
    from .model_files import cached_gguf, install_command
    pkg, gguf, _requirement, _sha256 = PACKAGED[name]
    cached = cached_gguf(name)
    if cached is not None:
        return str(cached.parent), gguf
    spec = importlib.util.find_spec(pkg)
    if spec is not None and spec.origin and os.path.isfile(os.path.join(os.path.dirname(spec.origin), gguf)):
        return os.path.dirname(spec.origin), gguf
    raise UsageError(f"default model '{name}' ({gguf}) is not in the model cache {cache_root() / 'gguf'}; "
                     f"run: {install_command(name)}")


def _hub_error(name: str, err: Exception) -> UsageError:
    msg = one_line(err)
    if os.path.exists(name):
        return UsageError(f"cannot load model from folder {name}: {msg}")
    return UsageError(f"model {name!r} is not a packaged model ({', '.join(PACKAGED)}) or a local folder, "
                      f"and could not be fetched from the Hugging Face Hub (offline?): {msg}")


def _check_name(name: str) -> None:
    if name in PACKAGED or os.path.isdir(name):
        return
    if os.path.exists(name):
        raise UsageError(f"--model {name}: a file, not a model folder")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"model folder not found: {name}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def describe_load_error(name: str, err: Exception) -> UsageError:
    """One line for a model folder that cannot be loaded: unsafe pickle, truncated file, bad config."""
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(x).__name__} {x}" for x in chain)
    if "UnpicklingError" in text or "weights_only" in text or "Weights only load failed" in text:
        return UsageError(f"{name}: the checkpoint is a pickle file that is not a safe weights-only checkpoint "
                          f"(it may run code when loaded); convert it to safetensors and try again")
    if "SafetensorError" in text or "safetensors" in text.lower() and ("header" in text or "incomplete" in text):
        return UsageError(f"{name}: the safetensors file is damaged or truncated ({one_line(err)})")
    return _hub_error(name, err)


def _from_hub(loader, name: str, **kw):
    """Load from a local folder, the local HF cache, or (when online) the hub; one clear error otherwise."""
    if os.path.isdir(name):
        try:
            return loader(name, **kw)
        except Exception as e:  # noqa: BLE001  (transformers raises many types for a damaged folder)
            raise describe_load_error(name, e) from None
    try:
        return loader(name, local_files_only=True, **kw)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise UsageError(f"model {name!r} is not a packaged model ({', '.join(PACKAGED)}), a local folder or "
                         f"in the local Hugging Face cache, and the Hugging Face Hub cannot be reached (offline)")
    try:
        return loader(name, **kw)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from None


def load_config(name: str):
    """A model's config only (no weights): enough to profile FLOPs of any size of model."""
    from transformers import AutoConfig
    _check_name(name)
    if name in PACKAGED:
        for cached in (cache_root() / "models" / name, cache_root() / "models" / f"{name}.config"):
            if (cached / "config.json").exists():
                return AutoConfig.from_pretrained(cached)
        folder, gguf = packaged_model_dir(name)
        cfg = AutoConfig.from_pretrained(folder, gguf_file=gguf)
        _drop_quant(cfg)
        try:  # reading the GGUF header is slow; keep the config for the next profile
            cfg.save_pretrained(cache_root() / "models" / f"{name}.config")
        except OSError:
            pass
        return cfg
    return _from_hub(AutoConfig.from_pretrained, name)


def _drop_quant(cfg) -> None:
    # GGUF weights are dequantised to float: the saved model must not claim to be quantised.
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None


def is_seq2seq(model_or_config) -> bool:
    cfg = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(cfg, "is_encoder_decoder", False))


def load_model(name: str, dtype=torch.float32, attn_implementation: str = "sdpa",
               experts_implementation: str | None = None):
    """Load (model, tokenizer) in float32; fused (SDPA) attention where transformers has it for the model,
    else eager. Both are counted exactly (greentrainer.flops registers the fused kernels' FLOPs), as are the
    experts kernels of a mixture-of-experts model (``experts_implementation``: transformers' default, else
    grouped_mm, eager or batched_mm)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    _check_name(name)
    if name in PACKAGED:
        folder = cache_root() / "models" / name
        if not (folder / "config.json").exists():
            src, gguf = packaged_model_dir(name)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
            _drop_quant(model.config)
            model.hf_quantizer = None  # weights are plain float32 tensors after dequantisation
            model.is_quantized = False
            try:  # dequantising takes ~20 s; keep a float copy for next time
                save_dir_atomic(folder, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
            except OSError:
                folder = None
            if folder is None:
                model.config._attn_implementation = _attention(model.config, attn_implementation)
                return _finish(model.to(dtype), tok)
        name = str(folder)
    cfg = _from_hub(AutoConfig.from_pretrained, name)
    cls = AutoModelForSeq2SeqLM if is_seq2seq(cfg) else AutoModelForCausalLM
    experts = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model, info = _from_hub(cls.from_pretrained, name, dtype=dtype,
                            attn_implementation=_attention(cfg, attn_implementation),
                            output_loading_info=True, **experts)
    check_loading_info(name, info)
    tok = _from_hub(AutoTokenizer.from_pretrained, name)
    return _finish(model, tok)


def _attention(cfg, wanted: str) -> str:
    from .flops import supports_sdpa
    return "eager" if wanted == "sdpa" and not supports_sdpa(cfg) else wanted


def check_loading_info(name: str, info: dict) -> None:
    """Missing weights would be silently random: refuse them. Unexpected ones are ignored: say so."""
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        keys = missing + [k[0] if isinstance(k, (tuple, list)) else k for k in mismatched]
        raise UsageError(f"model {name}: {len(keys)} weight(s) missing from the checkpoint or of the wrong shape "
                         f"(e.g. {keys[0]}); they would be randomly initialised, so refusing to load it")
    if unexpected:
        from .errors import warn
        warn(f"model {name}: {len(unexpected)} tensor(s) in the checkpoint are not used by the model and are "
             f"ignored (e.g. {unexpected[0]})")


def check_input_length(cfg, max_input_length: int) -> None:
    """--max-input-length must fit the model's learned positions (relative-position models have no limit)."""
    if getattr(cfg, "is_encoder_decoder", False) and getattr(cfg, "model_type", "") == "t5":
        return
    n_pos = next((getattr(cfg, a) for a in ("max_position_embeddings", "n_positions", "max_seq_len")
                  if isinstance(getattr(cfg, a, None), int)), None)
    if n_pos is not None and max_input_length > n_pos:
        raise UsageError(f"--max-input-length {max_input_length} exceeds this model's {n_pos} positions")


def _finish(model, tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA GPU is available")
    return torch.device(device)


def tiny_config(arch: str, size: str = "tiny"):
    """Randomly initialisable configs built in code: llama, opt, bloom, gpt2, qwen2, t5, and the mixture-of-experts
    mixtral, qwen3_moe and olmoe (4 experts, 2 per token).

    ``tiny`` (hidden 64, 2 layers; vocabulary and special ids match :func:`tiny_tokenizer`) trains in
    seconds; ``small`` (hidden 512, 4 layers) has realistic proportions for FLOPs checks on the meta device.
    """
    from transformers import (BloomConfig, GPT2Config, LlamaConfig, MixtralConfig, OlmoeConfig, OPTConfig,
                              Qwen2Config, Qwen3MoeConfig, T5Config)
    h, f, n, heads, vocab = (64, 128, 2, 4, 260) if size == "tiny" else (512, 2048, 4, 8, 8192)
    base = dict(vocab_size=vocab, pad_token_id=256, eos_token_id=257, bos_token_id=257)
    if arch == "llama":
        return LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
                           num_key_value_heads=heads // 2, tie_word_embeddings=True, max_position_embeddings=512,
                           **base)
    if arch == "opt":
        return OPTConfig(hidden_size=h, ffn_dim=f, num_hidden_layers=n, num_attention_heads=heads,
                         word_embed_proj_dim=h, max_position_embeddings=512, **base)
    if arch == "bloom":
        return BloomConfig(hidden_size=h, n_layer=n, n_head=heads, **base)
    if arch == "gpt2":
        return GPT2Config(n_embd=h, n_layer=n, n_head=heads, n_positions=512, **base)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
                           num_key_value_heads=heads // 2, max_position_embeddings=512, tie_word_embeddings=False,
                           **base)
    if arch == "t5":
        return T5Config(d_model=h, d_ff=f, d_kv=h // heads, num_layers=n, num_decoder_layers=n, num_heads=heads,
                        decoder_start_token_id=256, **base)
    moe = dict(num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=heads // 2, hidden_size=h,
               num_experts_per_tok=2, max_position_embeddings=512, **base)
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=f, num_local_experts=4, **moe)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=f, moe_intermediate_size=f // 2, num_experts=4, head_dim=h // heads,
                              **moe)
    if arch == "olmoe":
        return OlmoeConfig(intermediate_size=f // 2, num_experts=4, **moe)
    raise ValueError(f"no tiny config for {arch!r}")


def tiny_tokenizer():
    """A byte-level tokenizer built in code (256 bytes + <pad>, </s>), for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    vocab["</s>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")
