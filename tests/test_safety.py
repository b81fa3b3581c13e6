"""Bad input and faults: one line and an exit code, nothing of the user's touched, no broken run called
complete (issue: safe under bad input and faults)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from greentrainer.cli import main
from greentrainer.data import load_examples

from conftest import one_line, train_args




# ------------------------------------------------------------------ never destroy data

def test_overwrite_refuses_a_folder_that_is_not_a_run_folder(capsys, tmp_path, tiny_model_dir, data, monkeypatch):
    work = tmp_path / "work"
    (work / ".git").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    e = one_line(capsys, train_args(tiny_model_dir, data, ".", "--overwrite"))
    assert "not a greentrainer run folder" in e
    assert (work / "notes.txt").read_text() == "mine" and (work / ".git").is_dir()


def test_overwrite_refuses_a_run_folder_holding_foreign_files_and_never_follows_links(capsys, tmp_path,
                                                                                      tiny_model_dir, data):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--no-eval")) == 0
    assert (out / ".greentrainer-run").is_file()
    (out / "my_notes.txt").write_text("mine")
    assert "did not write" in one_line(capsys, train_args(tiny_model_dir, data, out, "--overwrite"))
    assert (out / "my_notes.txt").exists()
    (out / "my_notes.txt").unlink()
    # a link named like our own entry, pointing outside: replaced as a link, its target untouched
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "data.bin").write_text("keep")
    (out / "predictions.jsonl").symlink_to(keep)
    assert main(train_args(tiny_model_dir, data, out, "--overwrite", "--no-eval")) == 0
    assert (keep / "data.bin").read_text() == "keep"
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"


def test_disk_full_while_saving_marks_the_run_failed_and_leaves_no_partial_model(capsys, tmp_path, tiny_model_dir,
                                                                                 data, monkeypatch):
    import errno
    from greentrainer.methods.base import Method

    def full_disk(self, model, tok, path):
        Path(path).mkdir()
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(Method, "save", full_disk)
    out = tmp_path / "run"
    e = one_line(capsys, train_args(tiny_model_dir, data, out), code=1)
    assert "No space left" in e
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "failed" and "No space left" in m["reason"]
    assert not (out / "model").exists() and not (out / "model.tmp").exists()


def test_model_is_saved_before_the_final_evaluation(capsys, tmp_path, tiny_model_dir, data, monkeypatch):
    import greentrainer.evaluate as ev

    def broken(*a, **k):
        raise RuntimeError("generation exploded")
    monkeypatch.setattr(ev, "evaluate", broken)
    out = tmp_path / "run"
    rc = main(train_args(tiny_model_dir, data, out))
    e = capsys.readouterr().err.strip()
    assert rc == 1 and len(e.splitlines()) == 1 and "generation exploded" in e
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "failed" and m["model_saved"] is True
    assert (out / "model" / "model.safetensors").is_file()


def test_sigterm_saves_the_model_and_marks_the_run_interrupted(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "greentrainer.cli", *train_args(tiny_model_dir, data, out, "--epochs", "500",
                                                                  "--no-eval")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until at least one epoch is on record
            try:
                if json.loads((out / "metrics.json").read_text()).get("history"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("greentrainer: terminated")
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["model_saved"] is True
    assert (out / "model" / "model.safetensors").is_file()


def test_a_run_folder_in_use_is_refused_and_a_killed_runs_folder_is_taken_over(capsys, tmp_path, tiny_model_dir,
                                                                                 data):
    """A second launch on a live run's folder (with or without --overwrite) and --resume of a run still running
    are refused in one line naming the process; nothing of the live run changes. Once that run is killed (-9),
    its lock is gone with it: the folder can be replaced (or resumed)."""
    out = tmp_path / "live"
    proc = subprocess.Popen([sys.executable, "-m", "greentrainer",
                             *train_args(tiny_model_dir, data, out, "--epochs", "500", "--no-eval")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.json").is_file():
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        config = (out / "train_config.json").read_text()
        for extra in ([], ["--overwrite"]):
            said = one_line(capsys, train_args(tiny_model_dir, data, out, *extra))
            assert f"is in use by a greentrainer run that is still running (pid {proc.pid} on " in said
        said = one_line(capsys, ["train", "--resume", str(out), "--no-progress"])
        assert f"the run is still running (pid {proc.pid} on " in said
        assert (out / "train_config.json").read_text() == config and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert main(train_args(tiny_model_dir, data, out, "--overwrite", "--no-eval")) == 0  # the killed run's lock
    assert json.loads((out / ".greentrainer-run").read_text())["pid"] == os.getpid()    # went with it


# ------------------------------------------------------------------ never call a broken run complete

@pytest.mark.parametrize("extra,needle", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--weight-decay", "inf"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--rho", "nan"], "--rho"),
    (["--lora-dropout", "inf"], "--lora-dropout"), (["--smt-params", "nan"], "--smt-params"),
    (["--seed", "-1"], "--seed"), (["--warmup-steps", "-3"], "--warmup-steps"), (["--lr", "abc"], "--lr"),
])
def test_non_finite_and_negative_numbers_exit_2_before_anything_loads(capsys, tmp_path, data, extra, needle):
    out = tmp_path / "r"
    assert needle in one_line(capsys, train_args("./no/such/model", data, out, *extra))
    assert not out.exists()


def test_library_config_rejects_non_finite_numbers():
    from greentrainer.config import TrainConfig
    from greentrainer.errors import UsageError
    with pytest.raises(UsageError, match="finite"):
        TrainConfig(weight_decay=float("nan")).validate()


def test_a_non_finite_loss_stops_the_run_failed_naming_the_step(capsys, tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    e = one_line(capsys, train_args(tiny_model_dir, data, out, "--lr", "1e30", "--epochs", "3"), code=1)
    assert "non-finite" in e and "step" in e
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "failed" and "step" in m["reason"]
    if (out / "model").exists():  # the weights of the last step with a finite loss and gradient
        from safetensors.torch import load_file
        assert all(torch.isfinite(t).all() for t in load_file(out / "model" / "model.safetensors").values())


def test_eval_of_a_run_that_is_not_complete_warns_and_reports_the_status(capsys, tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--no-eval")) == 0
    m = json.loads((out / "metrics.json").read_text())
    m["status"], m["reason"] = "failed", "test"
    (out / "metrics.json").write_text(json.dumps(m))
    capsys.readouterr()
    res = tmp_path / "res.json"
    assert main(["eval", "--model", str(out), "--dataset", data, "--num-beams", "1", "--max-new-tokens", "2",
                 "--output", str(res)]) == 0
    cap = capsys.readouterr()
    assert "status 'failed'" in cap.err and cap.err.startswith("greentrainer: warning:")
    assert json.loads(cap.out[cap.out.index("{"):])["run_status"] == "failed"
    assert json.loads(res.read_text())["run_status"] == "failed"


# ------------------------------------------------------------------ evaluate on unseen data

def test_bundled_validation_and_test_are_disjoint_from_train_and_each_other():
    for name in ("scitldr", "dialogsum", "webquestions", "piqa", "samsum"):
        tr, va, te = (load_examples(name, s) for s in ("train", "validation", "test"))
        src = lambda xs: {" ".join(e.source.split()) for e in xs}  # noqa: E731
        assert va and not src(tr) & src(va), name  # validation: a split of its own, or held out of train
        assert not src(va) & src(te), name


def test_a_small_user_file_is_never_evaluated_on_its_own_training_rows(jsonl, small_rows):
    path = jsonl(small_rows[:6])
    tr, te = load_examples(path, "train"), load_examples(path, "test")
    assert tr and te and not {e.source for e in tr} & {e.source for e in te}
    # the held-out part does not depend on --seed
    assert [e.id for e in load_examples(path, "test", seed=1)] == [e.id for e in load_examples(path, "test", seed=7)]


def test_eval_dataset_overlapping_the_training_file_is_refused(capsys, tmp_path, tiny_model_dir, jsonl, small_rows):
    train = jsonl(small_rows, "train.jsonl")
    ev = jsonl(small_rows[:3], "eval.jsonl")
    out = tmp_path / "r"
    assert "also appear in the training data" in one_line(
        capsys, train_args(tiny_model_dir, train, out, "--eval-dataset", ev))
    assert not out.exists()
    ok = jsonl([{"source": "a completely different text", "target": "new"}], "eval2.jsonl")
    assert main(train_args(tiny_model_dir, train, out, "--eval-dataset", ok)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_eval"] == 1 and "eval2.jsonl" in m["splits"]["eval"]
    capsys.readouterr()
    assert "also appear" in one_line(capsys, ["eval", "--model", str(out), "--dataset", train, "--eval-dataset",
                                              train, "--num-beams", "1"])


def test_val_loss_uses_the_validation_split_and_the_splits_are_labelled(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--no-eval")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_validation"] == 1 and m["history"][0]["val_loss"] is not None
    assert set(m["splits"]) == {"train", "validation", "eval"}


def test_max_val_bounds_the_validation_items_only(capsys, tmp_path, tiny_model_dir, jsonl):
    """--max-val N: the validation loss (each epoch's end, --eval-steps) runs on N items; the test items stay
    --max-eval's, so a quick run can bound the validation pass without changing what is tested."""
    rows = [{"source": f"row {i} of the file, a short text", "target": f"row {i}"} for i in range(80)]
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, jsonl(rows), out, "--max-train", "8", "--max-eval", "3", "--max-val",
                           "2", "--no-eval")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_validation"], m["n_eval"]) == (2, 3) and m["history"][0]["val_loss"] is not None
    capsys.readouterr()
    argv = [a for a in train_args(tiny_model_dir, jsonl(rows), tmp_path / "shown", "--max-train", "8", "--max-val",
                                  "2", "--no-eval") if a != "--no-progress"]
    assert main(argv) == 0
    assert "validation loss (2 items)" in capsys.readouterr().err  # the pass has its progress bar


