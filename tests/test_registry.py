"""Methods register themselves: a new method is one module, and its options reach the command line, the YAML
files and the run folder without an edit anywhere else."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import greentrainer
from greentrainer.config import TrainConfig, config_from_options, option_names, options_from_config
from greentrainer.errors import UsageError
from greentrainer.methods import registered_methods

TOY = '''"""A toy method: only the final norm trains."""
import dataclasses

from greentrainer.config import Options, option
from greentrainer.errors import UsageError
from greentrainer.methods.base import Method
from greentrainer.methods.registry import register_method


@dataclasses.dataclass
class ToyConfig(Options):
    """Toy knobs."""

    toy_tensor: str = option("model.norm.weight", "the one tensor that trains")
    toy_scale: float = option(1.0, "a number checked like every other option")

    def validate(self):
        self.check_options()
        if self.toy_scale <= 0:
            raise UsageError(f"--toy-scale must be positive, got {self.toy_scale}")


@register_method("toy", config_cls=ToyConfig)
class ToyMethod(Method):
    """Trains one tensor."""

    def prepare(self, model, ctx):
        for n, p in model.named_parameters():
            p.requires_grad_(n == self.cfg.toy_tensor)
        return model

    def __init__(self, cfg):
        self.cfg = cfg
'''


def _cli(args, pythonpath, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, "-m", "greentrainer", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _train(tiny_model_dir, data, out, *extra):
    return ["train", "--model", tiny_model_dir, "--dataset", data, "--output-dir", str(out), "--epochs", "1",
            "--no-eval", "--no-progress", "--lr", "1e-2", "--method", "toy", *extra]


@pytest.fixture(scope="module")
def package_with_toy(tmp_path_factory):
    """A copy of the package with one more module in greentrainer/methods/, and nothing else changed."""
    root = tmp_path_factory.mktemp("pkg")
    shutil.copytree(Path(greentrainer.__file__).parent, root / "greentrainer",
                    ignore=shutil.ignore_patterns("__pycache__", "datasets"))
    (root / "greentrainer" / "methods" / "toy.py").write_text(TOY)
    return root


def _changed_tensors(tiny_model_dir, run):
    from safetensors.torch import load_file
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(run / "model" / "model.safetensors")
    return sorted(n for n in before if n in after and not (before[n] == after[n]).all())


def test_a_method_added_as_one_module_runs_from_the_cli(tmp_path, tiny_model_dir, data, package_with_toy):
    helps = _cli(["train", "--help"], [package_with_toy], tmp_path)
    assert helps.returncode == 0 and "--toy-scale" in helps.stdout and "toy" in helps.stdout
    run = tmp_path / "run"
    r = _cli(_train(tiny_model_dir, data, run, "--toy-scale", "2"), [package_with_toy], tmp_path)
    assert r.returncode == 0, r.stderr
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["method"] == "toy" and saved["method_config"] == {"toy_tensor": "model.norm.weight", "toy_scale": 2.0}
    assert "toy_scale: 2.0" in (run / "train_config.yaml").read_text()
    assert _changed_tensors(tiny_model_dir, run) == ["model.norm.weight"]
    # its options come from YAML too, and the run folder's train_config.yaml re-runs it
    again = tmp_path / "again"
    r = _cli(["train", "--config", str(run / "train_config.yaml"), "--output-dir", str(again)], [package_with_toy],
             tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((again / "train_config.json").read_text())["method_config"] == saved["method_config"]


@pytest.mark.parametrize("extra,needle", [(["--toy-scale", "abc"], "expected a number"),
                                          (["--toy-scale", "-1"], "--toy-scale must be positive"),
                                          (["--toy-scale", "nan"], "finite")])
def test_a_new_methods_bad_values_are_one_line(tmp_path, tiny_model_dir, data, package_with_toy, extra, needle):
    r = _cli(_train(tiny_model_dir, data, tmp_path / "r", *extra), [package_with_toy], tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_a_method_in_another_package_registers_through_an_entry_point(tmp_path, tiny_model_dir, data):
    site = tmp_path / "site"
    (site / "toy_plugin").mkdir(parents=True)
    (site / "toy_plugin" / "__init__.py").write_text(TOY)
    info = site / "toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[greentrainer.methods]\ntoy = toy_plugin\n")
    run = tmp_path / "run"
    r = _cli(_train(tiny_model_dir, data, run), [site], tmp_path)
    assert r.returncode == 0, r.stderr
    assert _changed_tensors(tiny_model_dir, run) == ["model.norm.weight"]


def test_a_broken_plugin_is_one_warning_and_the_rest_still_works(tmp_path):
    site = tmp_path / "site"
    info = site / "broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[greentrainer.methods]\nbroken = no_such_module_here\n")
    r = _cli(["train", "--method", "full", "--lr", "0", "--output-dir", str(tmp_path / "r")], [site], tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 2, r.stderr
    assert "plug-in broken" in lines[0] and "--lr must be positive" in lines[1]


def test_every_builtin_method_is_registered_with_its_options():
    methods = registered_methods()
    assert list(methods)[0] == "greentrainer"
    assert {"greentrainer", "full", "top2", "lora", "dora", "prefix", "smt"} <= set(methods)
    names = option_names()
    assert len(names) == len(set(names))
    for flat in ("rho", "selector_resolution", "lora_r", "prefix_tokens", "smt_warmup", "no_eval", "lr"):
        assert flat in names
    cfg = config_from_options({"method": "smt", "smt_warmup": 3, "rho": 0.5, "no_eval": True})
    assert cfg.method_config.warmup_steps == 3 and cfg.do_eval is False  # rho belongs to another method
    assert options_from_config(cfg)["smt_warmup"] == 3 and "rho" not in options_from_config(cfg)


def test_options_that_clash_are_refused_at_registration():
    import dataclasses

    from greentrainer.config import Options, option
    from greentrainer.methods.base import Method
    from greentrainer.methods.registry import register_method

    @dataclasses.dataclass
    class Clash(Options):
        rho: float = option(0.5, "the same flat name as GreenTrainer's")

    with pytest.raises(ValueError, match="rho"):
        register_method("clash", config_cls=Clash)(type("ClashMethod", (Method,), {}))
    assert "clash" not in registered_methods()


@pytest.mark.parametrize("kw,needle", [({"lr": "fast"}, "--lr must be a number"), ({"epochs": 1.5}, "whole number"),
                                       ({"precision": "fp8"}, "--precision must be one of"),
                                       ({"method": "magic"}, "unknown method")])
def test_the_api_checks_values_like_the_command_line(kw, needle):
    with pytest.raises(UsageError, match=needle):
        TrainConfig(**kw).validate()


def test_each_method_has_its_own_default_lr_and_lr_overrides_it():
    for name, spec in registered_methods().items():
        assert TrainConfig(method=name).lr == spec.method_cls.default_lr > 0
    assert config_from_options({"method": "lora", "lr": 2e-5}).lr == 2e-5  # the paper's, one option away
    with pytest.raises(UsageError, match="unknown option.*do_eval"):  # a field's name, not its option (no_eval):
        config_from_options({"method": "full", "do_eval": False})    # refused, never silently dropped


def test_default_lrs_and_settings_are_the_validation_sweeps_winners():
    """The defaults in code are the winners of bench/accuracy.py's validation sweep (its committed table); a
    variant swept on its own (e.g. GreenTrainer's frontier step policy) is its method with what it sets."""
    sweep = Path(__file__).parent.parent / "bench" / "results" / "accuracy_sweep_scitldr.json"
    if not sweep.is_file():
        pytest.skip("the validation sweep has not been committed yet")
    winners = json.loads(sweep.read_text())["winners"]
    assert winners
    for name, w in winners.items():
        cfg = config_from_options({"method": w.get("method", name), **w.get("variant", {})})
        assert cfg.lr == w["lr"], name
        opts = options_from_config(cfg)
        assert {k: opts[k] for k in w["options"]} == w["options"], name
