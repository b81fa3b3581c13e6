"""Smoke test of the benchmark scripts' --quick modes (real default model; a few minutes in all)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def run(script, tmp_path):
    env = dict(os.environ, GREENTRAINER_BENCH_RESULTS=str(tmp_path))
    subprocess.run([sys.executable, script, "--quick"], cwd=BENCH, env=env, check=True, capture_output=True,
                   timeout=900)
    name = script.replace(".py", "_quick")
    assert (tmp_path / f"{name}.md").exists()
    return json.loads((tmp_path / f"{name}.json").read_text())["rows"]


@pytest.mark.slow
def test_selector_bench_quick(tmp_path):
    rows = run("selector.py", tmp_path)
    exact = [r for r in rows if r["solver"] == "exact (ours)"]
    assert exact and all(r["cost/budget"] <= 1 for r in exact if r["objective_%_of_exact"] != "infeasible")
    assert all(r["cost/budget"] <= 1 for r in rows if r["solver"].startswith("ours"))  # never over budget
    assert all(r["objective_%_of_exact"] <= 100 + 1e-9 for r in rows if r["solver"].startswith("ours"))


@pytest.mark.slow
def test_gpu_bench_tiny_runs_the_same_code_on_the_cpu(tmp_path):
    """bench/gpu.py --tiny: every method through the tool on the same batches, the plain-loop anchor, the fused
    attention counted like eager, labelled as a CPU run."""
    env = dict(os.environ, GREENTRAINER_BENCH_RESULTS=str(tmp_path))
    subprocess.run([sys.executable, "gpu.py", "--tiny"], cwd=BENCH, env=env, check=True, capture_output=True,
                   timeout=900)
    out = json.loads((tmp_path / "gpu.json").read_text())
    rows = {r["label"]: r for r in out["rows"]}
    assert out["tiny"] and "not a GPU result" in (tmp_path / "gpu.md").read_text()
    assert len(rows) == 6 and rows["full FT"]["flops_fraction_of_full"] == 1.0
    assert rows["GreenTrainer ρ 0.5"]["flops_fraction_of_full"] <= 0.5 + 1e-9
    assert rows["full FT"]["plain_step_s"] > 0 and rows["GreenTrainer ρ 0.5"]["plain_step_s"] > 0
    assert out["attention_flops"]["sdpa"] == out["attention_flops"]["eager"]


def test_moe_flops_bench_quick(tmp_path):
    """bench/moe_flops.py on tiny models (seconds): every step's measured FLOPs equal the prediction while the
    routing changes."""
    rows = run("moe_flops.py", tmp_path)
    assert len(rows) == 6 and all(r["steps_exact"] == r["steps"] and r["max_abs_error_%"] == 0 for r in rows)


@pytest.mark.slow
def test_fsdp_memory_bench_quick(tmp_path):
    """bench/fsdp_memory.py on a tiny model: each method on 1 and 2 sharded processes; each process of 2 holds half
    the weights and optimizer state of one."""
    rows = run("fsdp_memory.py", tmp_path)
    assert [(r["method"], r["processes"]) for r in rows] == [("full FT", 1), ("full FT", 2),
                                                          ("GreenTrainer ρ 0.5", 1), ("GreenTrainer ρ 0.5", 2)]
    for r in rows:
        assert r["weights + optimizer vs 1 process"] == pytest.approx(1.0 if r["processes"] == 1 else 0.5, abs=0.02)
    assert all(r["FLOPs fraction"] <= 0.5 + 1e-9 for r in rows if r["method"].startswith("Green"))


@pytest.mark.slow
def test_packing_bench_quick(tmp_path):
    """bench/packing.py on 16 items: the three settings train on the same items (packed and grouped for fewer FLOPs
    than padded, packed in fewer steps), then the interleaved timing; a rerun skips what is done."""
    env = dict(os.environ, GREENTRAINER_BENCH_RESULTS=str(tmp_path))
    subprocess.run([sys.executable, "packing.py", "--quick"], cwd=BENCH, env=env, check=True, capture_output=True,
                   timeout=900)
    out = json.loads((tmp_path / "packing_quick.json").read_text())
    runs, timing = out["runs"], out["timing"]["settings"]
    assert {r["items"] for r in runs.values()} == {16}
    assert runs["packed"]["flops_total"] < runs["padded"]["flops_total"]
    assert runs["grouped"]["flops_total"] < runs["padded"]["flops_total"]
    assert runs["packed"]["optimizer_steps"] < runs["padded"]["optimizer_steps"]
    assert runs["padded"]["flops_full_ft_random_batches"] == runs["padded"]["flops_total"]
    assert all(t["median_step_s"] > 0 and t["items_per_s"] > 0 for t in timing.values())
    stamp = (tmp_path / "packing_quick" / "packed.json").stat().st_mtime
    subprocess.run([sys.executable, "packing.py", "--quick", "--part", "report"], cwd=BENCH, env=env, check=True,
                   capture_output=True, timeout=300)
    assert (tmp_path / "packing_quick" / "packed.json").stat().st_mtime == stamp
    assert "| packed |" in (tmp_path / "packing_quick.md").read_text()


@pytest.mark.slow
def test_flops_accuracy_bench_quick(tmp_path):
    rows = run("flops_accuracy.py", tmp_path)
    assert all(r["under_predictions"] == 0 for r in rows)
    assert all(r["max_rel_error_%"] == 0 for r in rows)  # side branches make the prediction exact


@pytest.mark.slow
def test_time_vs_flops_bench_quick(tmp_path):
    rows = run("time_vs_flops.py", tmp_path)
    full = next(r for r in rows if r["setting"] == "full")
    assert full["flops_ratio"] == 1
    assert all(r["flops_ratio"] < 1 for r in rows if r["setting"] != "full")


@pytest.mark.slow
def test_methods_bench_quick(tmp_path):
    rows = run("methods.py", tmp_path)
    by = {r["method"]: r for r in rows}
    assert by["full"]["flops_%_full"] == pytest.approx(100)
    gt = next(r for m, r in by.items() if m.startswith("GreenTrainer"))
    assert gt["flops_%_full"] <= 70
    assert all("rougeL" in r for r in rows)
    assert (tmp_path / "methods_quick.png").exists()


@pytest.mark.slow
def test_prefix_init_bench_quick(tmp_path):
    rows = {r["prefix"].split("--prefix-init ")[-1]: r["val_loss"] for r in run("prefix_init.py", tmp_path)}
    base = rows["none (base model)"]
    assert abs(rows["data"] - base) < 0.5 < rows["random"] - base  # the data prefix starts near the base model


@pytest.mark.slow
def test_smt_memory_bench_quick(tmp_path):
    rows = run("smt_memory.py", tmp_path)
    pairs = list(zip(rows[::2], rows[1::2]))
    assert pairs and all(a["saved inputs"] == "one per layer" and b["saved inputs"] == "shared" for a, b in pairs)
    assert all(b["smt_saved_MB"] <= a["smt_saved_MB"] for a, b in pairs)  # sharing never saves more
    dense = [b for a, b in pairs if b["targets"] == "q,k,v" and b["params_%"] == 10]
    assert dense and dense[0]["smt_saved_ratio"] > 2  # (2 layers: every q/k/v block is chosen, ratio 3)


@pytest.mark.slow
def test_counting_bench_quick(tmp_path):
    rows = {r["counting"]: r for r in run("counting.py", tmp_path)}
    assert set(rows) == {"none", "live", "cached"} and all(r["median_step_s"] > 0 for r in rows.values())


@pytest.mark.slow
def test_attention_bench_quick(tmp_path):
    rows = run("attention.py", tmp_path)
    assert rows and all(r["flops_equal"] for r in rows)


@pytest.mark.slow
def test_callback_memory_bench_quick(tmp_path):
    rows = {r["setting"].split(",")[0].split(" (")[0]: r for r in run("callback_memory.py", tmp_path)}
    full, drop = rows["full FT"], rows["callback ρ 0.5"]
    assert drop["optimizer_state_MB"] < full["optimizer_state_MB"] and 0 < drop["flops_fraction"] <= 0.505


def test_step_anatomy_bench_quick(tmp_path):
    """The forward is a third of a full step at every shape, so ρ 0.5 leaves a quarter of the backward."""
    row = run("step_anatomy.py", tmp_path)[0]
    assert row["forward_%"] == pytest.approx(100 / 3, abs=1) and row["backward_left_%_at_0.5"] == pytest.approx(25)
    assert 0 < row["reach_%_at_0.5"] < row["reach_%_at_0.7"] <= 100 and 0 < row["min_rho"] < 0.5


def test_padding_bench_quick(tmp_path):
    """Right-padded batches spend FLOPs on pad tokens; the FLOPs share follows the token share (attention makes
    it a little larger) and padded batches never cost less than the same items unpadded."""
    row = run("padding.py", tmp_path)[0]
    assert 0 < row["padding_%_of_tokens"] < 100 and row["padding_%_of_flops"] >= row["padding_%_of_tokens"]
    assert row["padded_over_unpadded_flops"] >= 1


@pytest.mark.slow
def test_memory_bench_quick(tmp_path):
    rows = run("memory.py", tmp_path)
    assert rows and all(r["peak_MB"] > 0 for r in rows)


@pytest.mark.slow
def test_accuracy_bench_quick_sweeps_then_reports_with_intervals(tmp_path):
    """bench/accuracy.py's two stages on 8 steps and 4 items: one JSON per run, a rerun skips them, the report
    has a bootstrap interval around each mean and a Pareto plot; the untrained model is scored on the same items."""
    env = dict(os.environ, GREENTRAINER_BENCH_RESULTS=str(tmp_path))
    for stage in ("sweep", "final", "final"):
        subprocess.run([sys.executable, "accuracy.py", "--quick", "--stage", stage], cwd=BENCH, env=env, check=True,
                       capture_output=True, timeout=900)
    sweep = json.loads((tmp_path / "accuracy_sweep_scitldr.json").read_text())["winners"]
    assert set(sweep) == {"full", "greentrainer"}
    runs = sorted((tmp_path / "accuracy" / "scitldr" / "final").glob("*.json"))
    assert len(runs) == 3  # the second final stage found both runs and the zero-shot evaluation done
    rows = json.loads((tmp_path / "accuracy_scitldr.json").read_text())["rows"]
    assert {r["label"] for r in rows} == {"Zero-shot (untrained)", "Full FT", "GreenTrainer ρ=0.7"}
    assert all(r["ci_low"] <= r["rougeL"] <= r["ci_high"] for r in rows)
    assert (tmp_path / "accuracy_scitldr.png").exists()
    curves = json.loads((tmp_path / "accuracy_scitldr.json").read_text())["curves"]  # --eval-steps 4 of 8 steps
    assert [s for s, *_ in curves["full"]] == [0, 4, 8] and curves["full"][-1][2] == pytest.approx(100)
    assert 0 < curves["gt0.7"][-1][2] <= 70 and (tmp_path / "accuracy_scitldr_curves.png").exists()
    assert "## Validation loss against measured FLOPs" in (tmp_path / "accuracy_scitldr.md").read_text()


def accuracy_module(tmp_path, monkeypatch):
    """bench/accuracy.py imported afresh, its results under ``tmp_path``."""
    import importlib
    monkeypatch.setenv("GREENTRAINER_BENCH_RESULTS", str(tmp_path))
    monkeypatch.syspath_prepend(str(BENCH))
    importlib.reload(importlib.import_module("common"))
    return importlib.reload(importlib.import_module("accuracy"))


def final_stage(tmp_path, monkeypatch, winners: dict):
    """bench/accuracy.py with these sweep winners, its ``one_run`` recording (method, options, lr, seed) instead
    of training; returns the module and the list of calls."""
    accuracy = accuracy_module(tmp_path, monkeypatch)
    (tmp_path / "accuracy_sweep_scitldr.json").write_text(json.dumps({"winners": winners}))
    calls = []
    monkeypatch.setattr(accuracy, "one_run", lambda a, stage, method, opts, lr, seed, log:
                        calls.append((method, opts, lr, seed)))
    return accuracy, calls


def test_accuracy_sweep_table_keeps_the_methods_an_earlier_sweep_decided(tmp_path, monkeypatch):
    """A sweep over some --methods adds its winners to the committed table instead of replacing it; a table of
    another protocol (steps, validation items) is not merged."""
    accuracy = accuracy_module(tmp_path, monkeypatch)
    a = SimpleNamespace(dataset="scitldr", steps=64, val_items=64, batch_size=4, epochs=2)
    won = lambda lr, loss: {"lr": lr, "options": {}, "val_loss": loss, "tried": [{"lr": lr, "options": {},
                                                                                   "val_loss": loss}]}
    accuracy.write_sweep(a, {"lora": won(3e-3, 2.5)})
    accuracy.write_sweep(a, {"full": won(3e-5, 2.4)})
    table = json.loads((tmp_path / "accuracy_sweep_scitldr.json").read_text())["winners"]
    assert list(table) == ["full", "lora"] and table["lora"]["lr"] == 3e-3
    assert "| **lora** | 0.003 |" in (tmp_path / "accuracy_sweep_scitldr.md").read_text()
    accuracy.write_sweep(SimpleNamespace(**{**vars(a), "steps": 8}), {"full": won(1e-4, 2.6)})
    assert list(json.loads((tmp_path / "accuracy_sweep_scitldr.json").read_text())["winners"]) == ["full"]


def test_accuracy_report_from_run_files(tmp_path, monkeypatch):
    """The report reads the final runs on disk: a row per variant with seeds pooled, its interval around the
    mean, the FLOPs range over seeds and the selector's slowest solve (GreenTrainer rows only)."""
    accuracy = accuracy_module(tmp_path, monkeypatch)
    (tmp_path / "accuracy_sweep_scitldr.json").write_text(json.dumps({"winners": {
        m: {"lr": 1e-4, "options": {}} for m in ("full", "greentrainer", "lora")}}))
    folder = tmp_path / "accuracy" / "scitldr" / "final"
    folder.mkdir(parents=True)
    for method, opts, seed, rouge, frac, sel in (("full", {}, 0, [30, 40, 50], 1.0, []),
                                                ("greentrainer", {"rho": 0.5}, 0, [20, 30, 40], 0.49, [0.002]),
                                                ("greentrainer", {"rho": 0.5}, 1, [30, 40, 50], 0.5, [0.004, 0.003]),
                                                ("greentrainer", {"over": "lora", "rho": 0.5}, 0, [25, 45, 45], 0.5,
                                                 [0.001]),
                                                ("lora", {}, 0, [30, 30, 30], 0.69, []),
                                                ("lora", {"lr": 2e-5}, 0, [10, 10, 10], 0.69, []),
                                                # not the sweep's setting: no variant's run, pooled with none
                                                ("greentrainer", {"rho": 0.5, "lr": 1e-3}, 2, [0, 0, 0], 0.5, []),
                                                ("lora", {"lora_r": 16}, 1, [0, 0, 0], 0.69, [])):
        lr = opts.pop("lr", 1e-4)  # LoRA at the paper's lr is a row of its own, not a seed of LoRA's
        (folder / f"{method}-{opts.get('over', '')}-{len(opts)}-{lr}-{seed}.json").write_text(json.dumps({
            "method": method, "options": opts, "seed": seed, "lr": lr, "steps": 256, "per_item_rougeL": rouge,
            "test_ids": ["a", "b", "c"], "eval": {"rouge1_first_ref": 40.0}, "flops_fraction_of_full": frac, "val_loss": [2.6, 2.5],
            "train_time_s": 10.0, "selector_time_s": sel}))
    (folder / "greentrainer-0.4.json").write_text(json.dumps({  # a ρ the tool refused: said under the table
        "method": "greentrainer", "options": {"rho": 0.4}, "seed": 0, "lr": 1e-4, "steps": 256,
        "error": "--rho 0.4 is below ...; the smallest feasible rho is 0.4063"}))
    (folder / "zeroshot.json").write_text(json.dumps({  # the untrained model: a row of its own, paired too
        "method": "zeroshot", "options": {}, "per_item_rougeL": [10, 20, 30], "test_ids": ["a", "b", "c"],
        "eval": {"rouge1_first_ref": 25.0}}))
    a = SimpleNamespace(dataset="scitldr", batch_size=4, epochs=2, sweep_from="scitldr", steps=256)
    rows = {r["label"]: r for r in accuracy.report(a)}
    assert set(rows) == {"Zero-shot (untrained)", "Full FT", "GreenTrainer ρ=0.5", "GT over LoRA ρ=0.5", "LoRA",
                         "LoRA at the paper's lr 2e-5"}
    assert rows["LoRA"]["rougeL"] == 30 and rows["LoRA at the paper's lr 2e-5"]["rougeL"] == 10
    gt = rows["GreenTrainer ρ=0.5"]
    assert gt["seeds"] == 2 and gt["rougeL"] == pytest.approx(35.0) and gt["ci_low"] <= 35 <= gt["ci_high"]
    assert (gt["flops_min"], gt["flops_max"]) == (0.49, 0.5) and gt["selector_ms"] == pytest.approx(4.0)
    table = (tmp_path / "accuracy_scitldr.md").read_text()
    assert "| GreenTrainer ρ=0.5 | 2 |" in table and "| 4.0 |" in table and (tmp_path / "accuracy_scitldr.png").exists()
    assert "- GreenTrainer ρ=0.4: --rho 0.4 is below ...; the smallest feasible rho is 0.4063" in table
    # paired on the items (each item's mean over seeds): GreenTrainer 25, 35, 45 against full FT's 30, 40, 50
    assert "| GreenTrainer ρ=0.5 − Full FT | 2, 1 | -5.00 (-5.00 to -5.00) | ≥ -1.0 | no |" in table
    assert "| GreenTrainer ρ=0.5 | 2 | 0.0001 | 35.0 (" in table and ") | -5.0 (-5.0 to -5.0) | 40.0 |" in table
    assert "| GT over LoRA ρ=0.5 − GreenTrainer ρ=0.5 | 1, 2 | +3.33 (" in table
    assert "| Zero-shot (untrained) |  |  | 20.0 (" in table and ") | -20.0 (-20.0 to -20.0) | 25.0 | 0 |" in table
    plotted = {r["label"]: r for r in json.loads((tmp_path / "accuracy_scitldr.json").read_text())["rows"]}
    assert plotted["GreenTrainer ρ=0.5"]["vs_full"] == pytest.approx(-5.0) and "vs_full" not in plotted["Full FT"]
    assert (tmp_path / "accuracy_scitldr_over.png").exists()  # issue 16's plot, once an --over run is in
    assert "each of its 2 epochs (mean over seeds): 2.6000 → 2.5000; the last epoch changed it by -3.85 %" in table


