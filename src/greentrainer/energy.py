"""Energy and carbon of a run: kWh (measured where the hardware allows, else estimated, and labelled so),
gCO2eq at a grid intensity or along a trace of it, and the policy of carbon-aware ρ.

Energy is read by CodeCarbon's offline tracker (no network), one per process for that process: its GPU
through NVML (measured), its CPU through RAPL where Linux exposes it (measured) or else CodeCarbon's estimate
(the CPU's TDP × this process's CPU load), its memory by CodeCarbon's power model (estimated). CodeCarbon was
chosen over Zeus because it also estimates where nothing can be measured (a laptop, a VM, this CPU box) and
ships a country table of grid intensities for offline use; Zeus measures only.

Carbon is energy × grid intensity. The intensity is one figure (a number, or a country's yearly mean from
CodeCarbon's table) or a trace (CSV ``timestamp,gco2_per_kwh``) read along a clock that starts at
``carbon_start`` and advances by the measured training time × ``carbon_time_scale``, so a run's carbon along a
day of grid data can be simulated offline and tested.
"""
from __future__ import annotations

import bisect
import csv
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from .errors import UsageError

WORLD_AVERAGE = 475.0  # gCO2eq/kWh: IEA's world average (Global Energy & CO2 Status Report 2019), CodeCarbon's default
WORLD_SOURCE = "world average, IEA 2019 (CodeCarbon's default)"


# ---------------------------------------------------------------- grid intensity: one figure or a trace

def _codecarbon_table(*parts: str) -> Path:
    """A file of CodeCarbon's offline tables (its package data, ``data/private_infra/...``)."""
    import codecarbon
    return Path(codecarbon.__file__).parent.joinpath("data", "private_infra", *parts)


def _energy_mix() -> dict:
    """CodeCarbon's offline table of countries' electricity mix and carbon intensity (by ISO 3166 alpha-3)."""
    return json.loads(_codecarbon_table("global_energy_mix.json").read_text())


def parse_intensity(spec: str | None) -> tuple[float, str]:
    """(gCO2eq/kWh, where the figure comes from) for ``--carbon-intensity``: a number, a 3-letter country code
    (its yearly mean in CodeCarbon's offline table), a US state (``USA/CA``), or None (the world average)."""
    if spec is None:
        return WORLD_AVERAGE, WORLD_SOURCE
    try:
        value = float(spec)
    except ValueError:
        value = None
    if value is not None:
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"--carbon-intensity must be a finite number ≥ 0 (gCO2eq/kWh), got {spec}")
        return value, "given (--carbon-intensity)"
    if "/" in str(spec):
        return _us_state_intensity(str(spec))
    mix = _energy_mix()
    row = mix.get(str(spec).strip().upper())
    if row is None:
        raise UsageError(f"--carbon-intensity {spec!r}: neither a number (gCO2eq/kWh) nor a 3-letter country code "
                         f"of CodeCarbon's table (e.g. USA, DEU, FRA, GBR, IND, CHN)")
    return float(row["carbon_intensity"]), (f"{row['country_name']}, {row.get('year', '?')} yearly mean "
                                            f"(CodeCarbon's offline energy-mix table)")


def _us_state_intensity(spec: str) -> tuple[float, str]:
    """``USA/CA`` or ``USA/california``: the state's mean from EPA eGRID (CodeCarbon's offline table)."""
    country, region = (x.strip() for x in spec.split("/", 1))
    path = _codecarbon_table("2023", "usa_emissions.json")
    table = json.loads(path.read_text()) if country.upper() == "USA" and path.is_file() else {}
    for name, row in table.items():
        if not name.startswith("_") and region.lower() in (name, str(row.get("regionCode", "")).lower()):
            source = table.get("_source", {})
            return float(row["emissions"]) * 0.45359237, (f"{name.title()}, {source.get('name', 'EPA eGRID')} "
                                                          f"(CodeCarbon's offline table)")
    raise UsageError(f"--carbon-intensity {spec!r}: a region is known only for the USA (USA/CA, USA/texas, ...)")


def parse_time(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 timestamp (naive = UTC; a trailing Z is allowed) or of a number
    of seconds since the epoch."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    t = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class CarbonTrace:
    """Grid intensity over time: each value holds from its timestamp to the next (the last one holds on)."""

    times: tuple[float, ...]
    values: tuple[float, ...]
    source: str = ""

    def at(self, t: float) -> float:
        i = bisect.bisect_right(self.times, t) - 1
        return self.values[max(i, 0)]

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)


