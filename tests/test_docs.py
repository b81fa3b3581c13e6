"""The documentation: docs/cli.md is the CLI's current --help, and every relative link in README.md and docs/ resolves."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

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
    import json
    reports = [{r["variant"]: r for r in json.loads((ROOT / "bench" / "results" / name).read_text())["rows"]}
               for name in _REPORTS]
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