def test_accuracy_long_study_has_its_own_folder_report_and_loss_per_flop(tmp_path, monkeypatch):
    """A study of another length (512 steps in 1 epoch) reads and writes its own folder and report, takes the
    zero-shot row from the table's folder (the same test items), and draws validation loss against the FLOPs
    spent, in % of the long full FT run's: full FT's own curve is read at each variant's end."""
    accuracy = accuracy_module(tmp_path, monkeypatch)
    (tmp_path / "accuracy_sweep_scitldr.json").write_text(json.dumps({"winners": {
        m: {"lr": 1e-4, "options": {}} for m in ("full", "greentrainer")}}))
    a = SimpleNamespace(dataset="scitldr", batch_size=4, epochs=1, sweep_from="scitldr", steps=512, stage="report")
    folder = accuracy.final_dir(a)
    assert folder.name == "final-512steps-1epochs" and accuracy.report_name(a) == "accuracy_scitldr_512steps_1epochs"
    folder.mkdir(parents=True)
    common = {"steps": 512, "test_ids": ["a", "b"], "eval": {"rouge1_first_ref": 40.0}, "train_time_s": 1.0}
    for method, opts, curve, total in (
            ("full", {}, [[0, 3.0, 0, 0], [256, 2.0, 50, 50], [512, 1.5, 100, 100]], 100),
            ("greentrainer", {"rho": 0.5}, [[0, 3.0, 0, 0], [256, 2.4, 25, 50], [512, 2.2, 50, 100]], 50)):
        (folder / f"{method}.json").write_text(json.dumps({
            "method": method, "options": opts, "seed": 0, "lr": 1e-4, "per_item_rougeL": [30, 40],
            "flops_fraction_of_full": total / 100, "flops_total": total, "val_loss": [curve[-1][1]],
            "val_curve": curve, **common}))
    (tmp_path / "accuracy" / "scitldr" / "final").mkdir()
    (tmp_path / "accuracy" / "scitldr" / "final" / "zeroshot.json").write_text(json.dumps({
        "method": "zeroshot", "options": {}, "per_item_rougeL": [10, 20], "test_ids": ["a", "b"],
        "eval": {"rouge1_first_ref": 25.0}}))
    rows = {r["variant"]: r for r in accuracy.report(a)}
    assert set(rows) == {"zeroshot", "full", "gt0.5"}
    curves = json.loads((tmp_path / "accuracy_scitldr_512steps_1epochs.json").read_text())["curves"]
    assert curves["gt0.5"] == [[0, 3.0, 0.0], [256, 2.4, 25.0], [512, 2.2, 50.0]]
    table = (tmp_path / "accuracy_scitldr_512steps_1epochs.md").read_text()
    assert "| GreenTrainer ρ=0.5 | 1 | 0: 3.000 @ 0, 256: 2.400 @ 25, 512: 2.200 @ 50 | 2.2000 @ 50.0 | 2.0000 |" in table
    assert "256 to its last step 512: 2.0000 → 1.5000 (-25.00 %): still falling" in table
    assert (tmp_path / "accuracy_scitldr_512steps_1epochs_curves.png").exists()
    assert not (tmp_path / "accuracy_scitldr.md").exists()  # the table's report is not touched


