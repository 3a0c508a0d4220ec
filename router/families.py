"""The family table (workflows/families.toml): for each model family and image task, the workflow
that suits it and its parameter defaults. Data, not code: a new family is a table in that file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpugate.errors import ConfigError

TASKS = ("txt2img", "img2img", "inpaint")


@dataclass(frozen=True)
class Recipe:
    """How one family does one task: the workflow to run and the values its parameters default to."""

    family: str
    task: str
    workflow: str
    defaults: Mapping[str, Any]


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    negative_prompt: bool  # whether a negative prompt does anything for this family
    recipes: Mapping[str, Recipe]  # task -> recipe


class FamilyTable:
    def __init__(self, families: Mapping[str, Family], default: str) -> None:
        if families and default not in families:
            raise ConfigError(f"the default family {default!r} is not in the table")
        self.families, self.default = dict(families), default

    @classmethod
    def load(cls, path: Path) -> FamilyTable:
        if not path.exists():
            return cls({}, "")
        try:
            data = tomllib.loads(path.read_text())
            families = {name: _family(name, spec) for name, spec in data.get("families", {}).items()}
            return cls(families, data.get("default", ""))
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {type(exc).__name__}: {exc}") from exc

    def get(self, name: str | None) -> Family | None:
        """The family of that name, or the default one (None when the table is empty)."""
        return self.families.get(name or "") or self.families.get(self.default)


def _family(name: str, spec: Mapping[str, Any]) -> Family:
    recipes = {}
    for task in TASKS:
        if task in spec:
            values = dict(spec[task])
            workflow = values.pop("workflow")
            if not isinstance(workflow, str) or not workflow:
                raise ValueError(f"family {name!r}: {task}.workflow must name a workflow")
            recipes[task] = Recipe(name, task, workflow, values)
    unknown = set(spec) - {*TASKS, "title", "negative_prompt"}
    if unknown:
        raise ValueError(f"family {name!r}: unknown keys {', '.join(sorted(unknown))}")
    return Family(name, str(spec.get("title", name)), bool(spec.get("negative_prompt", True)), recipes)