def load_carbon_trace(path: str) -> CarbonTrace:
    """Read a CSV of ``timestamp,gco2_per_kwh`` rows (a header row is allowed; timestamps ISO 8601 or seconds
    since the epoch, strictly increasing; intensities finite and ≥ 0)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--carbon-trace {path}: file not found")
    st = p.stat()  # the options are checked, then the run builds its grid: the file is parsed once
    return _parse_trace(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _parse_trace(path: str, mtime_ns: int, size: int) -> CarbonTrace:
    p = Path(path)
    try:
        rows = list(csv.reader(p.read_text(encoding="utf-8").splitlines()))
    except UnicodeDecodeError:
        raise UsageError(f"--carbon-trace {path}: not a UTF-8 text file") from None
    except OSError as e:
        raise UsageError(f"--carbon-trace {path}: cannot read it ({e.strerror})") from None
    rows = [r for r in rows if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    times, values = [], []
    for n, row in enumerate(rows, 1):
        try:
            if len(row) < 2:
                raise ValueError
            t, v = parse_time(row[0]), float(row[1])
        except ValueError:
            if n == 1 and not times:
                continue  # the header
            raise UsageError(f"--carbon-trace {path}: row {n} is not 'timestamp,gco2_per_kwh': {','.join(row)[:80]}") \
                from None
        if not math.isfinite(v) or v < 0:
            raise UsageError(f"--carbon-trace {path}: row {n}: intensity must be a finite number ≥ 0, got {row[1]}")
        if times and t <= times[-1]:
            raise UsageError(f"--carbon-trace {path}: row {n}: timestamps must increase ({row[0].strip()} is not "
                             f"after the row before)")
        times.append(t)
        values.append(v)
    if not times:
        raise UsageError(f"--carbon-trace {path}: no 'timestamp,gco2_per_kwh' rows")
    return CarbonTrace(tuple(times), tuple(values), str(path))


@dataclasses.dataclass(frozen=True)
class Grid:
    """The grid a run draws from: a fixed intensity, or a trace read along the run's clock."""

    intensity: float = WORLD_AVERAGE
    source: str = WORLD_SOURCE
    trace: CarbonTrace | None = None
    start: float = 0.0          # trace time (s since the epoch) at the run's first step
    time_scale: float = 1.0     # trace seconds per second of measured training

    def time_at(self, train_seconds: float) -> float | None:
        """Trace time after ``train_seconds`` of measured training (None without a trace)."""
        return None if self.trace is None else self.start + self.time_scale * train_seconds

    def intensity_at(self, train_seconds: float) -> float:
        return self.intensity if self.trace is None else self.trace.at(self.time_at(train_seconds))

    @property
    def lo(self) -> float:
        return self.intensity if self.trace is None else self.trace.lo

    @property
    def hi(self) -> float:
        return self.intensity if self.trace is None else self.trace.hi

    def describe(self) -> dict:
        if self.trace is None:
            return {"carbon_intensity_g_per_kwh": self.intensity, "carbon_intensity_source": self.source}
        return {"carbon_trace": self.trace.source, "carbon_trace_start": iso(self.start),
                "carbon_time_scale": self.time_scale, "carbon_trace_range_g_per_kwh": [self.lo, self.hi]}


def build_grid(carbon_intensity: str | None, carbon_trace: str | None, carbon_start: str | None,
               time_scale: float) -> Grid:
    """The run's :class:`Grid` from its options (one-line errors for bad ones)."""
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise UsageError(f"--carbon-time-scale must be a positive number, got {time_scale}")
    if carbon_trace is None:
        if carbon_start is not None:
            raise UsageError("--carbon-start needs --carbon-trace")
        return Grid(*parse_intensity(carbon_intensity))
    if carbon_intensity is not None:
        raise UsageError("--carbon-intensity and --carbon-trace contradict each other; give one of them")
    trace = load_carbon_trace(carbon_trace)
    start = trace.times[0]
    if carbon_start is not None:
        try:
            start = parse_time(carbon_start)
        except ValueError:
            raise UsageError(f"--carbon-start {carbon_start!r}: not an ISO 8601 timestamp") from None
        if not trace.times[0] <= start <= trace.times[-1]:
            raise UsageError(f"--carbon-start {carbon_start} is outside the trace ({iso(trace.times[0])} to "
                             f"{iso(trace.times[-1])})")
    return Grid(trace.values[0], f"trace {carbon_trace}", trace, start, time_scale)


