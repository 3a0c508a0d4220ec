"""ComfyUI's UI-format workflows (what the web UI's "Save" / "Export" writes) turned into API format.

UI format (schema version 0.4; version 1 stores links as objects, also read here)::

    {"nodes": [{"id": 3, "type": "KSampler", "mode": 0,
                "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                           {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": null}],
                "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}],
                "widgets_values": [156680208700286, "randomize", 20, 8, "euler", "normal", 1]}, ...],
     "links": [[link_id, origin_id, origin_slot, target_id, target_slot, type], ...],
     "groups": [...], "extra": {...}, "version": 0.4}

API format (what ``POST /prompt`` takes)::

    {"3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "model": ["4", 0], ...}}}

The browser does this conversion (``graphToPrompt``) from its live widgets. Here the widgets are
rebuilt from ComfyUI's node definitions (``/object_info``) the way the frontend builds them:

- Every input whose type has a widget (INT, FLOAT, BOOLEAN, STRING, a list of choices / COMBO, ...)
  and is not ``forceInput`` gets one, in ``input_order`` (required, then optional). ``widgets_values``
  holds their values in that order, and also the values of frontend-only widgets that never reach
  the prompt: the "control after generate" combo after an INT with ``control_after_generate`` (or
  named seed / noise_seed), that combo plus a filter string after a COMBO with it, the upload
  button after a media combo (``image_upload``...), the refresh widgets of a remote combo.
  Workflows saved before frontend 1.16 also hold a value for each ``forceInput`` input.
  ``widgets_values`` may instead be a dict keyed by input name; a node without it (ComfyUI's own
  default graph has some) keeps the widgets' defaults, as the frontend does.
- An input with a link takes the link, also when it is a widget converted to an input (its value
  still holds its place in ``widgets_values``).
- Muted nodes (mode 2) are left out, and so is any input linked to one. Bypassed nodes (mode 4) are
  left out and passed through: a consumer of their output gets their input of the same type.
  Reroute nodes are followed to their source; a PrimitiveNode's value goes into the widget inputs
  it feeds; Note / MarkdownNote are dropped. Visual groups are ignored. Subgraphs and group nodes
  are refused: unpack them in ComfyUI first.
- An input whose source is muted, or a bypassed node with no input of its type, or a Reroute with
  no input, is left out like the frontend leaves it out: that is refused only when it is required.

Whatever cannot be converted is refused with a :class:`UiFormatError` naming every problem at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

MUTED, BYPASSED = 2, 4
NOTES = frozenset({"Note", "MarkdownNote"})
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
FRONTEND_ONLY = NOTES | {REROUTE, PRIMITIVE}
WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "COLOR", "TEXTAREA",
                          "IMAGECOMPARE", "CHART", "GALLERIA"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")

Link = list[Any]  # [origin node id, origin slot], as API format writes a connection


class UiFormatError(ValueError):
    """The workflow cannot be converted; the message lists every problem, joined with "; "."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def is_ui_format(data: object) -> bool:
    """Whether ``data`` is a UI-format workflow (as opposed to API format)."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)


def to_api_format(ui: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow with the node definitions of the ComfyUI that will run it."""
    if not is_ui_format(ui):
        raise UiFormatError(["not a UI-format workflow: expected an object with 'nodes' and 'links' lists"])
    graph = _Graph.parse(ui)
    problems: list[str] = []
    prompt: dict[str, dict[str, Any]] = {}
    for node in graph.nodes.values():
        if node.type in FRONTEND_ONLY or node.mode in (MUTED, BYPASSED):
            continue
        why_not = graph.unsupported(node) or (None if node.type in object_info else "not installed in this ComfyUI")
        if why_not:
            problems.append(f"{node}: {why_not}")
            continue
        inputs, node_problems = _node_inputs(graph, node, object_info[node.type])
        problems += [f"{node}: {p}" for p in node_problems]
        prompt[node.id] = {"class_type": node.type, "inputs": inputs}
    if problems:
        raise UiFormatError(problems)
    return prompt


