"""A run folder's lifecycle: recognising our own folders (their marker), refusing any other, and creating or
replacing one. The only place that deletes anything, and only what a run of ours wrote."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from .errors import UsageError

try:
    import fcntl
except ImportError:  # not on Windows: run folders are not locked there
    fcntl = None

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


_HELD: dict[Path, int] = {}  # run folders this process holds the lock of: their marker's open file


def in_use(out: Path) -> str | None:
    """Who holds this run folder's lock (a run still writing it: its pid, host and start), or None. The lock is
    the kernel's (flock on the marker), so it ends with its process however that ends: a killed run's folder is
    free again, to resume or replace."""
    marker = out / RUN_MARKER
    if fcntl is None or out.resolve() in _HELD:
        return None
    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: looking never blocks another look
        return None
    except BlockingIOError:
        try:
            m = json.loads(marker.read_text())
            return f"pid {m['pid']} on {m['host']}, started {m['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"
    finally:
        os.close(fd)


def lock_run_folder(out: Path) -> None:
    """Hold the folder's lock for this run (see :func:`in_use`), its marker saying who holds it; released by
    :func:`release_run_folder`, or by the kernel when the process ends."""
    if fcntl is None or out.resolve() in _HELD:
        return
    try:
        fd = os.open(out / RUN_MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"output folder {out} is not writable ({e.strerror})") from None
    for attempt in range(20):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:  # a run holds it, or another launch is only looking (a moment)
            if attempt == 19:
                os.close(fd)
                raise UsageError(in_use_message(out, in_use(out) or "another process")) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps({"created_by": "greentrainer", "pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode())
    _HELD[out.resolve()] = fd


def release_run_folder(out: Path) -> None:
    """Let the folder go (the end of a run, whichever way it ended)."""
    fd = _HELD.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)


def in_use_message(out: Path, holder: str) -> str:
    return (f"output folder {out} is in use by a greentrainer run that is still running ({holder}); wait for it "
            "to end or stop it, or choose another --output-dir")


def check_output_dir(path: str, overwrite: bool, holding: bool = False) -> Path:
    """Refuse an output path we may not write to, before anything is loaded or written.

    A folder a live run is writing is never touched (with or without ``--overwrite``). A non-empty folder is
    replaced only with ``--overwrite`` and only if it is one of our run folders that holds nothing we did not
    write; anything else is never touched. ``holding``: this process holds the folder's lock (its marker made
    by this run)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path exists and is not a folder: {out}")
    holder = in_use(out) if out.is_dir() else None
    if holder:
        raise UsageError(in_use_message(out, holder))
    if out.is_dir() and any(not (holding and e.name == RUN_MARKER) for e in out.iterdir()):
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
    """Create the run folder (replacing our own previous run there when ``overwrite``), mark it as ours and hold
    its lock; the lock is taken before anything is replaced, so two launches on one folder never both write."""
    out = check_output_dir(path, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"output folder {out} is not writable")
    lock_run_folder(out)  # (creates the marker: the folder was empty or ours)
    try:
        check_output_dir(path, overwrite, holding=True)  # again, locked: what another launch did meanwhile
        for e in out.iterdir():  # only our own entries (checked above); links are removed, never followed
            if e.name == RUN_MARKER:
                continue
            if e.is_symlink() or not e.is_dir():
                e.unlink()
            else:
                shutil.rmtree(e)
    except BaseException:
        release_run_folder(out)
        raise
    if fcntl is None:
        (out / RUN_MARKER).write_text(json.dumps({"created_by": "greentrainer"}) + "\n")
    return out
