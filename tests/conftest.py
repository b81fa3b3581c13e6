import json
import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the slow end-to-end tests (the benchmarks' --quick modes; CI runs them)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end test of a minute or more (a benchmark's --quick mode); "
                                       "skipped unless --slow, GREENTRAINER_SLOW_TESTS=1 or CI is set")


def _run_slow(config) -> bool:
    return bool(config.getoption("--slow") or os.environ.get("GREENTRAINER_SLOW_TESTS") == "1"
                or os.environ.get("CI", "").lower() not in ("", "0", "false"))


def pytest_collection_modifyitems(config, items):
    if _run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --slow (CI runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
def tiny_moe_dir(tmp_path_factory):
    """A tiny mixture-of-experts model (Qwen3-MoE: 4 experts, 2 per token)."""
    return _save_tiny(tmp_path_factory, "qwen3_moe")


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


def wait_for_checkpoint(run_dir, proc, step: int, timeout: float = 300) -> None:
    """Until ``run_dir``'s checkpoint is a mid-epoch one at ``step`` or later (or ``proc`` ended)."""
    import time
    from pathlib import Path
    meta = Path(run_dir) / "checkpoint" / "meta.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            m = json.loads(meta.read_text())
            if m["global_step"] >= step and m["steps_done_in_epoch"]:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)


def one_line(capsys, argv, code=2):
    """Run the CLI: it exits with ``code`` and one error line on stderr (returned)."""
    from greentrainer.cli import main
    rc = main(argv)
    e = capsys.readouterr().err.strip()
    assert rc == code, e
    assert len(e.splitlines()) == 1 and e.startswith("greentrainer: error:"), e
    return e


def train_args(model, data, out, *extra):
    """`greentrainer train` arguments for a fast one-epoch full fine-tuning run on a tiny model."""
    return ["train", "--model", model, "--dataset", data, "--output-dir", str(out), "--epochs", "1",
            "--no-progress", "--num-beams", "1", "--max-new-tokens", "4", "--method", "full", *extra]
