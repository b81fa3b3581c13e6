"""--report-to tensorboard (offline, in the run folder), --logging-steps, Python logging and --quiet."""
import json

import pytest

from conftest import train_args
from greentrainer.cli import main


def test_tensorboard_logs_loss_lr_flops_and_the_fraction_of_full_ft(tmp_path, tiny_model_dir, data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--method", "greentrainer", "--rho", "0.8", "--epochs", "2",
                           "--no-eval", "--report-to", "tensorboard", "--logging-steps", "2")) == 0
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "flops/total", "flops/fraction_of_full", "trainable/tensors",
            "epoch/val_loss", "epoch/energy_kwh", "epoch/co2_g", "epoch/co2_full_ft_reference_g"} <= tags
    m = json.loads((out / "metrics.json").read_text())
    last = acc.Scalars("epoch/flops_fraction_of_full")[-1].value
    assert last == pytest.approx(m["history"][-1]["flops_fraction_of_full"], rel=1e-5)
    assert acc.Scalars("epoch/co2_g")[-1].value == pytest.approx(m["history"][-1]["co2_g"], rel=1e-5)
    assert [s.step for s in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10]  # 17 items / batch 4: 5 steps an epoch


def test_unknown_or_missing_tracker_is_one_line(capsys, tmp_path, data):
    assert main(train_args("./no/such", data, tmp_path / "r", "--report-to", "carrier-pigeon")) == 2
    assert "unknown tracker" in capsys.readouterr().err


def test_quiet_prints_nothing_but_the_run_completes(capsys, tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--no-eval", "--quiet")) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