# ---------------------------------------------------------------- carbon-aware ρ (a pure policy)

def carbon_aware_rho(intensity: float, lo: float, hi: float, rho_min: float, rho_max: float) -> float:
    """ρ for a grid intensity: ``rho_max`` where the grid is at its cleanest (``lo``), ``rho_min`` at its
    dirtiest (``hi``), linear between, so the run spends its FLOPs where a FLOP emits least."""
    if hi <= lo:
        return rho_max
    share = min(max((intensity - lo) / (hi - lo), 0.0), 1.0)
    return rho_max - share * (rho_max - rho_min)


# ---------------------------------------------------------------- energy: one meter per process

COMPONENTS = ("cpu", "gpu", "ram")
_MEASURED_CPU = {"intel_rapl": "RAPL", "windows_emi": "Windows EMI", "intel_power_gadget": "Intel Power Gadget"}


def step_emissions(energy_kwh: float, step_seconds: list[float], intensities: list[float]) -> list[float]:
    """gCO2eq of each step: the segment's energy shared by the steps' measured times (the power draw is taken
    as steady over a segment), times the grid intensity at each step."""
    total = sum(step_seconds)
    if total <= 0:
        share = [1 / max(len(step_seconds), 1)] * len(step_seconds)
    else:
        share = [s / total for s in step_seconds]
    return [energy_kwh * w * g for w, g in zip(share, intensities)]


class EnergyMeter:
    """kWh of this process over segments of the run (``start``/``stop``), by component, via CodeCarbon.

    CodeCarbon's hardware detection takes about a second; it starts in the background when the meter is made
    (at the start of a run, while the model loads)."""

    def __init__(self, device=None):
        from codecarbon import OfflineEmissionsTracker  # imported here: a run with --no-energy never loads it
        from codecarbon.emissions_tracker import BaseEmissionsTracker
        logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its "unknown CPU, using 4 W/thread" notes
        gpu = None
        if device is not None and getattr(device, "type", None) == "cuda":  # this process's GPU (torchrun: its rank's)
            gpu = [device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))]
        new_api = "output_methods" in inspect.signature(BaseEmissionsTracker.__init__).parameters
        quiet = {"output_methods": []} if new_api else {"save_to_file": False}  # no emissions.csv of its own
        self._tracker = OfflineEmissionsTracker(
            country_iso_code="USA",  # unused: carbon is computed here, from the run's own grid intensity
            log_level="error", tracking_mode="process", measure_power_secs=5, gpu_ids=gpu,
            allow_multiple_runs=True, **quiet)
        self._ready = threading.Thread(target=self._detect, daemon=True)
        self._error: str | None = None
        self._ready.start()
        self._running = False

    def _detect(self) -> None:
        try:
            ready = getattr(self._tracker, "_ensure_hardware_ready", None)  # start_task's first act (cached)
            if ready is not None:
                ready()
        except Exception as e:  # noqa: BLE001  (an unreadable sensor must not stop a run)
            self._error = f"{type(e).__name__}: {e}"

    def start(self) -> None:
        self._ready.join()
        self._tracker.start_task()
        self._running = True

    def stop(self) -> dict:
        """{"cpu", "gpu", "ram": kWh, "seconds": wall time} since :meth:`start` (zeros when not started)."""
        if not self._running:
            return {**dict.fromkeys(COMPONENTS, 0.0), "seconds": 0.0}
        self._running = False
        data = self._tracker.stop_task()
        if data is None:
            return {**dict.fromkeys(COMPONENTS, 0.0), "seconds": 0.0}
        return {"cpu": float(data.cpu_energy or 0.0), "gpu": float(data.gpu_energy or 0.0),
                "ram": float(data.ram_energy or 0.0), "seconds": float(data.duration or 0.0)}

    def lap(self) -> dict:
        """:meth:`stop` and start again (a checkpoint keeps what was used so far)."""
        reading = self.stop()
        self.start()
        return reading

    def describe(self) -> dict:
        """How each component's energy is obtained: {"cpu": "estimated: ...", ...} and ``kind``: measured,
        partly measured or estimated."""
        self._ready.join()
        hw = {type(h).__name__: h for h in getattr(self._tracker, "_hardware", [])}
        how = {}
        cpu = hw.get("CPU")
        if cpu is not None:
            mode = getattr(cpu, "_mode", "")
            how["cpu"] = (f"measured ({_MEASURED_CPU[mode]})" if mode in _MEASURED_CPU else
                          f"estimated: TDP {getattr(cpu, '_tdp', '?')} W × this process's CPU load (no RAPL "
                          f"readable; CodeCarbon's {mode.replace('_', ' ') or 'default'} mode)")
        if "AppleSiliconChip" in hw:
            how["cpu"] = "measured (powermetrics)"
        if "GPU" in hw:
            how["gpu"] = "measured (NVML)"
        if "RAM" in hw:
            how["ram"] = "estimated: CodeCarbon's power model of this process's memory"
        measured = [c for c in ("cpu", "gpu") if how.get(c, "").startswith("measured")]
        kind = "measured" if measured and all(how.get(c, "measured").startswith("measured")
                                              for c in ("cpu", "gpu")) else \
            "partly measured" if measured else "estimated"
        out = {"kind": kind, "components": how, "tracker": f"codecarbon {_codecarbon_version()}",
               "scope": "each process's own use (its CPU share, its memory, its GPU), summed over processes"}
        if self._error:
            out["error"] = self._error
        return out