def test_accuracy_ablations_change_one_option_each_against_the_defaults(tmp_path, monkeypatch):
    """--stage ablate: GreenTrainer at its swept lr with each ablation's one change (its schedule file exists
    and loads), a table against the defaults' and full FT's validation loss."""
    accuracy = accuracy_module(tmp_path, monkeypatch)
    from greentrainer.config import config_from_options
    (tmp_path / "accuracy_sweep_scitldr.json").write_text(json.dumps({"winners": {
        "full": {"lr": 3e-5, "options": {}}, "greentrainer": {"lr": 1e-4, "options": {}}}}))
    calls = []

    def fake_run(a, stage, method, opts, lr, seed, log):
        config_from_options(dict(method=method, lr=lr, **opts))  # every variant is a valid configuration
        calls.append((stage, method, opts, lr))
        loss = (2.5 if len(calls) == 1 else 2.505 if seed == 1 else 2.497 if seed == 2 else 2.45 if "probe_batches" in opts
                else 2.51)
        return {"val_loss": [loss], "flops_fraction_of_full": 0.5, "train_time_s": 1.0,
                "selections": [{"kind": "probe", "n_selected": 40, "step": 8}]}
    monkeypatch.setattr(accuracy, "one_run", fake_run)
    a = SimpleNamespace(dataset="scitldr", steps=64, val_items=64, batch_size=4, epochs=2, sweep_rho=0.5,
                        methods=None)
    accuracy.ablate(a, log=lambda *x: None)
    assert calls[0] == ("sweep", "greentrainer", {"rho": 0.5}, 1e-4) and calls[-1][:2] == ("sweep", "full")
    assert calls[-3] == calls[-2] == ("ablate", "greentrainer", {"rho": 0.5}, 1e-4)  # the defaults' seeds 1, 2
    changed = [c[2] for c in calls[1:-3]]
    assert len(changed) == len(accuracy.ABLATIONS) and all(c["rho"] == 0.5 and len(c) == 2 for c in changed)
    table = (tmp_path / "accuracy_ablations_scitldr.md").read_text()
    assert all(label in table for label in accuracy.ABLATIONS) and "| full FT (lr 3e-05) | reference |" in table
    assert "rho_schedule=rho_0.55_then_0.45 |" in table  # a schedule file by its stem, as in run names
    # a variant wins when it beats the defaults by more than the defaults' largest seed-to-seed change (0.005)
    result = json.loads((tmp_path / "accuracy_ablations_scitldr.json").read_text())
    assert result["wins"] == ["probe over 4 batches"] and result["seed_noise"] == pytest.approx(0.005)
    assert "| 40@8 |" in table


