"""Writing results so that a crash, a full disk or a kill never leaves a half-written file looking valid:
everything goes to a temporary name first and is renamed into place."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def scratch_of(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: ``path.tmp`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def _previous_of(path: Path) -> Path:
    """Where the folder being replaced waits until its successor is in place: ``path.old``."""
    return path.with_name(path.name + ".old")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = scratch_of(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def save_dir_atomic(path: Path, write) -> None:
    """Call ``write(tmp_folder)`` and move the folder to ``path``, replacing an older one only on success."""
    clear_scratch(path)
    replace_dir(path, write)


def clear_scratch(path: Path) -> Path:
    """Remove ``path``'s leftover ``.tmp``/``.old`` folders (an earlier save cut short); returns the ``.tmp`` path."""
    for p in (scratch_of(path), _previous_of(path)):
        if p.exists():
            shutil.rmtree(p)
    return scratch_of(path)


def replace_dir(path: Path, finish) -> None:
    """Call ``finish(tmp_folder)``, then put ``path.tmp`` in place of ``path``; on failure the old folder stays."""
    path = Path(path)
    tmp, old = scratch_of(path), _previous_of(path)
    try:
        finish(tmp)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)
