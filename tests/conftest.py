import json

import pytest
import torch


def make_tiny(arch="llama"):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from greentrainer.models import tiny_config
    cfg = tiny_config(arch)
    torch.manual_seed(0)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_config(cfg, attn_implementation="eager")


def _save_tiny(tmp_path_factory, arch):
    """A tiny model of ``arch`` + byte tokenizer saved as a local Hugging Face folder."""
    from greentrainer.models import tiny_tokenizer
    d = tmp_path_factory.mktemp(f"tiny_{arch}")
    make_tiny(arch).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory, "t5")


@pytest.fixture
def jsonl(tmp_path):
    def write(rows, name="data.jsonl"):
        p = tmp_path / name
        p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return str(p)
    return write


@pytest.fixture
def small_rows():
    return [{"source": f"the cat number {i} sat on the mat and looked at the dog", "target": f"cat {i} sat"}
            for i in range(20)]


@pytest.fixture
def data(jsonl, small_rows):
    """A user JSONL of 20 small rows."""
    return jsonl(small_rows)


def train_args(model, data, out, *extra):
    """`greentrainer train` arguments for a fast one-epoch full fine-tuning run on a tiny model."""
    return ["train", "--model", model, "--dataset", data, "--output-dir", str(out), "--epochs", "1",
            "--no-progress", "--num-beams", "1", "--max-new-tokens", "4", "--method", "full", *extra]