def test_accuracy_final_plan_runs_each_variant_at_its_setting(tmp_path, monkeypatch):
    """--stage final: each variant at its sweep winner's lr and knobs; "at LoRA's FLOPs" at the ρ LoRA's seed-0
    run measured; the paper-lr rows at 2e-5 whatever the sweep chose."""
    accuracy, calls = final_stage(tmp_path, monkeypatch, {
        "lora": {"lr": 3e-3, "options": {"lora_r": 16}}, "greentrainer": {"lr": 1e-4, "options": {}}})
    folder = tmp_path / "accuracy" / "scitldr" / "final"
    folder.mkdir(parents=True)
    (folder / "lora-lora_r16-lr0.003-s0-256steps.json").write_text(json.dumps(
        {"method": "lora", "seed": 0, "lr": 3e-3, "flops_fraction_of_full": 0.6931}))
    a = SimpleNamespace(dataset="scitldr", sweep_from="scitldr", seeds=1, steps=256, epochs=2, batch_size=4,
                        test_items=200, methods=["lora", "gt0.5", "gt@lora", "lora@paper-lr", "gt@lora@paper-lr"])
    accuracy.final(a, log=lambda *x: None)
    assert calls == [("greentrainer", {"rho": 0.5}, 1e-4, 0), ("lora", {"lora_r": 16}, 3e-3, 0),
                     ("greentrainer", {"rho": 0.693}, 1e-4, 0), ("lora", {"lora_r": 16}, 2e-5, 0),
                     ("greentrainer", {"rho": 0.693}, 2e-5, 0)]
    assert accuracy.VARIANTS["lora@paper-lr"][1] == {"lr": 2e-5}  # the plan did not change the table


