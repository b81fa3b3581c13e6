"""greentrainer train --config run.yaml: every option from a file, the command line overriding it, and each
run folder's train_config.yaml re-running that run exactly."""
import json

import pytest

from conftest import train_args
from greentrainer.cli import main


def test_train_config_yaml_reruns_the_run_exactly(tmp_path, tiny_model_dir, data):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(train_args(tiny_model_dir, data, first, "--method", "greentrainer", "--rho", "0.8", "--no-eval",
                           "--lr", "1e-3")) == 0
    assert main(["train", "--config", str(first / "train_config.yaml"), "--output-dir", str(again),
                 "--no-progress"]) == 0
    a, b = (json.loads((d / "train_config.json").read_text()) for d in (first, again))
    assert {k: v for k, v in a.items() if k != "output_dir"} == {k: v for k, v in b.items() if k != "output_dir"}
    assert (first / "model" / "model.safetensors").read_bytes() == (again / "model" / "model.safetensors").read_bytes()


def test_the_command_line_overrides_the_file(tmp_path, tiny_model_dir, data):
    conf = tmp_path / "run.yaml"
    conf.write_text(f"model: {tiny_model_dir}\ndataset: {data}\nmethod: greentrainer\nrho: 0.9\nepochs: 1\n"
                    f"no_eval: true\nlr: 0.001\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(conf), "--rho", "0.8", "--output-dir", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["method_config"]["rho"] == 0.8 and cfg["lr"] == 0.001 and cfg["do_eval"] is False


@pytest.mark.parametrize("text,needle", [
    ("rhoo: 0.5\n", "unknown option"), ("rho: fast\n", "expected a number"), ("epochs: 1.5\n", "epochs"),
    ("lr: .inf\n", "finite"), ("method: magic\n", "must be one of"), ("no_eval: 3\n", "true or false"),
    ("- just\n- a list\n", "mapping"), ("rho: [0.5\n", "YAML"),
])
def test_bad_config_files_are_one_line(capsys, tmp_path, text, needle):
    conf = tmp_path / "bad.yaml"
    conf.write_text(text)
    assert main(["train", "--config", str(conf), "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r").exists()
