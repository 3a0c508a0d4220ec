"""Changing keys in a gpugate.toml without disturbing the rest (install.sh uses it).

Everything not asked to change stays byte for byte: comments, order, lists, tables, quoting
(tomlkit edits the document in place). Run as ``python -m gpugate.config_file FILE section.key=value ...``;
it prints a line when it wrote the file, and nothing when the file already said so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import tomlkit
from tomlkit.items import Table


def update(text: str, values: dict[str, str]) -> str:
    """``text`` with each ``section.key`` set to its value (string values), all else as it was."""
    doc = tomlkit.parse(text)
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        table = doc.get(section)
        if table is None:
            table = doc[section] = tomlkit.table()
        if not isinstance(table, Table):
            raise ValueError(f"[{section}] in the settings file is not a table")
        if table.get(key) != value:
            table[key] = value
    return tomlkit.dumps(doc)


def write(path: Path, values: dict[str, str]) -> bool:
    """Apply ``values`` to the file (made if missing, readable by its owner only); True if it changed."""
    old = path.read_text() if path.exists() else ""
    new = update(old, values)
    if new == old:
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as out:
        out.write(new)
    return True


def main(argv: list[str]) -> int:
    path, pairs = Path(argv[0]), argv[1:]
    values = dict(pair.split("=", 1) for pair in pairs)
    if write(path, values):
        print(f"gpugate install: settings written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
