"""`greentrainer demo` end to end on a tiny model: zero-shot against fine-tuned scores on the same items, two
predictions side by side, measured FLOPs against full fine-tuning and the time saved."""
import json

from greentrainer.cli import main


def test_demo_prints_before_after_flops_and_time(capsys, tmp_path, tiny_model_dir, jsonl):
    rows = [{"source": f"the cat number {i} sat on the mat and looked at the dog", "target": f"cat {i} sat"}
            for i in range(40)]
    data = jsonl(rows)
    out = tmp_path / "demo"
    assert main(["demo", "--model", tiny_model_dir, "--dataset", data, "--max-train", "16", "--max-eval", "4",
                 "--lr", "1e-2", "--rho", "0.8", "--output-dir", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    for needle in ("zero-shot", "fine-tuned", "ROUGE-1", "[1]", "[2]", "reference", "% of full fine-tuning",
                   "s saved", "energy:", "CO2eq", "full fine-tuning on the same batches"):
        assert needle in text, needle
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and "eval_before" in m and "eval" in m
    assert len((out / "predictions_before.jsonl").read_text().splitlines()) == 4


def test_train_without_options_runs_the_demo(monkeypatch, capsys):
    import greentrainer.demo as demo
    called = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: called.update(kw))
    assert main(["train"]) == 0
    assert "running `greentrainer demo`" in capsys.readouterr().out and called
