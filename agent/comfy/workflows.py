"""Workflow templates: API-format ComfyUI JSON plus a declaration of its parameters. Pure: no I/O
but reading the template files.

A template is ``NAME.json`` (ComfyUI's "Save (API)" export) with an optional ``NAME.toml`` beside
it declaring the parameters a caller may set::

    description = "Generate images from a text prompt."

    [params.width]
    type = "int"          # string | int | float | bool | seed | choice | model | image
    min = 64
    max = 2048
    step = 8
    bind = "5.width"      # node id . input name; a list binds one value to several inputs

A parameter's default is its ``default`` or else the template's own value at its first binding.
``choice`` and ``model`` parameters without ``values`` accept what ComfyUI lists for the bound
input (samplers, installed checkpoints...). ``image`` parameters take file bytes, which the engine
uploads; ``match_size = "image"`` requires the same dimensions as another image parameter.

Dropping both files into a workflow folder makes the workflow available by name: the library
reads folders on each look-up (a ``stat`` per file) and re-parses only what changed. A template
saved in ComfyUI's UI format (``nodes`` and ``links``) is converted to API format with ComfyUI's own
node definitions (agent/comfy/ui_format.py), or refused naming what could not be converted.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpugate import params
from gpugate.errors import ConfigError, FieldError, InvalidRequest
from gpugate.images import probe_image

from .ui_format import UiFormatError, is_ui_format, to_api_format

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# the fields ComfyWorkflow takes itself (any case): a parameter cannot be called so
RESERVED_PARAMS = frozenset({"workflow", "args", "refid", "ref_id", "tag", "replyto", "reply_to"})

# (node class, input name) -> the values ComfyUI accepts there, or None when it does not say.
Combos = Callable[[str, str], Sequence[str] | None]


class ParamType(StrEnum):
    STRING = "string"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    SEED = "seed"  # int in ComfyUI's seed range; random when not given
    CHOICE = "choice"
    MODEL = "model"  # a choice among installed model files of ``kind``
    IMAGE = "image"  # file bytes, uploaded to ComfyUI's input folder


class Binding(BaseModel):
    model_config = ConfigDict(frozen=True)
    node: str
    input: str

    def __str__(self) -> str:
        return f"{self.node}.{self.input}"


class ParamSpec(BaseModel):
    """One declared parameter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ParamType
    bind: tuple[Binding, ...]
    description: str = ""
    required: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: int | None = None
    values: tuple[str, ...] | None = None
    kind: str | None = None  # model kind (checkpoints, upscale_models, ...)
    match_size: str | None = None

    @field_validator("bind", mode="before")
    @classmethod
    def _parse_bind(cls, v: Any) -> Any:
        targets = [v] if isinstance(v, str) else v
        out = []
        for target in targets:
            node, dot, name = str(target).partition(".")
            if not dot or not node or not name:
                raise ValueError(f"binding {target!r} must be 'node_id.input_name'")
            out.append({"node": node, "input": name})
        if not out:
            raise ValueError("needs at least one binding")
        return out


class VramHint(BaseModel):
    """Overrides the router's memory estimate for this workflow (see router/scheduler.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_gb: float | None = None  # on top of the model's weights
    per_megapixel_gb: float | None = None  # per output megapixel, times the batch


class _Declaration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    vram: VramHint | None = None


@dataclass(frozen=True)
class Workflow:
    name: str
    description: str
    prompt: Mapping[str, Any]
    params: Mapping[str, ParamSpec]
    path: Path
    vram: VramHint | None = None

    def param_for(self, node: str, input_name: str) -> str | None:
        """The parameter bound to a node input, to name it in ComfyUI's validation errors."""
        for name, spec in self.params.items():
            if any(b.node == node and b.input == input_name for b in spec.bind):
                return name
        return None

    def default(self, name: str) -> Any:
        spec = self.params[name]
        if spec.default is not None or spec.required or spec.type in (ParamType.SEED, ParamType.IMAGE):
            return spec.default
        first = spec.bind[0]
        return self.prompt[first.node]["inputs"][first.input]


@dataclass(frozen=True)
class ImageInput:
    """An uploaded image, checked from its header only (the full decode happens in ComfyUI)."""

    data: bytes
    format: str
    width: int
    height: int


class WorkflowDefinitionError(ConfigError):
    """A template or its declaration is malformed; the message names the file."""


