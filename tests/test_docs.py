"""The documentation: docs/cli.md is the CLI's current --help, every relative link in README.md and docs/ resolves, and
the numbers the README and docs quote from the accuracy study are the committed reports'."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference", ROOT / "scripts" / "gen_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_help():
    expected = _generator().cli_reference()
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == expected, "docs/cli.md is out of date: run python scripts/gen_cli_reference.py"


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _anchors(md: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", _FENCE.sub("", md), re.M):
        out.add(re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, "docs/ has no pages"
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in _LINK.findall(_FENCE.sub("", text)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                if target.startswith("#") and target[1:] not in _anchors(text):
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
                continue  # http(s)://, mailto: and the like
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve()
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


# the README headline table's rows, by the accuracy report's variant names
_HEADLINE = {"full FT, every step (100 %)": "full", "full FT, every step at 1e-4": "full-lr1e-4",
             "every tensor for half the steps": "gt-fewer0.5",
             "full FT for half the steps": "full@0.5", "the paper's tensor selection": "gt0.5",
             "skip / partial / full per step": "gt-frontier0.5"}
_REPORTS = ("accuracy_scitldr.json", "accuracy_dialogsum_512steps_1epochs.json")


def test_readme_headline_numbers_come_from_the_reports():
    """Every number in the README's headline table is the committed accuracy report's: lr, validation loss (4
    decimals), ROUGE-L (1 decimal) and seeds, for SciTLDR and DialogSum (regenerate the table when runs land); "—"
    marks a variant the report has no runs of yet."""
    reports = [{r["variant"]: r for r in report["rows"]} for report in _reports(*_REPORTS)]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| at ρ 0.5 (FLOPs of full FT) |"):]
    table = table[:table.index("\n\n")].splitlines()[2:]
    wrong, found = [], set()
    for line in table:
        cells = [c.strip().strip("*`") for c in line.strip("|").split("|")]
        variant = next(v for k, v in _HEADLINE.items() if cells[0].startswith(k))
        found.add(variant)
        for report, (val, rouge, seeds) in zip(reports, (cells[2:5], cells[5:8])):
            if (val, rouge, seeds) == ("—", "—", "—") and variant not in report:
                continue
            r = report.get(variant, {"lr": None, "val_loss": float("nan"), "rougeL": float("nan"), "seeds": 0})
            want = [f"{r['val_loss']:.4f}", f"{r['rougeL']:.1f}", str(r["seeds"])]
            if [val, rouge, seeds] != want or float(cells[1]) != r["lr"]:
                wrong.append(f"{cells[0]}: README {cells[1:8]}, report lr {r['lr']} {want}")
    assert found == set(_HEADLINE.values()), f"headline rows missing: {set(_HEADLINE.values()) - found}"
    assert not wrong, "README headline table differs from bench/results:\n" + "\n".join(wrong)


def _quoted_numbers_not_in(text: str, reports: list[dict]) -> tuple[list[str], int]:
    """Numbers quoted by hand from accuracy reports that none of them holds at the precision written, and how many
    intervals were checked. By the docs' convention ROUGE-L differences are written to 1-2 decimals, validation-
    loss differences to 3 and losses to 4: each "difference ... (low to high)" must be one paired comparison of
    that kind (ROUGE-L: a report's paired difference or a row against full FT, with its 95 % interval;
    validation loss: the mean difference with its range over same-seed runs), each other signed number one of
    that kind's differences, each unsigned 4-decimal number a validation loss (a row's, its seed range, the
    sweep's).
    Percentages are not checked."""
    def values(tree, keys):
        if isinstance(tree, dict):
            return [x for k, v in tree.items() for x in ([v] if k in keys and isinstance(v, (int, float))
                                                         else values(v, keys))]
        return [x for v in tree for x in values(v, keys)] if isinstance(tree, list) else []

    rouge, val = [], []  # (difference, low, high) triples of each kind
    for r in reports:
        for p in r.get("paired", []):
            rouge.append((p["difference"], p["ci_low"], p["ci_high"]))
            if None not in (p.get("val_loss_difference_seed_range") or [None]):
                val.append((p["val_loss_difference"], *p["val_loss_difference_seed_range"]))
        rouge += [(w["vs_full"], w["vs_full_low"], w["vs_full_high"]) for w in r.get("rows", [])
                  if w.get("vs_full") is not None]
    pools = {"rouge": [tr[0] for tr in rouge],  # a number quoted alone is a difference, not an interval's end
             "val": values(reports, {"val_loss_difference"}),
             "loss": values(reports, {"val_loss", "val_min", "val_max"})}

    def same(written: str, value) -> bool:  # value rounds to what is written
        x = float(written.replace("−", "-"))
        return value is not None and abs(value - x) <= 0.5 * 10 ** -len(written.split(".")[1]) + 1e-9

    def kind(written: str) -> str:
        return "val" if len(written.split(".")[1]) >= 3 else "rouge"

    signed, unsigned = r"[−+-]\d+\.\d+", r"[−+-]?\d+\.\d+"
    interval = re.compile(rf"(?<![\w.])({signed})(?![\w.])(?:(?![−+-]\d)[^()]){{0,80}}?[(;,][^()\d−+]{{0,40}}?"
                          rf"(?<![\w.])({signed})\s+to\s+({unsigned})(?![\w.])")
    wrong, spans = [], []
    for m in interval.finditer(text):
        spans.append(m.span())
        if not any(all(map(same, m.groups(), tr)) for tr in (val if kind(m.group(1)) == "val" else rouge)):
            wrong.append(f"{m.group(1)} ({m.group(2)} to {m.group(3)}): no paired comparison")
    for m in re.finditer(rf"(?<![\w.])({signed}|\d+\.\d{{4}})(?![\w.])(?!\s*%)", text):
        w = m.group(1)
        if any(a <= m.start() < b for a, b in spans):
            continue
        pool = kind(w) if w[0] in "−+-" else "loss"
        if not any(same(w, v) for v in pools[pool]):
            named = {"rouge": "ROUGE-L difference", "val": "validation-loss difference", "loss": "validation loss"}
            wrong.append(f"{w}: no {named[pool]}")
    return wrong, len(spans)


def _reports(*names: str) -> list[dict]:
    import json
    return [json.loads((ROOT / "bench" / "results" / name).read_text()) for name in names]


@pytest.mark.parametrize("page, start, end, extra, at_least", [
    ("README.md", "At the same learning rate the paper's selection", "[docs/results.md](docs/results.md)", (), 3),
    ("docs/results.md", "## The accuracy benchmark (SciTLDR)", "## DialogSum, every method", ("accuracy_sweep_scitldr.json",), 10),
    ("docs/options.md", "**What `--rho` buys by default", "\n\n", ("accuracy_sweep_scitldr.json",), 2)])
def test_docs_study_numbers_come_from_the_reports(page, start, end, extra, at_least):
    """The README's paragraph under its headline table and the docs' passages on the accuracy study quote the
    reports' paired differences and losses by hand: each must be the current report's, so a report regenerated
    with new runs fails this until the prose follows (history lives in git, not in intervals no file holds)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    text = text[text.index(start):]
    wrong, intervals = _quoted_numbers_not_in(text[:text.index(end)], _reports(*_REPORTS, *extra))
    assert intervals >= at_least, f"expected the study's paired comparisons in {page}"
    assert not wrong, f"{page} numbers not in the reports:\n" + "\n".join(wrong)