# ------------------------------------------------------------------ no silent surprises

def test_missing_weights_are_refused_and_unexpected_ones_reported(capsys, tmp_path, tiny_model_dir, data):
    import shutil
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_model_dir, bad)
    sd = load_file(bad / "model.safetensors")
    sd.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    assert "missing" in one_line(capsys, train_args(str(bad), data, tmp_path / "r"))
    extra = tmp_path / "extra_model"
    shutil.copytree(tiny_model_dir, extra)
    sd = load_file(extra / "model.safetensors")
    sd["model.layers.0.unused_thing"] = torch.zeros(2)
    save_file(sd, extra / "model.safetensors", metadata={"format": "pt"})
    assert main(train_args(str(extra), data, tmp_path / "r2", "--no-eval")) == 0
    assert "not used by the model" in capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    (["--method", "greentrainer", "--select-once", "--select-every", "2"], "contradict"),
    (["--eval-before", "--no-eval"], "contradict"),
    (["--rh", "0.5"], "unrecognized"),  # no abbreviations: every option is known exactly
])
def test_contradicting_options_are_rejected(capsys, tmp_path, data, extra, needle):
    assert needle in one_line(capsys, train_args("./no/such/model", data, tmp_path / "r", *extra))


def test_options_of_another_method_are_warned_once(capsys):
    from greentrainer.cli import build_parser, given_options, warn_ignored
    argv = ["train", "--method", "lora", "--rho=0.5", "--smt-block", "64", "--lora-r", "4"]
    warn_ignored("lora", given_options(build_parser(), argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["greentrainer: warning: ignored with --method lora: --rho, --smt-block"]


def test_a_non_utf8_rho_schedule_is_one_line(capsys, tmp_path, data):
    sched = tmp_path / "s.txt"
    sched.write_bytes(b"0 0.5\n\xff\xfe 0.4\n")
    assert "UTF-8" in one_line(capsys, train_args("./no/such/model", data, tmp_path / "r", "--method",
                                                   "greentrainer", "--rho-schedule", str(sched)))


def test_max_input_length_beyond_the_model_positions_is_refused_before_writing(capsys, tmp_path, tiny_model_dir,
                                                                               data):
    out = tmp_path / "r"
    assert "positions" in one_line(capsys, train_args(tiny_model_dir, data, out, "--max-input-length", "4096"))
    assert not out.exists()


def test_a_truncated_safetensors_file_is_one_line_in_eval(capsys, tmp_path, tiny_model_dir, data):
    import shutil
    bad = tmp_path / "trunc"
    shutil.copytree(tiny_model_dir, bad)
    blob = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    e = one_line(capsys, ["eval", "--model", str(bad), "--dataset", data])
    assert "damaged or truncated" in e or "cannot load" in e


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_pickle_checkpoint_that_is_not_weights_only_is_refused_in_one_line(capsys, tmp_path, tiny_model_dir, data):
    import shutil
    bad = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Evil()}, bad / "pytorch_model.bin")
    e = one_line(capsys, ["eval", "--model", str(bad), "--dataset", data])
    assert "not a safe" in e and "safetensors" in e


def test_eval_output_into_a_missing_folder_is_refused_before_generation(capsys, tmp_path, data):
    e = one_line(capsys, ["eval", "--model", "./no/such/model", "--dataset", data, "--output",
                          str(tmp_path / "missing" / "res.json")])
    assert "does not exist" in e


def test_bad_inputs_table_quick_mode_handles_every_case(tmp_path):
    """bench/bad_inputs.py --quick: every sampled row must be one line, the right exit code, nothing lost."""
    bench = Path(__file__).parent.parent / "bench"
    env = dict(os.environ, GREENTRAINER_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, "bad_inputs.py", "--quick"], cwd=bench, env=env, capture_output=True,
                          text=True, timeout=600)
    rows = json.loads((tmp_path / "bad_inputs_quick.json").read_text())["rows"]
    assert proc.returncode == 0 and rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