def test_accuracy_a_variant_whose_setting_repeats_another_is_trained_counted_and_shown_once(tmp_path, monkeypatch):
    """An lr override equal to the sweep's (full FT at 1e-4 when full FT's sweep chose 1e-4) is full FT's runs:
    the final stage trains them once per seed, its estimate counts them once, and asking for the repeat alone
    trains its own seeds of that one setting."""
    winners = {"full": {"lr": 1e-4, "options": {}}, "greentrainer": {"lr": 1e-4, "options": {}}}
    accuracy, calls = final_stage(tmp_path, monkeypatch, winners)
    logged = []
    a = SimpleNamespace(dataset="scitldr", sweep_from="scitldr", seeds=None, steps=256, epochs=2, batch_size=4,
                        test_items=200, methods=["full", "full-lr1e-4"])
    shared = [(label, names) for label, s, names in accuracy.distinct_settings(a, winners) if "full-lr1e-4" in names]
    assert shared == [("full", ["full", "full-lr1e-4"])]
    accuracy.final(a, log=logged.append)
    assert calls == [("full", {}, 1e-4, seed) for seed in range(3)]
    assert logged[0].startswith("final stage: 3 run(s) to train (full ×3)")
    calls.clear()
    accuracy.final(SimpleNamespace(**{**vars(a), "methods": ["full-lr1e-4"]}), log=lambda *x: None)
    assert calls == [("full", {}, 1e-4, 0)]  # the repeat's own one seed


def test_accuracy_the_selection_at_a_higher_lr_is_its_own_one_seed_check(tmp_path, monkeypatch):
    """The paper's selection at 3e-4 (its rate was swept on SciTLDR) is a setting of its own: one seed, its own
    result file, paired in the report with the selection at its swept rate and with the default."""
    accuracy, calls = final_stage(tmp_path, monkeypatch, {"greentrainer": {"lr": 1e-4, "options": {}}})
    a = SimpleNamespace(dataset="dialogsum", sweep_from="scitldr", seeds=None, steps=512, epochs=1, batch_size=4,
                        test_items=200, methods=["gt0.5", "gt0.5-lr3e-4"])
    accuracy.final(a, log=lambda *x: None)
    assert calls == [("greentrainer", {"rho": 0.5}, 1e-4, 0), ("greentrainer", {"rho": 0.5}, 3e-4, 0),
                     ("greentrainer", {"rho": 0.5}, 1e-4, 1), ("greentrainer", {"rho": 0.5}, 1e-4, 2)]
    winners = {"greentrainer": {"lr": 1e-4, "options": {}}}
    paths = {accuracy.final_path(a, accuracy.setting(a, v, winners), 0) for v in ("gt0.5", "gt0.5-lr3e-4")}
    assert len(paths) == 2
    assert {("gt0.5-lr3e-4", "gt0.5"), ("gt0.5-lr3e-4", "gt-fewer0.5")} <= {c[:2] for c in accuracy.COMPARISONS}


def test_accuracy_cost_is_stated_at_the_median_full_ft_step_measured_by_the_study(tmp_path, monkeypatch):
    """The plan's pace is the median step time of the study's full FT runs on disk, whatever their length (a run
    continued from a checkpoint counts its training time over every session), and the per-run rest is the
    median of the runs that ran in one go (a continued run's wall time is its last session's only)."""
    accuracy, calls = final_stage(tmp_path, monkeypatch, {"full": {"lr": 3e-5, "options": {}}})
    folder = tmp_path / "accuracy" / "scitldr" / "final"
    folder.mkdir(parents=True)
    for name, steps, train, wall, resumed in [("full-lr3e-05-s0", 256, 256 * 20.0, 256 * 20.0 + 600, False),
                                              ("full-epochs1-max_train512-lr3e-05-s0", 128, 128 * 30.0,
                                               128 * 30.0 + 900, False),
                                              ("full-lr3e-05-s1", 256, 256 * 24.0, 100.0, True)]:
        (folder / f"{name}-256steps.json").write_text(json.dumps(
            {"method": "full", "steps": steps, "train_time_s": train, "wall_s": wall, "resumed": resumed}))
    a = SimpleNamespace(dataset="scitldr", sweep_from="scitldr", seeds=None, steps=256, epochs=2, batch_size=4,
                        test_items=200, methods=["full"])
    assert accuracy.pace(a) == (24.0, 750.0)
    logged = []
    accuracy.plan(a, log=logged.append)
    # the run left (seed 2 of the 256-step setting) at its own seeds' median, 22 s per step (20 and 24)
    assert logged == [f"final stage: 1 run(s) to train (full ×1), about {(256 * 22.0 + 750) / 60:.0f} min (1.8 h) "
                      "on one core: 24.0 s per optimizer step (the median full FT step measured here; a setting "
                      "with a finished seed at its own measured pace) + 12 min per run to load, validate and test "
                      "on 200 items"]
    assert calls == []


