"""The model catalog (models/catalog.toml): names clients use, the files they are, and where to
download them from, with sizes, SHA-256 hashes and the VRAM they need.

The router resolves names to files with it (router/models.py, which also knows the files the
agents report, so a model dropped into an agent's models/ is callable without an entry);
`gpugate models list/pull` on an agent host downloads from it. A name or one of its aliases maps
to its file. Speech models (whisper sizes, piper voices) are named, not files. Each kind may have
a default, used when a request names no model.

An entry downloads as one file (``url``, ``size``, ``sha256``) or several (``[[models.X.files]]``
with ``path``, ``url``, ``size``, ``sha256``); paths are inside models/<kind>/.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpugate.errors import ConfigError

NAMED_KINDS = ("whisper", "piper")


@dataclass(frozen=True)
class CatalogFile:
    path: str  # inside models/<kind>/
    url: str
    size: int | None
    sha256: str


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: str
    file: str  # what a request resolves to: a file in models/<kind>/, or a whisper/piper model name
    default: bool = False
    files: tuple[CatalogFile, ...] = ()  # what to download; empty: not downloadable
    vram_gb: float | None = None
    token_env: str | None = None  # an environment variable holding a token for gated downloads
    description: str = ""
    family: str | None = None  # an image model's family (workflows/families.toml); else the agents detect it
    aliases: tuple[str, ...] = ()  # other ids clients send for it (AI Server's model ids)
    packaged: bool = False  # it ships in a Python package gpugate installs (no download)

    def installed(self, models_dir: Path) -> bool:
        folder = models_dir / self.kind
        if not self.files:
            return (folder / self.file).exists()
        return all((folder / f.path).is_file() for f in self.files)


def _entry(name: str, m: dict[str, Any]) -> CatalogEntry:
    listed = m.get("files") or ([{"path": m["file"], "url": m["url"], "size": m.get("size"), "sha256": m.get("sha256")}]
                                if "url" in m else [])
    files = []
    for f in listed:
        sha256 = str(f.get("sha256") or "").lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ConfigError(f"model {name!r}: file {f.get('path')!r} needs its sha256 (64 hex digits)")
        if Path(f["path"]).is_absolute() or ".." in Path(f["path"]).parts:
            raise ConfigError(f"model {name!r}: file path {f['path']!r} must stay inside models/{m['kind']}/")
        files.append(CatalogFile(f["path"], f["url"], f.get("size"), sha256))
    aliases = m.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"model {name!r}: aliases must be a list of names")
    return CatalogEntry(name, m["kind"], m["file"], bool(m.get("default", False)), tuple(files), m.get("vram_gb"),
                        m.get("token_env"), m.get("description", ""), m.get("family"), tuple(aliases),
                        bool(m.get("packaged", False)))


class Catalog:
    def __init__(self, entries: list[CatalogEntry]) -> None:
        self.entries = {e.name: e for e in entries}
        self._ids: dict[str, CatalogEntry] = {}  # names and aliases
        for entry in entries:
            for id_ in (entry.name, *entry.aliases):
                if id_ in self._ids and self._ids[id_] is not entry:
                    raise ConfigError(f"model id {id_!r} names both {self._ids[id_].name!r} and {entry.name!r}")
                self._ids[id_] = entry

    def find(self, name: str, kind: str | None = None) -> CatalogEntry | None:
        """The entry a name or alias stands for (of ``kind``, when given)."""
        entry = self._ids.get(name)
        return entry if entry is not None and (kind is None or entry.kind == kind) else None

    def by_file(self, kind: str, file: str) -> CatalogEntry | None:
        return next((e for e in self.entries.values() if e.kind == kind and e.file == file), None)

    def default(self, kind: str) -> CatalogEntry | None:
        return next((e for e in self.entries.values() if e.kind == kind and e.default), None)

    def ids(self, kind: str) -> list[str]:
        """Every name and alias of ``kind``."""
        return [id_ for id_, e in self._ids.items() if e.kind == kind]

    @classmethod
    def load(cls, path: Path) -> Catalog:
        if not path.exists():
            return cls([])
        try:
            data = tomllib.loads(path.read_text())
            return cls([_entry(name, m) for name, m in data.get("models", {}).items()])
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: {type(exc).__name__}: {exc}") from exc