def _codecarbon_version() -> str:
    from importlib.metadata import version
    try:
        return version("codecarbon")
    except Exception:  # noqa: BLE001
        return "?"


def fmt_energy(kwh: float) -> str:
    """kWh in a readable unit (mWh, Wh or kWh), three significant digits."""
    for unit, scale in (("kWh", 1.0), ("Wh", 1e-3)):
        if kwh >= scale:
            return f"{kwh / scale:.3g} {unit}"
    return f"{kwh / 1e-6:.3g} mWh"


def fmt_co2(g: float) -> str:
    """gCO2eq in a readable unit (mg, g, kg or t), three significant digits."""
    for unit, scale in (("t", 1e6), ("kg", 1e3), ("g", 1.0)):
        if g >= scale:
            return f"{g / scale:.3g} {unit}CO2eq"
    return f"{g * 1000:.3g} mgCO2eq"


def add_readings(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in (*COMPONENTS, "seconds")}


# ---------------------------------------------------------------- the picture of a run

def plot_carbon(history: list[dict], grid: Grid, path) -> None:
    """ρ, measured FLOPs and CO2 over the run's clock (trace time where a trace is given), with the grid's
    intensity: one figure per run (carbon.png in the run folder)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    points = [p for h in history for p in h.get("timeline", [])]
    if not points:
        return
    on_trace = grid.trace is not None

    def x_of(train_s):
        if on_trace:
            return datetime.fromtimestamp(grid.time_at(train_s), tz=timezone.utc)
        return train_s
    xs = [x_of(p["train_s"]) for p in points]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    ax = axes[0]
    if on_trace:
        t0, t1 = grid.time_at(0.0), grid.time_at(points[-1]["train_s"])
        tt = [t for t in grid.trace.times if t0 <= t <= t1]
        tt = [t0, *tt, t1]
        ax.step([datetime.fromtimestamp(t, tz=timezone.utc) for t in tt], [grid.trace.at(t) for t in tt],
                where="post", color="0.4", label="grid (trace)")
    ax.plot(xs, [p["g_per_kwh"] for p in points], ".", ms=3, color="tab:brown", label="at each step")
    ax.set_ylabel("gCO2eq/kWh")
    ax.set_title("Grid intensity" + (f" along {Path(grid.trace.source).name}" if on_trace else f" ({grid.source})"),
                 fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    sel = sorted(((s["step"], s["rho"]) for h in history for s in h.get("selections", []) if "rho" in s))
    by_step = {p["step"]: p["train_s"] for p in points}
    if sel:
        known = sorted(by_step)
        sx = [x_of(by_step.get(step, by_step[min(known, key=lambda k: abs(k - step))])) for step, _ in sel]
        ax.step(sx + [xs[-1]], [r for _, r in sel] + [sel[-1][1]], where="post", color="tab:green",
                label="ρ of the selection")
    ax.plot(xs, [p["flops_fraction"] for p in points], ".", ms=3, color="tab:blue",
            label="measured FLOPs / full FT, per step")
    ax.set_ylabel("fraction of full FT")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(xs, [p["co2_g"] for p in points], color="tab:green", label="this run")
    ax.plot(xs, [p["co2_full_ft_reference_g"] for p in points], color="tab:red", ls="--",
            label="full fine-tuning, same batches (this run's energy per FLOP)")
    ax.set_ylabel("gCO2eq, cumulative")
    ax.legend(fontsize=7)
    ax.set_xlabel("trace time (UTC)" if on_trace else "training time (s)")
    if on_trace:
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
        fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
