"""Energy and carbon: grid intensity (a figure, a country, a trace), the run's kWh and gCO2eq with the full
fine-tuning reference, carbon-aware ρ on a synthetic trace, and the picture."""
import json
import math

import pytest

from conftest import train_args
from greentrainer.cli import main
from greentrainer.energy import (WORLD_AVERAGE, Grid, build_grid, carbon_aware_rho, load_carbon_trace,
                                 parse_intensity, parse_time, step_emissions)
from greentrainer.errors import UsageError


def write_trace(path, rows, header=True):
    path.write_text(("timestamp,gco2_per_kwh\n" if header else "") + "".join(f"{t},{v}\n" for t, v in rows))
    return str(path)


# ---------------------------------------------------------------- pure parts

def test_intensity_is_a_number_a_country_or_the_world_average():
    assert parse_intensity(None) == (WORLD_AVERAGE, parse_intensity(None)[1])
    assert parse_intensity("120.5")[0] == 120.5
    fra, src = parse_intensity("fra")  # CodeCarbon's offline table; France's grid is mostly nuclear
    assert 0 < fra < 150 and "France" in src
    assert parse_intensity("IND")[0] > 3 * fra
    ca, src = parse_intensity("USA/CA")  # a US state: EPA eGRID, lbs/MWh converted
    assert 100 < ca < parse_intensity("USA/texas")[0] and "California" in src
    with pytest.raises(UsageError, match="only for the USA"):
        parse_intensity("DEU/bavaria")
    for bad in ("-3", "nan", "XYZ", "France"):
        with pytest.raises(UsageError, match="--carbon-intensity"):
            parse_intensity(bad)


def test_trace_reads_iso_and_epoch_times_and_holds_each_value(tmp_path):
    tr = load_carbon_trace(write_trace(tmp_path / "t.csv", [("2024-06-01T00:00:00Z", 300),
                                                            ("2024-06-01T01:00:00+00:00", 100),
                                                            ("2024-06-01T02:00:00", 200)]))
    t0 = parse_time("2024-06-01T00:00:00Z")
    assert tr.times == (t0, t0 + 3600, t0 + 7200)
    assert [tr.at(t0 - 5), tr.at(t0 + 3599), tr.at(t0 + 3600), tr.at(t0 + 10 ** 6)] == [300, 300, 100, 200]
    assert (tr.lo, tr.hi) == (100, 200 + 100)
    no_header = load_carbon_trace(write_trace(tmp_path / "e.csv", [(0, 5), (60, 7)], header=False))
    assert no_header.times == (0.0, 60.0) and no_header.values == (5.0, 7.0)


@pytest.mark.parametrize("rows, message", [
    ([], "no 'timestamp"),
    ([("2024-01-01T00:00:00", 1), ("2024-01-01T00:00:00", 2)], "increase"),
    ([("2024-01-01T00:00:00", -1)], "≥ 0"),
    ([("2024-01-01T00:00:00", 1), ("yesterday", 2)], "row 3"),
])
def test_bad_traces_are_one_line_errors(tmp_path, rows, message):
    with pytest.raises(UsageError, match=message):
        load_carbon_trace(write_trace(tmp_path / "t.csv", rows))


def test_grid_clock_runs_at_the_time_scale_from_the_start(tmp_path):
    path = write_trace(tmp_path / "t.csv", [("2024-06-01T00:00:00Z", 300), ("2024-06-01T12:00:00Z", 100)])
    g = build_grid(None, path, "2024-06-01T06:00:00Z", 3600.0)  # a second of training = an hour of the trace
    assert g.time_at(0.0) == parse_time("2024-06-01T06:00:00Z")
    assert g.intensity_at(5.9) == 300 and g.intensity_at(6.0) == 100
    fixed = build_grid("250", None, None, 1.0)
    assert fixed.trace is None and fixed.intensity_at(1e9) == 250 and fixed.time_at(3.0) is None
    with pytest.raises(UsageError, match="contradict"):
        build_grid("250", path, None, 1.0)
    with pytest.raises(UsageError, match="outside the trace"):
        build_grid(None, path, "2025-01-01T00:00:00Z", 1.0)
    with pytest.raises(UsageError, match="--carbon-time-scale"):
        build_grid(None, path, None, 0.0)
    with pytest.raises(UsageError, match="needs --carbon-trace"):
        build_grid(None, None, "2024-06-01T00:00:00Z", 1.0)


def test_carbon_aware_rho_is_linear_between_the_cleanest_and_the_dirtiest_grid():
    assert carbon_aware_rho(100, 100, 300, 0.4, 0.8) == 0.8
    assert carbon_aware_rho(300, 100, 300, 0.4, 0.8) == 0.4
    assert math.isclose(carbon_aware_rho(200, 100, 300, 0.4, 0.8), 0.6)
    assert carbon_aware_rho(50, 100, 300, 0.4, 0.8) == 0.8  # outside the range: clipped
    assert carbon_aware_rho(200, 200, 200, 0.4, 0.8) == 0.8  # a flat grid: nothing to gain by waiting


def test_step_emissions_share_the_energy_by_time_at_each_intensity():
    assert step_emissions(2.0, [1.0, 3.0], [100.0, 100.0]) == [50.0, 150.0]
    assert sum(step_emissions(2.0, [1.0, 1.0], [100.0, 300.0])) == 400.0
    assert step_emissions(1.0, [0.0, 0.0], [10.0, 30.0]) == [5.0, 15.0]


# ---------------------------------------------------------------- runs

@pytest.fixture
def rows64(jsonl):
    return jsonl([{"source": f"the cat number {i} sat on the mat and looked at the dog", "target": f"cat {i} sat"}
                  for i in range(64)], "rows64.jsonl")