def load_workflow(json_path: Path, object_info: Mapping[str, Any] | None = None) -> Workflow:
    """Read ``NAME.json`` and its optional ``NAME.toml``; check every binding points at a literal input.
    A UI-format template is converted with ``object_info`` (ComfyUI's node definitions)."""
    try:
        prompt = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkflowDefinitionError(f"{json_path}: not readable JSON: {exc}") from exc
    if is_ui_format(prompt):
        if not object_info:
            raise WorkflowDefinitionError(f"{json_path}: ComfyUI's UI format, converted once ComfyUI is up "
                                          "(or export it with 'Save (API)')")
        try:
            prompt = to_api_format(prompt, object_info)
        except UiFormatError as exc:
            raise WorkflowDefinitionError(f"{json_path}: ComfyUI's UI format, not convertible: {exc}") from exc
    if not isinstance(prompt, dict) or not prompt or not all(
        isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict) for n in prompt.values()
    ):
        raise WorkflowDefinitionError(f"{json_path}: expected API-format JSON: {{node_id: {{class_type, inputs}}}}")
    decl_path = json_path.with_suffix(".toml")
    declaration = _Declaration()
    if decl_path.exists():
        try:
            declaration = _Declaration.model_validate(tomllib.loads(decl_path.read_text()))
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise WorkflowDefinitionError(f"{decl_path}: {exc}") from exc
    for name, spec in declaration.params.items():
        if name.lower() in RESERVED_PARAMS:
            raise WorkflowDefinitionError(f"{decl_path}: parameter {name!r} is a name the router's API uses itself; "
                                          "rename it")
        for b in spec.bind:
            node = prompt.get(b.node)
            if node is None or b.input not in node["inputs"]:
                raise WorkflowDefinitionError(f"{decl_path}: parameter {name!r} binds to {b}, which the workflow lacks")
            if isinstance(node["inputs"][b.input], list):
                raise WorkflowDefinitionError(f"{decl_path}: parameter {name!r} binds to {b}, a link, not a value")
        if spec.match_size is not None and spec.match_size not in declaration.params:
            raise WorkflowDefinitionError(f"{decl_path}: parameter {name!r} matches the size of unknown {spec.match_size!r}")
    return Workflow(json_path.stem, declaration.description, prompt, declaration.params, json_path, declaration.vram)


