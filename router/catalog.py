"""Model names clients use -> the files agents have, from models/catalog.toml.

A name in the catalog maps to its file; a name that is itself a file name (it has an extension)
is used as is, so a model dropped into an agent's models/ is callable without a catalog entry.
Speech models (whisper sizes, piper voices) are named, not files, and always pass through.
Each kind may have a default, used when a request names no model.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from gpugate.errors import ConfigError

NAMED_KINDS = ("whisper", "piper")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: str
    file: str
    default: bool = False


class Catalog:
    def __init__(self, entries: list[CatalogEntry]) -> None:
        self.entries = {e.name: e for e in entries}

    @classmethod
    def load(cls, path: Path) -> Catalog:
        if not path.exists():
            return cls([])
        try:
            data = tomllib.loads(path.read_text())
            return cls([CatalogEntry(name, m["kind"], m["file"], bool(m.get("default", False)))
                        for name, m in data.get("models", {}).items()])
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def resolve(self, name: str | None, kind: str) -> str | None:
        """The file for ``name`` (or the kind's default); ValueError with the known names if unknown."""
        if not name:
            return next((e.file for e in self.entries.values() if e.kind == kind and e.default), None)
        entry = self.entries.get(name)
        if entry is not None and entry.kind == kind:
            return entry.file
        if ("." in name or kind in NAMED_KINDS) and "/" not in name:
            return name
        known = ", ".join(e.name for e in self.entries.values() if e.kind == kind) or "none"
        raise ValueError(f"unknown model {name!r}; known: {known}")