def test_accuracy_cost_of_a_setting_is_its_own_measured_pace_once_a_seed_is_done(tmp_path, monkeypatch):
    """A run's estimated training time is its trained steps at full FT's pace times what one of its steps cost
    against that pace in its setting's finished runs (median over seeds; another lr's runs, another study's and a
    run that failed do not count), else full FT's step (an upper bound); the default step policy trains ρ of the
    steps, and a checkpoint's steps are done."""
    accuracy, _ = final_stage(tmp_path, monkeypatch, {"full": {"lr": 3e-5, "options": {}},
                                                      "greentrainer": {"lr": 1e-4, "options": {}},
                                                      "gt-fewer0.5": {"lr": 1e-4, "options": {}}})
    a = SimpleNamespace(dataset="scitldr", sweep_from="scitldr", seeds=None, steps=256, epochs=2, batch_size=4,
                        test_items=200, methods=None)
    winners = json.loads((tmp_path / "accuracy_sweep_scitldr.json").read_text())["winners"]
    gt, fewer, other_lr = (accuracy.setting(a, label, winners) for label in ("gt0.6", "gt-fewer0.5", "gt0.5-lr3e-4"))
    assert accuracy.run_cost(a, gt, 10.0, 100.0) == 256 * 10.0 + 100.0  # nothing measured yet: full FT's step
    assert accuracy.run_cost(a, fewer, 10.0, 100.0, done=28) == 100 * 10.0 + 100.0

    def finished(s, seed, train_time_s, study=a, **extra):
        path = accuracy.final_path(study, s, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"optimizer_steps": 256, "train_time_s": train_time_s, **extra}))
    for seed, seconds in [(0, 256 * 6.0), (1, 256 * 7.0), (2, 256 * 9.0)]:
        finished(gt, seed, seconds)
    finished(other_lr, 0, 256 * 1.0)  # another setting: not gt0.6's pace
    finished(gt, 0, 1.0, study=SimpleNamespace(**{**vars(a), "steps": 512}))  # another study length: neither
    assert accuracy.step_share(a, gt, 10.0) == 0.7
    assert accuracy.run_cost(a, gt, 10.0, 100.0, done=56) == pytest.approx(200 * 7.0 + 100.0)
    finished(fewer, 0, 128 * 12.0)  # ρ·256 = 128 trained steps, each 1.2 of full FT's pace
    finished(fewer, 1, 128 * 12.0, error="stopped: non-finite loss")  # counts its time like any other
    assert accuracy.step_share(a, fewer, 10.0) == pytest.approx(1.2)
    assert accuracy.run_cost(a, fewer, 10.0, 100.0, done=28) == pytest.approx(100 * 12.0 + 100.0)
    finished(gt, 1, None, error="--rho 0.6 is below ...")  # a refused run, no training time: not counted
    assert accuracy.step_share(a, gt, 10.0) == pytest.approx(0.75)


def test_accuracy_until_starts_only_the_runs_that_end_in_time(tmp_path, monkeypatch):
    """--until: a run that would end after the deadline (at the study's pace) is left for a later call, a shorter
    one after it still starts, a stopped run counts only the steps after its checkpoint (so does the plan); the
    clock time parses to the next such time."""
    import time
    accuracy, calls = final_stage(tmp_path, monkeypatch, {"full": {"lr": 3e-5, "options": {}}})
    logged = []
    a = SimpleNamespace(dataset="scitldr", sweep_from="scitldr", seeds=1, steps=256, epochs=2, batch_size=4,
                        test_items=200, methods=["full", "full@0.45"])
    per_step, overhead = accuracy.pace(a)
    long, short = 256 * per_step + overhead, 115 * per_step + overhead
    a.until = time.time() + (long + short) / 2
    accuracy.final(a, log=logged.append)
    assert calls == [("full", {"epochs": 2, "max_train": 512, "max_steps": 115}, 3e-5, 0)]
    assert logged[1].startswith(f"full seed 0: about {long / 60:.0f} min, past --until ")
    # a run stopped at its checkpoint costs only its steps left: at step 224 of 256 it fits, and the plan says so
    work = accuracy.work_dir(accuracy.final_path(a, ("full", {}, 3e-5), 0)) / "checkpoint"
    work.mkdir(parents=True)
    (work / "state.pt").write_bytes(b"")
    (work / "meta.json").write_text(json.dumps({"global_step": 224}))
    assert accuracy.checkpoint_step(accuracy.final_path(a, ("full", {}, 3e-5), 0)) == 224
    calls.clear()
    accuracy.final(a, log=logged.append)
    assert calls[0] == ("full", {}, 3e-5, 0)
    said = [line for line in logged if line.startswith("final stage:")][-1]
    minutes = (32 * per_step + overhead + short) / 60
    assert f"1 of them partly done (from a checkpoint, or running now), about {minutes:.0f} min" in said
    (work / "state.pt").unlink()  # no state, no checkpoint: from scratch again
    assert accuracy.checkpoint_step(accuracy.final_path(a, ("full", {}, 3e-5), 0)) == 0
    a.until = time.time() + long + 60
    calls.clear()
    accuracy.final(a, log=logged.append)
    assert calls == [("full", {}, 3e-5, 0), ("full", {"epochs": 2, "max_train": 512, "max_steps": 115}, 3e-5, 0)]
    assert 0 < accuracy.until(time.strftime("%H:%M", time.localtime(time.time() + 120))) - time.time() <= 180
    with pytest.raises(argparse.ArgumentTypeError):
        accuracy.until("25:00")


