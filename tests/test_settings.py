from __future__ import annotations

from pathlib import Path

import pytest

from gpugate.errors import ConfigError
from gpugate.settings import PROJECT_ROOT, load_settings


def test_defaults_live_in_the_project() -> None:
    settings = load_settings(environ={})
    assert settings.paths.models_dir == PROJECT_ROOT / "models"
    assert settings.workflows.dirs == (PROJECT_ROOT / "workflows",)
    assert settings.comfy.mode == "vendored" and settings.comfy.listen == "127.0.0.1"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "gpugate.toml"
    config.write_text('[comfy]\nport = 8190\nmode = "attach"\nurl = "http://127.0.0.1:8188"\n[paths]\ndata_dir = "/srv/gpugate"\n')
    settings = load_settings(config, environ={"GPUGATE_COMFY__PORT": "8191", "GPUGATE_WORKFLOWS__DIRS": '["a", "/b"]'})
    assert (settings.comfy.port, settings.comfy.mode) == (8191, "attach")
    assert settings.paths.data_dir == Path("/srv/gpugate")
    assert settings.workflows.dirs == (PROJECT_ROOT / "a", Path("/b"))


def test_mistakes_are_named() -> None:
    with pytest.raises(ConfigError, match="comfy.port"):
        load_settings(environ={"GPUGATE_COMFY__PORT": "eighty"})
    with pytest.raises(ConfigError, match="comfy.prot"):
        load_settings(environ={"GPUGATE_COMFY__PROT": "1"})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(Path("/nonexistent.toml"), environ={})