def test_a_run_reports_energy_carbon_and_the_full_ft_reference(capsys, tmp_path, tiny_model_dir, rows64):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, rows64, out, "--method", "greentrainer", "--rho", "0.7", "--epochs", "2",
                           "--carbon-intensity", "DEU", "--no-eval")) == 0
    said = capsys.readouterr()
    m = json.loads((out / "metrics.json").read_text())
    t, deu = m["totals"], parse_intensity("DEU")[0]
    assert t["energy_kwh"] > 0 and t["energy"]["kind"] in ("measured", "partly measured", "estimated")
    assert set(t["energy"]["components"]) >= {"cpu"}
    for h in m["history"]:
        assert h["energy_kwh"] == pytest.approx(h["energy_kwh_cpu"] + h["energy_kwh_gpu"] + h["energy_kwh_ram"])
        assert h["co2_g"] == pytest.approx(h["energy_kwh"] * deu)  # one intensity: energy × intensity
        per_flop = h["energy_kwh"] / h["flops_total"]  # the reference: full FT's FLOPs at this run's J/FLOP
        assert h["energy_full_ft_reference_kwh"] == pytest.approx(per_flop * h["flops_full_ft_reference"])
        assert h["co2_full_ft_reference_g"] == pytest.approx(h["energy_full_ft_reference_kwh"] * deu)
        assert h["timeline"][-1]["co2_g"] == pytest.approx(sum(x["co2_g"] for x in m["history"][: h["epoch"]]))
    assert t["co2_g"] == pytest.approx(sum(h["co2_g"] for h in m["history"]))
    assert t["co2_g"] < t["co2_full_ft_reference_g"]  # GreenTrainer spends under 70 % of full FT's FLOPs
    assert m["grid"]["carbon_intensity_g_per_kwh"] == deu and "Germany" in m["grid"]["carbon_intensity_source"]
    assert "gCO2eq" in said.out and "full fine-tuning on the same batches" in said.out
    assert (out / "carbon.png").stat().st_size > 10_000


def test_no_energy_turns_the_meter_off(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--no-energy", "--no-eval")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "co2_g" not in m["totals"] and m["totals"]["energy"] == {"kind": "off"}
    assert not (out / "carbon.png").exists()


def test_carbon_aware_rho_follows_a_synthetic_trace(tmp_path, tiny_model_dir, rows64):
    """Clean for the first 2 s of the trace, dirty after; 1000 trace seconds per second of training, so the
    first selection sees the clean grid and every later one the dirty grid."""
    trace = write_trace(tmp_path / "trace.csv", [("2024-06-01T00:00:00Z", 50), ("2024-06-01T00:00:00.002Z", 450),
                                                 ("2024-06-01T01:00:00Z", 450)])
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, rows64, out, "--method", "greentrainer", "--rho", "0.8", "--epochs", "2",
                           "--select-every", "2", "--full-warmup-steps", "0", "--carbon-trace", trace,
                           "--carbon-time-scale", "1", "--carbon-aware", "--rho-min", "0.6", "--rho-max", "1.0",
                           "--no-eval")) == 0
    m = json.loads((out / "metrics.json").read_text())
    sels = [s for h in m["history"] for s in h["selections"]]
    assert sels[0]["rho"] == 1.0 and sels[0]["grid_g_per_kwh"] == 50
    assert len(sels) > 3 and all(s["rho"] == 0.6 and s["grid_g_per_kwh"] == 450 for s in sels[1:])
    # the run stays within the ρ in force: full fine-tuning's FLOPs of each selection's steps × its ρ
    t = m["totals"]
    assert t["flops_total"] <= 1.0 * t["flops_full_ft_reference"]
    steps = [p for h in m["history"] for p in h["timeline"]]
    late = [p["flops_fraction"] for p in steps if p["step"] > sels[2]["step"]]
    assert sum(late) / len(late) <= 0.6 + 0.02
    assert m["grid"]["carbon_trace"] == trace and (out / "carbon.png").exists()


def test_carbon_options_are_checked_before_anything_loads(capsys, tmp_path, tiny_model_dir, data):
    from test_cli import err
    out = tmp_path / "run"
    trace = write_trace(tmp_path / "t.csv", [("2024-06-01T00:00:00Z", 100), ("2024-06-01T01:00:00Z", 200)])
    gt = ["--method", "greentrainer"]
    assert "--carbon-aware needs --carbon-trace" in err(capsys, train_args(tiny_model_dir, data, out, *gt,
                                                                           "--carbon-aware"))
    assert "needs --carbon-aware" in err(capsys, train_args(tiny_model_dir, data, out, *gt, "--rho-min", "0.5"))
    assert "above --rho-max" in err(capsys, train_args(tiny_model_dir, data, out, *gt, "--carbon-aware",
                                                       "--carbon-trace", trace, "--rho-min", "0.9",
                                                       "--rho-max", "0.5"))
    assert "not found" in err(capsys, train_args(tiny_model_dir, data, out, "--carbon-trace", "nope.csv"))
    assert "--carbon-intensity" in err(capsys, train_args(tiny_model_dir, data, out, "--carbon-intensity", "Mars"))
    assert "outside the trace" in err(capsys, train_args(tiny_model_dir, data, out, "--carbon-trace", trace,
                                                         "--carbon-start", "1999-01-01T00:00:00"))
    assert not out.exists()


def test_grid_describes_itself_for_metrics():
    g = Grid(100.0, "given")
    assert g.describe() == {"carbon_intensity_g_per_kwh": 100.0, "carbon_intensity_source": "given"}