def test_accuracy_full_ft_for_fewer_steps_is_planned_at_greentrainers_flops_and_paired_with_it(tmp_path, monkeypatch):
    """Issue 34: full FT for fewer steps at every GreenTrainer ρ's FLOPs, 3 seeds at full FT's swept lr, each a
    run of its own (epochs × items) whose linear schedule is over its own steps: ρ 0.5 the long run's first epoch
    exactly (its 512 items, its seed), ρ 0.45/0.6/0.7 the long run cut at step 115/154/179 (--max-steps); the
    data-budget setting one epoch of 716 items. The report pairs GreenTrainer ρ with each, ROUGE-L and validation
    loss, from whatever runs are done."""
    import greentrainer.run
    from greentrainer.config import config_from_options
    accuracy, calls = final_stage(tmp_path, monkeypatch, {
        "full": {"lr": 3e-5, "options": {}}, "greentrainer": {"lr": 1e-4, "options": {}}})
    logged = []
    a = SimpleNamespace(dataset="scitldr", sweep_from="scitldr", seeds=None, steps=256, epochs=2, batch_size=4,
                        test_items=200, methods=["full", "full@0.45", "full@0.5", "full@0.6", "full@0.7",
                                                 "full@0.7-once"])
    accuracy.final(a, log=logged.append)
    half, most = {"epochs": 1, "max_train": 512}, {"epochs": 2, "max_train": 512, "max_steps": 179}
    p45, p60 = ({"epochs": 2, "max_train": 512, "max_steps": n} for n in (115, 154))
    once = {"epochs": 1, "max_train": 716}
    assert calls == [("full", o, 3e-5, seed) for seed in range(3) for o in ({}, p45, half, p60, most, once)]
    assert [accuracy.run_steps(a, o) for o in ({}, p45, half, p60, most, once)] == [256, 115, 128, 154, 179, 179]
    # the cost is said before anything trains: 18 runs at the default pace (no full FT run measured one here)
    per_step, overhead = accuracy.PACE_S_PER_STEP, accuracy.PACE_OVERHEAD_S
    minutes = (3 * (256 + 115 + 128 + 154 + 179 + 179) * per_step + 18 * overhead) / 60
    assert logged[0].startswith("final stage: 18 run(s) to train (full ×3, full@0.45 ×3, full@0.5 ×3, "
                                "full@0.6 ×3, full@0.7 ×3, full@0.7-once ×3), about " + f"{minutes:.0f} min")
    # --stage plan says the same and trains nothing
    planned = []
    accuracy.plan(a, log=planned.append)
    assert planned == logged[:1] and len(calls) == 18
    # the run's own configuration: the variant's epochs and items replace the study's, the schedule's length
    # (epochs × ⌈items / batch⌉, no warm-up) is the run's steps, and the items and seed are the long run's
    configs = []
    metrics = {"totals": {"flops_fraction_of_full": 1.0, "flops_total": 50.0, "time_s": 1.0, "steps": 128},
               "n_train": 512, "n_validation": 4, "history": [{"val_loss": 2.0, "train_loss": 2.1}], "config": {},
               "eval": {"rougeL_first_ref": 30.0}}
    monkeypatch.setattr(greentrainer.run, "run_training", lambda cfg, log=None, progress=True:
                        configs.append(cfg) or metrics)
    accuracy = accuracy_module(tmp_path, monkeypatch)  # its own one_run again
    monkeypatch.setattr(accuracy, "per_item_rouge", lambda preds: [])
    b = SimpleNamespace(**{**vars(a), "val_items": 4, "test_items": 4, "max_input_length": 160})
    for opts in ({}, half):
        work = tmp_path / "accuracy" / "scitldr" / "final" / ".work" / accuracy.run_id("full", opts, 3e-5, 1, 256)
        work.mkdir(parents=True)
        (work / "predictions.jsonl").write_text("")
        r = accuracy.one_run(b, "final", "full", opts, 3e-5, 1, lambda *x: None)
    long, short = configs
    assert (long.epochs, long.max_train, short.epochs, short.max_train) == (2, 512, 1, 512)
    assert long.seed == short.seed == 1 and long.lr == short.lr == 3e-5 and short.warmup_steps == 0
    assert short.epochs * -(-short.max_train // short.batch_size) == 128 and short.save_every == 16
    assert r["optimizer_steps"] == 128 and r["options"] == half and r["steps"] == 256
    config_from_options(dict(method="full", **most)).validate()
    # the report, from partial results: full@0.7 has two seeds so far, the data-budget run none
    folder = tmp_path / "accuracy" / "scitldr" / "final"
    for p in folder.glob("*.json"):
        p.unlink()
    for label, method, opts, lr, rouge, flops, val, seeds in (
            ("full", "full", {}, 3e-5, [40, 40, 40], 100.0, 2.40, 3),
            ("gt0.5", "greentrainer", {"rho": 0.5}, 1e-4, [39, 40, 41], 49.8, 2.48, 3),
            ("gt0.7", "greentrainer", {"rho": 0.7}, 1e-4, [40, 42, 44], 69.7, 2.45, 3),
            ("full@0.5", "full", half, 3e-5, [38, 38, 38], 50.0, 2.43, 3),
            ("full@0.7", "full", most, 3e-5, [39, 39, 39], 69.5, 2.41, 2)):
        for seed in range(seeds):
            (folder / f"{accuracy.run_id(method, opts, lr, seed, 256)}.json").write_text(json.dumps({
                "method": method, "options": opts, "seed": seed, "lr": lr, "steps": 256, "per_item_rougeL": rouge,
                "test_ids": ["a", "b", "c"], "eval": {"rouge1_first_ref": 40.0},
                "flops_fraction_of_full": flops / 100 if method != "full" else 1.0, "flops_total": flops,
                "val_loss": [val + 0.01, val + 0.001 * seed], "train_time_s": 10.0,
                "optimizer_steps": accuracy.run_steps(a, opts) if method == "full" else 256}))
    rows = {r["variant"]: r for r in accuracy.report(a)}
    assert rows["full@0.5"]["flops_fraction"] == pytest.approx(0.5) and rows["full@0.5"]["optimizer_steps"] == 128
    assert rows["full@0.7"]["flops_fraction"] == pytest.approx(0.695) and rows["full@0.7"]["seeds"] == 2
    assert rows["full@0.5"]["vs_full"] == pytest.approx(-2.0) and "full@0.7-once" not in rows
    table = (tmp_path / "accuracy_scitldr.md").read_text()
    assert "| Full FT, 50% of the steps | 3 | 3e-05 | 38.0 (" in table
    # each item's mean over seeds paired: GreenTrainer 39, 40, 41 against 38 (ROUGE-L); validation loss by seed
    assert "| GreenTrainer ρ=0.5 − Full FT, 50% of the steps | 3, 3 | +2.00 (" in table
    assert "| +0.0500 (+0.0500 to +0.0500) | selection against full FT for fewer steps, equal FLOPs (ρ 0.5) |" in table
    assert "| GreenTrainer ρ=0.7 − Full FT, 70% of the steps | 3, 2 | +3.00 (" in table
    assert "128 optimizer steps, 1 epoch over 512 items: the long run's first epoch exactly" in table
    assert "179 optimizer steps, 2 epochs over 512 items: the long run's first 179 steps exactly" in table
    assert "tuned at the sweep's 64 steps" in table
    assert "each of its 2 epochs (mean over seeds): 2.4100 → 2.4010" in table  # the long runs only
    paired = json.loads((tmp_path / "accuracy_scitldr.json").read_text())["paired"]
    assert {(p["variant"], p["against"]) for p in paired} >= {("gt0.5", "full@0.5"), ("gt0.7", "full@0.7")}
    assert "Full FT, fewer steps" in accuracy.FAMILIES and (tmp_path / "accuracy_scitldr.png").exists()
    assert (tmp_path / "accuracy_scitldr_fewer.png").exists()  # the question in one picture
    assert (rows["full@0.7"]["val_min"], rows["full@0.7"]["val_max"]) == (pytest.approx(2.41), pytest.approx(2.411))


def test_accuracy_runs_are_claimed_so_two_processes_never_train_one_twice(tmp_path, monkeypatch):
    """A run's lock holds the pid training it: a second process skips the run while that process lives, takes it
    over once it is gone, and the lock goes when the run ends."""
    accuracy = accuracy_module(tmp_path, monkeypatch)
    trained = []
    monkeypatch.setattr(accuracy, "_train_one", lambda *args: trained.append(args[-1].name) or {"val_loss": [1.0]})
    a = SimpleNamespace(dataset="scitldr", steps=8, epochs=1, quick=True)  # --quick: in final/
    lock = tmp_path / "accuracy" / "scitldr" / "final" / f"{accuracy.run_id('full', {}, 1e-4, 0, 8)}.lock"
    lock.parent.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "accuracy.py"])
    import time
    for _ in range(100):  # until it has exec'd (its command line is the script's)
        if b"accuracy.py" in Path(f"/proc/{live.pid}/cmdline").read_bytes():
            break
        time.sleep(0.05)
    try:
        lock.write_text(str(live.pid))  # a live process of the script trains it
        skipped = accuracy.one_run(a, "final", "full", {}, 1e-4, 0, lambda *x: None)
    finally:
        live.kill()
    assert skipped == {"error": "running in another process"} and not trained and lock.exists()
    lock.write_text(str(os.getpid()))  # a live process that is not the script (its pid reused): stale
    assert accuracy.one_run(a, "final", "full", {}, 1e-4, 0, lambda *x: None) == {"val_loss": [1.0]}
    trained.clear()
    lock.with_suffix(".json").unlink(missing_ok=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(gone.stdout.strip())  # its process died: the run is taken over
    assert accuracy.one_run(a, "final", "full", {}, 1e-4, 0, lambda *x: None) == {"val_loss": [1.0]}
    assert trained == [lock.with_suffix(".json").name] and not lock.exists()


def test_accuracy_report_refuses_runs_scored_on_other_items(tmp_path, monkeypatch):
    """Pooling seeds and pairing methods compare item by item: runs on other test items stop the report."""
    accuracy = accuracy_module(tmp_path, monkeypatch)
    same = [{"method": "full", "seed": 0}, {"method": "full", "seed": 1, "test_ids": ["a", "b"]},
            {"method": "lora", "seed": 2, "test_ids": ["a", "b"]}]
    accuracy.check_same_items(same)  # ids kept from seed 1 on; the runs before them are seed 0's items
    with pytest.raises(SystemExit, match="not all scored on the same test items"):
        accuracy.check_same_items(same + [{"method": "smt", "seed": 1, "test_ids": ["a", "c"]}])
    with pytest.raises(SystemExit, match="full seed 1"):
        accuracy.check_same_items([{"method": "full", "seed": 1}])  # a seed's own items, before eval_seed


def test_accuracy_run_stopped_with_its_session_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """A run trains in its own run folder with checkpoints; one whose checkpoint is there is resumed (not
    started again) and the folder goes once the run's JSON is written."""
    import greentrainer.run
    accuracy = accuracy_module(tmp_path, monkeypatch)
    calls = []
    metrics = {"totals": {"flops_fraction_of_full": 0.5, "flops_total": 1.0, "time_s": 1.0}, "n_train": 8,
               "n_validation": 4, "history": [{"val_loss": 2.0, "train_loss": 2.1}], "config": {}}

    def fake_resume(run_dir, log=None, progress=True):
        calls.append(("resume", run_dir))
        return metrics

    def fake_train(cfg, log=None, progress=True):
        calls.append(("train", cfg.output_dir, cfg.save_every))
        return metrics
    monkeypatch.setattr(greentrainer.run, "resume_training", fake_resume)
    monkeypatch.setattr(greentrainer.run, "run_training", fake_train)
    a = SimpleNamespace(dataset="scitldr", steps=64, batch_size=4, epochs=2, val_items=4, test_items=4,
                        max_input_length=160)
    work = tmp_path / "accuracy" / "scitldr" / "sweep" / ".work" / accuracy.run_id("full", {}, 1e-4, 0, 64)
    (work / "checkpoint").mkdir(parents=True)
    (work / "checkpoint" / "state.pt").write_bytes(b"")
    r = accuracy.one_run(a, "sweep", "full", {}, 1e-4, 0, lambda *x: None)
    assert calls == [("resume", str(work))] and r["resumed"] and not work.exists()
    r = accuracy.one_run(a, "sweep", "full", {}, 3e-4, 0, lambda *x: None)  # a new run: checkpoints every 8 steps
    assert calls[1][0] == "train" and calls[1][2] == 8 and not r["resumed"]


def test_accuracy_keeps_a_refused_setting_but_not_a_refused_resume(tmp_path, monkeypatch):
    """A setting the tool refuses (ρ below the smallest feasible) is kept as an error JSON, so the report says so
    and it is not tried again; a refusal while continuing from a checkpoint says nothing of the setting: the
    checkpoint stays and no JSON is written, so the run is tried again."""
    import greentrainer.run
    from greentrainer.errors import UsageError
    accuracy = accuracy_module(tmp_path, monkeypatch)

    def refuse(*args, **kw):
        raise UsageError("refused")
    monkeypatch.setattr(greentrainer.run, "resume_training", refuse)
    monkeypatch.setattr(greentrainer.run, "run_training", refuse)
    a = SimpleNamespace(dataset="scitldr", steps=64, batch_size=4, epochs=2, val_items=4, test_items=4,
                        max_input_length=160)
    folder = tmp_path / "accuracy" / "scitldr" / "sweep"
    stopped = accuracy.run_id("full", {}, 1e-4, 0, 64)
    (folder / ".work" / stopped / "checkpoint").mkdir(parents=True)
    (folder / ".work" / stopped / "checkpoint" / "state.pt").write_bytes(b"")
    r = accuracy.one_run(a, "sweep", "full", {}, 1e-4, 0, lambda *x: None)
    assert "error" in r and not (folder / f"{stopped}.json").exists()
    assert (folder / ".work" / stopped / "checkpoint" / "state.pt").is_file()
    r = accuracy.one_run(a, "sweep", "full", {}, 3e-4, 0, lambda *x: None)  # a new run refused: kept
    kept = json.loads((folder / f"{accuracy.run_id('full', {}, 3e-4, 0, 64)}.json").read_text())
    assert kept["error"] == "refused" == r["error"]
