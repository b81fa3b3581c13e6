import json

from conftest import train_args
from greentrainer.cli import main


def err(capsys, argv):
    code = main(argv)
    e = capsys.readouterr().err.strip()
    assert code == 2, e
    assert len(e.splitlines()) == 1 and e.startswith("greentrainer: error:"), e
    return e




def test_bad_input_each_gets_one_line_and_exit_2(capsys, tmp_path, tiny_model_dir, data, jsonl):
    out = tmp_path / "run"
    assert "not found" in err(capsys, train_args("./no/such/model", data, out))
    assert "Hugging Face Hub" in err(capsys, train_args("nobody-xyz/nomodel-abc", data, out))
    assert "unknown dataset" in err(capsys, train_args(tiny_model_dir, "nosuchset", out))
    assert "not found" in err(capsys, train_args(tiny_model_dir, str(tmp_path / "missing.jsonl"), out))
    bad = jsonl(['{"source": "a", "target": "b"}', '{"source": "c", "target": "d"}', "{broken"], "bad.jsonl")
    assert "line 3" in err(capsys, train_args(tiny_model_dir, bad, out))
    empty = jsonl([], "empty.jsonl")
    assert "empty" in err(capsys, train_args(tiny_model_dir, empty, out))
    assert "--batch-size" in err(capsys, train_args(tiny_model_dir, data, out, "--batch-size", "0"))
    assert "--lr" in err(capsys, train_args(tiny_model_dir, data, out, "--lr", "-1"))
    assert "--epochs" in err(capsys, train_args(tiny_model_dir, data, out, "--epochs", "0"))
    assert "too small" in err(capsys, train_args(tiny_model_dir, data, out, "--max-input-length", "10"))
    assert "--rho" in err(capsys, train_args(tiny_model_dir, data, out, "--method", "greentrainer", "--rho", "1.5"))
    assert "invalid choice" in err(capsys, train_args(tiny_model_dir, data, out, "--method", "magic"))
    assert "--probe-batches" in err(capsys, train_args(tiny_model_dir, data, out, "--method", "greentrainer",
                                                       "--probe-batches", "0"))
    assert not out.exists()  # nothing half-written
    out.mkdir()
    (out / "something").write_text("x")
    assert "--overwrite" in err(capsys, train_args(tiny_model_dir, data, out))
    assert (out / "something").exists()


def test_max_train_zero_is_rejected(capsys, tmp_path, tiny_model_dir, data):
    assert "--max-train" in err(capsys, train_args(tiny_model_dir, data, tmp_path / "r", "--max-train", "0"))


def test_infeasible_rho_states_the_smallest_feasible_rho(capsys, tmp_path, tiny_model_dir, data):
    e = err(capsys, train_args(tiny_model_dir, data, tmp_path / "r", "--method", "greentrainer", "--rho", "0.3",
                               "--select-once"))
    assert "smallest feasible rho" in e
    assert not (tmp_path / "r").exists()


def test_train_writes_a_complete_run_folder_and_eval_reloads_it(capsys, tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--method", "greentrainer", "--rho", "0.8",
                           "--select-once")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete"
    assert m["totals"]["flops_total"] <= 0.8 * m["totals"]["flops_full_ft_reference"]
    assert {"rouge1_first_ref", "rouge1_best_ref", "rougeL_best_ref"} <= set(m["eval"])
    for f in ("train_config.json", "predictions.jsonl", "model/model.safetensors", "selections.json",
              "selection_heatmap.png"):
        assert (out / f).exists(), f
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--dataset", data, "--num-beams", "1", "--max-new-tokens", "4"]) == 0
    assert "rouge1_first_ref" in capsys.readouterr().out


def test_encoder_decoder_trains_and_evaluates(capsys, tmp_path, tiny_t5_dir, data):
    out = tmp_path / "t5"
    assert main(train_args(tiny_t5_dir, data, out)) == 0
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"


def test_profile_cli_json_contract(capsys, tmp_path):
    from greentrainer.models import tiny_config
    d = tmp_path / "cfg_only"
    tiny_config("opt", "small").save_pretrained(d)  # a folder with only config.json
    assert main(["profile", "--model", str(d), "--batch-size", "2", "--seq-len", "64", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert set(prof) == {"t_fp", "t_full", "tensors", "branches"}
    assert set(prof["tensors"][0]) == {"name", "t_dw", "t_dy"}
    assert prof["t_fp"] + sum(t["t_dw"] + t["t_dy"] for t in prof["tensors"]) == prof["t_full"]
    names = [t["name"] for t in prof["tensors"]]
    assert prof["branches"]  # OPT's K/V (weight and bias) are side branches beside Q
    for b in prof["branches"]:
        assert b["flops"] > 0 and set(b["tensors"]) <= set(names)
        assert b["joins"] is None or names.index(b["joins"]) > max(names.index(t) for t in b["tensors"])
    assert main(["profile", "--model", str(d), "--batch-size", "2", "--seq-len", "64"]) == 0
    assert "t_dw GFLOPs" in capsys.readouterr().out
    assert "--seq-len" in err(capsys, ["profile", "--model", str(d), "--seq-len", "0"])


def test_datasets_lists_bundled_sets(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("scitldr", "dialogsum", "webquestions", "piqa", "samsum"):
        assert name in out


def test_eval_seed_scores_every_seed_on_the_same_items(capsys, tmp_path, tiny_model_dir, jsonl):
    """--max-eval samples the validation and test items with --eval-seed (default: --seed): runs of several
    seeds that share one --eval-seed are scored on the same items, so they can be pooled and paired."""
    rows = [{"source": f"item {i} says the cat sat on mat {i}", "target": f"cat {i}"} for i in range(80)]
    data = jsonl(rows)
    ids = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"s{seed}"
        assert main(train_args(tiny_model_dir, data, out, "--seed", seed, "--eval-seed", "0", "--max-eval", "3",
                               "--max-train", "4")) == 0
        ids.append([json.loads(ln)["id"] for ln in (out / "predictions.jsonl").read_text().splitlines()])
    assert len(ids[0]) == 3 and ids[0] == ids[1] == ids[2]
    # `eval` of a run folder samples with the run's own --eval-seed: the items the run was tested on
    assert main(["eval", "--model", str(out), "--dataset", data, "--max-eval", "3", "--num-beams", "1",
                 "--max-new-tokens", "2", "--output", str(tmp_path / "again.json")]) == 0
    assert [p["id"] for p in json.loads((tmp_path / "again.json").read_text())["predictions"]] == ids[2]
    capsys.readouterr()
    assert "--eval-seed" in err(capsys, train_args(tiny_model_dir, data, tmp_path / "bad", "--eval-seed", "-1"))