# ---- the graph ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    id: str
    type: str
    mode: int
    inputs: list[dict[str, Any]]
    output_types: list[str]
    widgets_values: list[Any] | dict[str, Any] | None

    def __str__(self) -> str:
        return f"node {self.id} ({self.type})"


@dataclass(frozen=True)
class _Link:
    origin: str
    slot: int


@dataclass(frozen=True)
class _Absent:
    """An input link that leads nowhere the frontend would send; ``reason`` completes "input 'x' ..."."""

    reason: str
    drops_widget: bool = False  # the frontend removes the input altogether (source muted)


@dataclass(frozen=True)
class _Value:
    """A value set from elsewhere in the graph (a PrimitiveNode's)."""

    value: Any


Source = Link | _Value | _Absent  # what an input link resolves to


class _BrokenLink(Exception):
    """A link the frontend cannot follow at all (it fails the whole conversion)."""


@dataclass
class _Graph:
    nodes: dict[str, _Node]
    links: dict[int, _Link]
    subgraphs: dict[str, str]  # subgraph id -> name
    group_nodes: frozenset[str]  # names of the legacy group nodes defined in extra.groupNodes

    @classmethod
    def parse(cls, ui: Mapping[str, Any]) -> _Graph:
        try:
            nodes = [_parse_node(n) for n in ui["nodes"]]
            links = dict(_parse_link(link) for link in ui["links"] if link is not None)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UiFormatError([f"malformed UI-format workflow: {exc!r}"]) from exc
        definitions = ui.get("definitions") or {}
        subgraphs = {str(s.get("id")): str(s.get("name", "")) for s in definitions.get("subgraphs") or ()}
        group_nodes = frozenset((ui.get("extra") or {}).get("groupNodes") or ())
        return cls({n.id: n for n in nodes}, links, subgraphs, group_nodes)

    def unsupported(self, node: _Node) -> str | None:
        if node.type in self.subgraphs:
            return (f"a subgraph ({self.subgraphs[node.type]!r}), which is not supported; "
                    "unpack it in ComfyUI (right-click > Unpack Subgraph) and save again")
        for prefix in ("workflow>", "workflow/"):
            if node.type.startswith(prefix) and node.type[len(prefix):] in self.group_nodes:
                return "a group node, which is not supported; convert it to nodes in ComfyUI and save again"
        return None

    def resolve_input(self, node: _Node, index: int, want: str | None, seen: set[tuple[str, int]]) -> Source:
        """What input ``index`` of ``node`` receives: a link, a primitive's value, or nothing (why)."""
        slot = node.inputs[index]
        link = self.links.get(slot["link"])
        if link is None:
            raise _BrokenLink(f"has link {slot['link']}, which is not in the links list")
        origin = self.nodes.get(link.origin)
        if origin is None:
            raise _BrokenLink(f"is linked to node {link.origin}, which is not in the workflow")
        return self.resolve_output(origin, link.slot, want or slot.get("type") or "*", seen)

    def resolve_output(self, node: _Node, slot: int, want: str, seen: set[tuple[str, int]]) -> Source:
        if (node.id, slot) in seen:
            raise _BrokenLink(f"goes round in a loop through {node}")
        seen.add((node.id, slot))
        if node.mode == BYPASSED:
            index = _bypass_input(node, slot, want)
            if index is None:
                return _Absent(f"comes from bypassed {node}, which has no {want} input to pass on")
            return self._follow(node, index, None, seen)
        if node.type == REROUTE:
            return self._follow(node, 0, want, seen)
        if node.type == PRIMITIVE:
            values = node.widgets_values
            if isinstance(values, list) and values:
                return _Value(values[0])
            return _Absent(f"comes from {node}, which holds no value")
        if node.type in NOTES:
            return _Absent(f"comes from {node}, which has no outputs")
        if node.mode == MUTED:
            return _Absent(f"comes from {node}, which is muted", drops_widget=True)
        return [node.id, slot]

    def _follow(self, node: _Node, index: int, want: str | None, seen: set[tuple[str, int]]) -> Source:
        if index >= len(node.inputs) or node.inputs[index].get("link") is None:
            return _Absent(f"comes from {node}, whose input is not connected")
        return self.resolve_input(node, index, want, seen)


