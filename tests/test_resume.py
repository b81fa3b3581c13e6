"""Checkpoint and resume: a run killed (-9) after a mid-epoch checkpoint and resumed ends exactly where the
uninterrupted run ends (after torchtune's test_training_state_on_resume)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_for_checkpoint
from greentrainer.cli import main


def args(model, data, out, method):
    extra = {"greentrainer": ["--rho", "0.8"], "frontier": ["--rho", "0.8", "--step-policy", "frontier"],
             "fewer": ["--rho", "0.9", "--step-policy", "fewer"],
             "smt": ["--smt-warmup", "4", "--smt-block", "16"],
             "grouped": ["--rho", "0.8", "--group-by-length"],
             "packed": ["--rho", "0.8", "--packing", "--max-input-length", "128", "--batch-size", "2"],
             "moe": ["--rho", "0.8"]}[method]
    method = "greentrainer" if method in ("frontier", "fewer", "grouped", "packed", "moe") else method
    return ["train", "--model", model, "--dataset", data, "--output-dir", str(out), "--epochs", "12",
            "--save-every", "3", "--no-progress", "--no-eval", "--method", method, "--lr", "1e-3", *extra]


@pytest.mark.parametrize("method", ["greentrainer", "smt", "frontier", "fewer", "grouped", "packed", "moe"])
# frontier: mixing steps; fewer: the schedule over the first ρ of the steps; grouped: --group-by-length; packed: --packing; moe: GreenTrainer on a mixture-of-experts model
def test_kill_9_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(request, tmp_path, tiny_model_dir, jsonl,
                                                                              small_rows, method):
    if method == "moe":
        tiny_model_dir = request.getfixturevalue("tiny_moe_dir")
    data = jsonl(small_rows)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(args(tiny_model_dir, data, straight, method)) == 0

    proc = subprocess.Popen([sys.executable, "-m", "greentrainer", *args(tiny_model_dir, data, killed, method)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_checkpoint(killed, proc, step=9)  # a mid-epoch checkpoint at step 9 or later
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert json.loads((killed / "metrics.json").read_text())["status"] == "running"  # killed: no chance to say

    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    assert b["status"] == "complete" and b["resumed_from_step"] >= 9
    assert (straight / "model" / "model.safetensors").read_bytes() == (killed / "model" / "model.safetensors").read_bytes()
    for k in ("flops_total", "flops_forward", "flops_backward", "flops_overhead", "flops_full_ft_reference"):
        assert a["totals"][k] == b["totals"][k], k
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    # energy and carbon carry over the checkpoint: every step of the resumed epoch is in its timeline
    steps = [[p["step"] for h in m["history"] for p in h["timeline"]] for m in (a, b)]
    assert steps[0] == steps[1] and all(h["energy_kwh"] > 0 and h["co2_g"] > 0 for h in b["history"])
    if method != "smt":
        sa, sb = (json.loads((d / "selections.json").read_text())["selections"] for d in (straight, killed))
        assert [s["selected"] for s in sa] == [s["selected"] for s in sb]
        if method == "frontier":  # each window's mix of steps was taken up where the checkpoint left it
            assert [s["step_policy"] for s in sa if "step_policy" in s] == \
                [s["step_policy"] for s in sb if "step_policy" in s] != []
    assert not (killed / "checkpoint").exists()  # a complete run keeps its model, not the checkpoint


def test_resume_refuses_what_it_cannot_continue(capsys, tmp_path, tiny_model_dir, jsonl, small_rows):
    data = jsonl(small_rows)
    out = tmp_path / "done"
    assert main(["train", "--model", tiny_model_dir, "--dataset", data, "--output-dir", str(out), "--epochs", "1",
                 "--no-progress", "--no-eval", "--method", "full"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    assert "already complete" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a greentrainer run folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--lr", "1"]) == 2
    assert "saved config" in capsys.readouterr().err


def _killed_after_a_checkpoint(model, data, out):
    proc = subprocess.Popen([sys.executable, "-m", "greentrainer", *args(model, data, out, "greentrainer")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoint" / "meta.json").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint" / "meta.json").is_file()


def test_resume_refuses_changed_data_or_model_unless_accepted(capsys, tmp_path, tiny_model_dir, jsonl, small_rows):
    """The data's and the model's fingerprints are recorded when a run starts; a resume on other data or another
    model is refused in one line, and goes on with --accept-changed-inputs (recorded in metrics.json)."""
    import shutil
    from safetensors.torch import load_file, save_file
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = jsonl(small_rows)
    out = tmp_path / "run"
    _killed_after_a_checkpoint(str(model), data, out)
    recorded = json.loads((out / "metrics.json").read_text())["fingerprints"]
    assert set(recorded) == {"data", "model"}
    jsonl([dict(r, target=r["target"] + " now") if i == 3 else r for i, r in enumerate(small_rows)])  # one row
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the training or evaluation data changed since the run started" in err and len(err.splitlines()) == 1
    jsonl(small_rows)  # put back: the resume is the run's again ...
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})  # ... but the model changed
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    assert "the model changed since the run started" in capsys.readouterr().err
    assert main(["train", "--model", str(model), "--dataset", data, "--accept-changed-inputs"]) == 2
    assert "goes with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--no-progress", "--accept-changed-inputs"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["fingerprints"] == recorded
    assert set(m["inputs_changed_at_resume"]) == {"model"}
