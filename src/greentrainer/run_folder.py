"""A run folder's lifecycle: recognising our own folders (their marker), refusing any other, and creating or
replacing one. The only place that deletes anything, and only what a run of ours wrote."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import UsageError

RUN_MARKER = ".greentrainer-run"
# Everything a run writes at the top of its folder; --overwrite replaces a folder only if it holds nothing else.
RUN_ENTRIES = {RUN_MARKER, "train_config.json", "train_config.yaml", "logs", "metrics.json", "progress.json",
               "predictions.jsonl", "predictions_before.jsonl", "model", "selections.json", "selection_heatmap.png",
               "carbon.png",
               "model.tmp", "model.old", "checkpoint", "checkpoint.tmp", "checkpoint.old"}


def is_run_folder(out: Path) -> bool:
    """A folder this program made: our marker (or, from older versions, train_config.json + metrics.json or
    progress.json)."""
    return (out / RUN_MARKER).is_file() or ((out / "train_config.json").is_file()
                                            and ((out / "metrics.json").is_file() or (out / "progress.json").is_file()))


def check_output_dir(path: str, overwrite: bool) -> Path:
    """Refuse an output path we may not write to, before anything is loaded or written.

    A non-empty folder is replaced only with ``--overwrite`` and only if it is one of our run folders that
    holds nothing we did not write; anything else is never touched."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output folder {out} is not empty; pass --overwrite to replace it")
        if not is_run_folder(out):
            raise UsageError(f"output folder {out} is not empty and is not a greentrainer run folder; "
                             f"--overwrite only replaces run folders (choose another --output-dir)")
        foreign = sorted(e.name for e in out.iterdir() if e.name not in RUN_ENTRIES and not e.name.endswith(".tmp"))
        if foreign:
            raise UsageError(f"output folder {out} holds files greentrainer did not write "
                             f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); not replacing it")
    return out


def prepare_output_dir(path: str, overwrite: bool) -> Path:
    """Create the run folder (replacing our own previous run there when ``overwrite``) and mark it as ours."""
    out = check_output_dir(path, overwrite)
    if out.is_dir():
        for e in out.iterdir():  # only our own entries (checked above); links are removed, never followed
            if e.is_symlink() or not e.is_dir():
                e.unlink()
            else:
                shutil.rmtree(e)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"output folder {out} is not writable")
    (out / RUN_MARKER).write_text(json.dumps({"created_by": "greentrainer"}) + "\n")
    return out