class WorkflowLibrary:
    """The workflows in a list of folders; a later folder's template replaces an earlier one's."""

    def __init__(self, dirs: Sequence[Path], object_info: Callable[[], Mapping[str, Any]] = dict) -> None:
        self.dirs = list(dirs)
        self.object_info = object_info  # ComfyUI's node definitions, for UI-format templates ({} while down)
        self._cache: dict[Path, tuple[tuple[float, float, int], Workflow | WorkflowDefinitionError]] = {}
        self._listings: dict[Path, tuple[float, list[Path]]] = {}

    def _paths(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for folder in self.dirs:
            for path in self._listing(folder):
                found[path.stem] = path
        return found

    def _listing(self, folder: Path) -> list[Path]:
        """A folder's templates, listed again only when the folder changed (files added or removed)."""
        try:
            mtime = folder.stat().st_mtime
        except OSError:
            return []
        cached = self._listings.get(folder)
        if cached is None or cached[0] != mtime:
            cached = (mtime, sorted(folder.glob("*.json")))
            self._listings[folder] = cached
        return cached[1]

    def _load(self, path: Path) -> Workflow:
        """The template, parsed again only when a file changed or ComfyUI's node definitions did
        (a UI-format template is converted with them); a broken one's error is remembered too."""
        toml = path.with_suffix(".toml")
        info = self.object_info()
        stamp = (path.stat().st_mtime, toml.stat().st_mtime if toml.exists() else 0.0, id(info))
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            try:
                loaded: Workflow | WorkflowDefinitionError = load_workflow(path, info)
            except WorkflowDefinitionError as exc:
                loaded = exc
            cached = (stamp, loaded)
            self._cache[path] = cached
        if isinstance(cached[1], WorkflowDefinitionError):
            raise cached[1]
        return cached[1]

    def get(self, name: str) -> Workflow:
        path = self._paths().get(name)
        if path is None:
            known = ", ".join(sorted(self._paths())) or "none"
            raise InvalidRequest(FieldError("workflow", f"no workflow named {name!r}; available: {known}", "unknown"))
        try:
            return self._load(path)
        except WorkflowDefinitionError as exc:
            raise InvalidRequest(FieldError("workflow", str(exc), "broken_definition")) from exc

    def scan(self) -> tuple[list[Workflow], list[str]]:
        """Every loadable workflow, and a message for each file that is not."""
        workflows, problems = [], []
        for path in self._paths().values():
            try:
                workflows.append(self._load(path))
            except WorkflowDefinitionError as exc:
                problems.append(str(exc))
        return workflows, problems


# ---- validation ---------------------------------------------------------------------------------


def validate(workflow: Workflow, raw: Mapping[str, Any], combos: Combos) -> dict[str, Any]:
    """Check and convert every parameter; raise InvalidRequest naming each bad one.

    Returns a value for every declared parameter (defaults filled in, random seeds drawn, images as
    :class:`ImageInput`), ready for :func:`render`.
    """
    errors: list[FieldError] = []
    for name in raw:
        if name not in workflow.params:
            takes = ", ".join(workflow.params) or "no parameters"
            errors.append(FieldError(name, f"unknown parameter; {workflow.name} takes {takes}", "unknown"))
    values: dict[str, Any] = {}
    for name, spec in workflow.params.items():
        given = raw.get(name)
        if given is None or given == "" and spec.type is not ParamType.STRING:
            if spec.required:
                errors.append(FieldError(name, "is required", "required"))
                continue
            given = workflow.default(name)
            if given is None and spec.type is ParamType.SEED:
                values[name] = secrets.randbelow(2**53)
                continue
            if given is None:
                continue
        try:
            values[name] = _convert(name, spec, given, workflow, combos)
        except ValueError as exc:
            errors.append(FieldError(name, str(exc), getattr(exc, "code", "invalid")))
    errors.extend(_size_mismatches(workflow, values))
    if errors:
        raise InvalidRequest(errors)
    return values


def _convert(name: str, spec: ParamSpec, value: Any, workflow: Workflow, combos: Combos) -> Any:
    kind = spec.type
    if kind is ParamType.STRING:
        return params.text(value)
    if kind is ParamType.BOOL:
        return params.boolean(value)
    if kind in (ParamType.INT, ParamType.SEED, ParamType.FLOAT):
        return params.number(spec, value)
    if kind in (ParamType.CHOICE, ParamType.MODEL):
        first = spec.bind[0]
        allowed = spec.values if spec.values is not None else combos(workflow.prompt[first.node]["class_type"], first.input)
        return params.choice(value, allowed, model=kind is ParamType.MODEL)
    return _image(value)


def _image(value: Any) -> ImageInput:
    if isinstance(value, ImageInput):
        return value
    if not isinstance(value, (bytes, bytearray)):
        raise params.Rejected("must be an image file")
    try:
        info = probe_image(bytes(value))
    except ValueError as exc:
        raise params.Rejected(str(exc), "not_an_image") from None
    return ImageInput(bytes(value), info.format, info.width, info.height)


def _size_mismatches(workflow: Workflow, values: Mapping[str, Any]) -> list[FieldError]:
    out = []
    for name, spec in workflow.params.items():
        mine, other = values.get(name), values.get(spec.match_size or "")
        if isinstance(mine, ImageInput) and isinstance(other, ImageInput) and (mine.width, mine.height) != (other.width, other.height):
            out.append(FieldError(name, f"must be the same size as {spec.match_size} ({other.width}x{other.height}), "
                                        f"got {mine.width}x{mine.height}", "size_mismatch"))
    return out


# ---- rendering ----------------------------------------------------------------------------------


def render(workflow: Workflow, values: Mapping[str, Any], uploaded: Mapping[str, str], job_id: str) -> dict[str, Any]:
    """The prompt to submit: template + values, images replaced by their uploaded names.

    Every ``filename_prefix`` gets the job id as a folder, so a job's outputs are its own (never a
    cached result of an earlier job with the same inputs) and can be found and deleted together.
    """
    if not JOB_ID.match(job_id):
        raise ValueError(f"job id {job_id!r} must be 1-64 letters, digits, '-' or '_'")
    prompt = copy.deepcopy(dict(workflow.prompt))
    for name, spec in workflow.params.items():
        if name not in values:
            continue
        value = uploaded[name] if spec.type is ParamType.IMAGE else values[name]
        for b in spec.bind:
            prompt[b.node]["inputs"][b.input] = value
    for node in prompt.values():
        prefix = node["inputs"].get("filename_prefix")
        if isinstance(prefix, str):
            node["inputs"]["filename_prefix"] = f"{job_id}/{prefix}"
    return prompt