def _parse_node(raw: Mapping[str, Any]) -> _Node:
    return _Node(
        id=str(raw["id"]), type=str(raw["type"]), mode=int(raw.get("mode") or 0),
        inputs=[dict(i) for i in raw.get("inputs") or ()],
        output_types=[str(o.get("type", "*")) for o in raw.get("outputs") or ()],
        widgets_values=raw.get("widgets_values"),
    )


def _parse_link(raw: list[Any] | Mapping[str, Any]) -> tuple[int, _Link]:
    if isinstance(raw, Mapping):  # schema version 1
        return int(raw["id"]), _Link(str(raw["origin_id"]), int(raw["origin_slot"]))
    return int(raw[0]), _Link(str(raw[1]), int(raw[2]))


def _bypass_input(node: _Node, slot: int, want: str) -> int | None:
    """The input a bypassed node passes on to a consumer of output ``slot`` wanting type ``want``
    (the frontend's ExecutableNodeDTO.#getBypassSlotIndex)."""
    types = [str(i.get("type", "*")) for i in node.inputs]
    if not types:
        return None
    if want in ("*", ""):
        return slot if slot < len(types) else 0
    out = node.output_types[slot] if slot < len(node.output_types) else "*"
    if slot < len(types) and _compatible(types[slot], out) and _compatible(types[slot], want):
        return slot
    if want in types:
        return types.index(want)
    return next((i for i, t in enumerate(types) if _compatible(t, out) and _compatible(t, want)), None)


def _compatible(a: str, b: str) -> bool:
    """LiteGraph.isValidConnection: equal, a wildcard, or comma-separated lists sharing a type."""
    if a in ("", "*") or b in ("", "*") or a == b:
        return True
    return bool(set(a.lower().split(",")) & set(b.lower().split(",")))


# ---- one node's inputs --------------------------------------------------------------------------


