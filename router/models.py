"""What the router knows of models: the catalog's ids (names and aliases), the files connected
agents report (with the family each detected from the file's header), and the family table.

Requests resolve a model id here, once, when they are submitted: a catalog name or alias, or a file
name some connected agent has. Anything else is refused at once, naming it and the closest ids,
instead of queuing a job no agent will ever take.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass

from gpugate.catalog import NAMED_KINDS, Catalog
from gpugate.errors import FieldError, InvalidRequest
from gpugate.wire import Capability, Model

from .families import Family, FamilyTable, Recipe
from .sessions import AgentSession, SessionRegistry


@dataclass(frozen=True)
class ModelRef:
    """A model a request named, resolved."""

    id: str  # the id the client used (or the kind's default entry's name)
    kind: str
    file: str
    family: str | None  # None: neither the catalog nor an agent could tell
    notes: tuple[str, ...] = ()  # for the job's details


class ModelBook:
    def __init__(self, catalog: Catalog, families: FamilyTable, sessions: SessionRegistry) -> None:
        self.catalog, self.families, self.sessions = catalog, families, sessions

    def agents(self) -> Iterator[AgentSession]:
        return iter(self.sessions.everyone())

    def reported(self, kind: str) -> dict[str, list[Model]]:
        """File name -> what each connected agent reported of it, for one kind."""
        out: dict[str, list[Model]] = {}
        for session in self.agents():
            for model in session.models:
                if model.kind == kind:
                    out.setdefault(model.name, []).append(model)
        return out

    def resolve(self, name: str | None, kind: str, field: str = "model") -> ModelRef:
        """The file behind a model id; InvalidRequest naming ``field`` when nobody knows it.

        Known: a catalog name, alias or file, or a file a connected agent reports. While no agent
        serving that kind is connected (they are reconnecting after a router restart, or ComfyUI is
        restarting), a name that could be a file is taken on trust, with a note: the job waits for
        an agent that has it, as a Queue call always did."""
        if not name:
            entry = self.catalog.default(kind)
            if entry is None:
                raise InvalidRequest(FieldError(field, "is required: no default model of this kind is configured",
                                                "required"))
            return ModelRef(entry.name, kind, entry.file, entry.family or self.family_of(kind, entry.file))
        entry = self.catalog.find(name, kind) or self.catalog.by_file(kind, name)
        if entry is not None:
            return ModelRef(name, kind, entry.file, entry.family or self.family_of(kind, entry.file))
        if name in self.reported(kind):
            return ModelRef(name, kind, name, self.family_of(kind, name))
        if not self._served(kind) and ("." in name or kind in NAMED_KINDS) and "/" not in name:
            return ModelRef(name, kind, name, None,
                            (f"{field} {name!r} is not checked: no agent serving {kind} is connected now",))
        raise InvalidRequest(FieldError(field, self._unknown(name, kind), "unknown_model"))

    def _served(self, kind: str) -> bool:
        """Whether some connected agent runs anything that loads models of ``kind``."""
        return any(c.model_kind == kind for s in self.agents() for c in s.capabilities.values())

    def _unknown(self, name: str, kind: str) -> str:
        ids = sorted({*self.catalog.ids(kind), *self.reported(kind)})
        close = difflib.get_close_matches(name, ids, n=5, cutoff=0.5) or difflib.get_close_matches(
            name.lower(), [i.lower() for i in ids], n=5, cutoff=0.5)
        message = f"unknown model {name!r}: neither the catalog nor a connected agent has it"
        if close:
            return f"{message}; did you mean {', '.join(repr(c) for c in close)}?"
        return f"{message}; known: {', '.join(ids[:20]) or 'none'}"

    def context_of(self, kind: str, file: str) -> int | None:
        """The smallest context (tokens) a connected agent serves this LLM with, if any says."""
        contexts = [m.context for m in self.reported(kind).get(file, []) if m.context]
        return min(contexts) if contexts else None

    def family_of(self, kind: str, file: str) -> str | None:
        """The catalog's word for a file's family, else what an agent detected in it."""
        entry = self.catalog.by_file(kind, file)
        if entry is not None and entry.family:
            return entry.family
        return next((m.family for m in self.reported(kind).get(file, []) if m.family), None)

    def recipe(self, task: str, model: ModelRef, field: str = "model") -> tuple[Recipe, Family, list[str]]:
        """The family's recipe for an image task, and notes for the job's details."""
        family = self.families.get(model.family)
        notes = []
        if family is None:
            raise InvalidRequest(FieldError(field, "no model family table is configured (workflows/families.toml)"))
        if family.name != model.family:
            notes.append(f"the family of {model.file} is not known; {family.title} defaults are used")
        recipe = family.recipes.get(task)
        if recipe is None:
            raise InvalidRequest(FieldError(field, f"{model.id} ({family.title}) has no {task} recipe", "unsupported"))
        return recipe, family, notes

    def workflow(self, name: str) -> Capability | None:
        """A workflow's declaration: as a connected agent serves it now, else as one last reported it
        (its ComfyUI restarting, say); None if no agent ever did."""
        for session in self.agents():
            capability = session.capabilities.get(name)
            if capability is not None and capability.params is not None:
                return capability
        return self.sessions.declared.get(name)

    def workflows(self) -> dict[str, tuple[Capability, list[str]]]:
        """Every workflow some connected agent serves: its declaration and the agents that serve it."""
        out: dict[str, tuple[Capability, list[str]]] = {}
        for session in self.agents():
            for capability in session.capabilities.values():
                if capability.params is not None:
                    out.setdefault(capability.name, (capability, []))[1].append(session.name)
        return dict(sorted(out.items()))
