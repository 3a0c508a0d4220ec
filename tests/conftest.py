"""Shared fixtures: tiny real models (cached outside the repo), settings on temporary folders, and
one real ComfyUI for the whole session (started once: it takes ~10 s on two cores)."""

from __future__ import annotations

import io
import json
import shutil
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from agent.comfy.engine import ComfyEngine
from gpugate.settings import PROJECT_ROOT, Settings, load_settings
from tests.model_fixtures import CHECKPOINT, UPSCALER

TESTS = Path(__file__).parent
CACHE = Path(os.environ.get("GPUGATE_TEST_CACHE", Path.home() / ".cache" / "gpugate" / "fixtures"))


@pytest.fixture(scope="session")
def fixture_models() -> Path:
    """Build the tiny checkpoint and upscaler once per machine (in a subprocess: torch stays out of here)."""
    subprocess.run([sys.executable, "-m", "tests.model_fixtures", str(CACHE), str(PROJECT_ROOT / "vendor" / "comfyui")],
                   check=True, cwd=PROJECT_ROOT)
    return CACHE


@pytest.fixture(scope="session")
def sample_video() -> Path:
    """A 2 s 320x240 H.264/AAC video (moov at the end, as most encoders write it), made once per machine."""
    folder = CACHE / "media"
    folder.mkdir(parents=True, exist_ok=True)
    video = folder / "sample.mp4"
    if not video.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=2",
                        "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                        "-c:a", "aac", "-shortest", str(video)], check=True)
    return video


@pytest.fixture(scope="session")
def models_dir(fixture_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for kind, name in (("checkpoints", CHECKPOINT), ("upscale_models", UPSCALER)):
        (root / kind).mkdir()
        (root / kind / name).symlink_to(fixture_models / name)
    return root


@pytest.fixture(scope="session")
def drop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initially empty workflow folder the engine also reads: tests drop templates into it."""
    return tmp_path_factory.mktemp("dropped_workflows")


def make_settings(data_dir: Path, models_dir: Path, workflow_dirs: list[Path], **env: str) -> Settings:
    return load_settings(environ={
        "GPUGATE_PATHS__DATA_DIR": str(data_dir),
        "GPUGATE_PATHS__MODELS_DIR": str(models_dir),
        "GPUGATE_WORKFLOWS__DIRS": json.dumps([str(d) for d in workflow_dirs]),
        "GPUGATE_COMFY__EXTRA_CUSTOM_NODE_DIRS": json.dumps([str(TESTS / "comfy_nodes")]),
        "GPUGATE_COMFY__DEVICE": "cpu",
        **env,
    })


@pytest.fixture(scope="session")
def settings(models_dir: Path, drop_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("data"), models_dir,
                         [PROJECT_ROOT / "workflows", TESTS / "workflows", drop_dir])


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[ComfyEngine]:
    async with ComfyEngine(settings) as engine:
        yield engine


@pytest.fixture(scope="module")
async def router(router_settings: Settings) -> AsyncIterator[Any]:
    """A real router on loopback for the module, on the module's own ``router_settings``."""
    from tests.services import Router  # services imports this module

    server = Router(router_settings)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def admin(router: Any) -> Any:
    """An admin key on the module's router (NewKey: .token, .key)."""
    from router.keys import create_key
    from router.state import STORE

    return create_key(router.app[STORE], "admin", admin=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster for the session (tests/postgres.py); ``.new_database()`` per test.
    Its folder is directly in /tmp: the unprivileged user it runs as cannot enter pytest's."""
    from tests.postgres import Cluster

    folder = Path(tempfile.mkdtemp(prefix="gpugate-postgres-"))
    cluster = Cluster(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def image_of(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