def _node_inputs(graph: _Graph, node: _Node, info: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The API-format inputs of ``node`` and what is wrong with them."""
    values, problems = _widget_values(node, info)
    inputs = {name: _wrap(v) for name, v in values.items()}
    why_absent: dict[str, str] = {}
    reported = {name for name in _widget_slots(info, legacy=False) if name} if problems else set()
    for index, slot in enumerate(node.inputs):
        name = str(slot.get("name"))
        if slot.get("link") is None:
            continue
        try:
            source = graph.resolve_input(node, index, None, set())
        except _BrokenLink as exc:
            problems.append(f"input {name!r} {exc}")
            reported.add(name)
            continue
        if isinstance(source, _Absent):
            why_absent[name] = source.reason
            if source.drops_widget:
                inputs.pop(name, None)
        else:
            inputs[name] = _wrap(source.value) if isinstance(source, _Value) else source
    required = (info.get("input") or {}).get("required") or {}
    problems += [f"required input {name!r} {why_absent.get(name, 'is not connected')}"
                 for name in required if name not in inputs and name not in reported]
    return inputs, problems


def _wrap(value: Any) -> Any:
    """A list value is boxed, as the frontend does: a bare list would read as a link."""
    return {"__value__": value} if isinstance(value, list) else value


def _widget_values(node: _Node, info: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The widget inputs' values from ``widgets_values`` (positions of frontend-only values skipped)."""
    raw = node.widgets_values
    current = _widget_slots(info, legacy=False)
    if raw is None:  # never saved (ComfyUI's own default graph has such nodes): the widgets keep their defaults
        return _values_by_name(current, _defaults(info), "no widgets_values, and no default for")
    if isinstance(raw, Mapping):
        return _values_by_name(current, raw, "widgets_values lacks")
    legacy = _widget_slots(info, legacy=True)
    slots = legacy if len(raw) == len(legacy) != len(current) else current
    if len(raw) < len(slots):
        names = ", ".join(name or "(frontend-only)" for name in slots)
        return {}, [f"widgets_values has {len(raw)} values, expected {len(slots)} ({names})"]
    return {name: value for name, value in zip(slots, raw, strict=False) if name is not None}, []


def _values_by_name(slots: list[str | None], raw: Mapping[str, Any], lacks: str) -> tuple[dict[str, Any], list[str]]:
    names = [name for name in slots if name is not None]
    missing = [name for name in names if name not in raw]
    problems = [f"{lacks} {', '.join(map(repr, missing))}"] if missing else []
    return {name: raw[name] for name in names if name in raw}, problems


def _defaults(info: Mapping[str, Any]) -> dict[str, Any]:
    """The values the frontend gives new widgets: the declared default, else a combo's first choice."""
    defaults = {}
    for name, kind, options in _ordered_inputs(info):
        if "default" in options:
            defaults[name] = options["default"]
        elif kind == "COMBO" and options.get("options"):
            defaults[name] = options["options"][0]
    return defaults


def _widget_slots(info: Mapping[str, Any], *, legacy: bool) -> list[str | None]:
    """One entry per ``widgets_values`` position: the input it sets, or None for a frontend-only
    value. ``legacy``: as saved before frontend 1.16, with a (dropped) value for forceInput inputs."""
    slots: list[str | None] = []
    for name, kind, options in _ordered_inputs(info):
        if kind == "IMAGEUPLOAD":
            slots.append(None)
        elif kind in WIDGET_TYPES and (legacy or not options.get("forceInput")):
            slots.append(None if options.get("forceInput") else name)
            slots += [None] * _frontend_only_values(name, kind, options)
    return slots


def _frontend_only_values(name: str, kind: str, options: Mapping[str, Any]) -> int:
    """How many frontend-only widgets follow this input's widget."""
    control = options.get("control_after_generate")
    if kind == "INT":
        return 1 if (control if control is not None else name in SEED_NAMES) else 0
    if kind != "COMBO" or options.get("multi_select"):
        return 0
    remote = options.get("remote")
    refresh = (1 + bool(remote.get("refresh_button"))) if isinstance(remote, Mapping) else 0
    return refresh + (2 if control else 0)  # control_after_generate, control_filter_list


def _ordered_inputs(info: Mapping[str, Any]) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """(name, widget kind, options) of each input in the frontend's widget order: ``input_order``
    required then optional, then the rest (the upload button the frontend adds to media combos)."""
    groups = info.get("input") or {}
    specs: dict[str, tuple[str, str, Mapping[str, Any]]] = {}
    for group in ("required", "optional"):
        for name, spec in (groups.get(group) or {}).items():
            kind, options = _kind(spec)
            specs[name] = (group, kind, options)
    if any(kind == "COMBO" and any(options.get(o) is True for o in UPLOAD_OPTIONS)
           for group, kind, options in specs.values() if group == "required"):
        specs.setdefault("upload", ("required", "IMAGEUPLOAD", {}))
    order = info.get("input_order") or {}
    ordered = [n for group in ("required", "optional") for n in order.get(group) or ()
               if n in specs and specs[n][0] == group]
    for name in [*ordered, *(n for n in specs if n not in ordered)]:
        _, kind, options = specs[name]
        yield name, kind, options


def _kind(spec: Any) -> tuple[str, Mapping[str, Any]]:
    """An input spec's widget kind and options (a list of choices: COMBO, its choices as "options")."""
    spec = spec if isinstance(spec, list | tuple) else [spec]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    if isinstance(spec[0], list | tuple):
        return "COMBO", {**options, "options": list(spec[0])}
    return str(options.get("widgetType") or spec[0]), options
