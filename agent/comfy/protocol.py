"""What ComfyUI's answers mean, as pure functions: the one place its errors become ours.

- ``/prompt`` refusals (a 400, or a 200 that still carries ``node_errors``) -> :class:`InvalidRequest`
- a ``/history`` entry -> the output files and texts it lists, or the classified failure it records
  (out of memory, another execution error with its node, interrupted)
- ``/object_info`` -> the values a combo input accepts (samplers, installed model files)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpugate.errors import (
    ExecutionError,
    FieldError,
    Interrupted,
    InvalidRequest,
    JobFailed,
    OutOfMemory,
)

# Names a node input in an error: the workflow parameter bound to it, if any.
FieldNamer = Callable[[str, str], str | None]
# The output lists that carry text for the user (PreviewAny's, and custom "show text" nodes'), not files.
TEXT_KINDS = ("text",)
TEXTS_MAX = 4 * 2**20  # characters of text outputs per job


@dataclass(frozen=True)
class OutputRef:
    """A file a node produced, as ``/history`` lists it; ``kind`` is the list it came in (images, gifs...)."""

    node_id: str
    kind: str
    filename: str
    subfolder: str
    type: str  # output | temp


@dataclass(frozen=True)
class Outcome:
    """What a finished prompt produced: files to fetch, and texts shown by its nodes."""

    refs: list[OutputRef]
    texts: list[str]


def prompt_refusal(body: Any, prompt: Mapping[str, Any], namer: FieldNamer) -> InvalidRequest:
    """Turn ComfyUI's validation answer into field errors, naming our parameter where one is bound."""
    body = body if isinstance(body, dict) else {}
    errors: list[FieldError] = []
    for node_id, node in (body.get("node_errors") or {}).items():
        class_type = node.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        for err in node.get("errors") or []:
            input_name = (err.get("extra_info") or {}).get("input_name")
            field = (namer(node_id, input_name) if input_name else None) or (
                f"{node_id}.{input_name}" if input_name else f"node {node_id}")
            errors.append(FieldError(field, f"{class_type}: {_describe(err)}", err.get("type") or "invalid"))
    if not errors:
        top = body.get("error")
        text = _describe(top) if isinstance(top, dict) else str(top or "ComfyUI refused the workflow")
        errors.append(FieldError("workflow", text, (top or {}).get("type", "invalid") if isinstance(top, dict) else "invalid"))
    return InvalidRequest(errors)


def _describe(err: Mapping[str, Any]) -> str:
    message, details = err.get("message") or "invalid", err.get("details") or ""
    return f"{message}: {details}" if details else message


def history_outcome(entry: Mapping[str, Any]) -> Outcome:
    """The outputs of a finished prompt, or raise the failure its status records."""
    status = entry.get("status") or {}
    messages = {name: data for name, data in status.get("messages") or [] if isinstance(data, dict)}
    if status.get("status_str") == "success" and status.get("completed"):
        outputs = entry.get("outputs") or {}
        return Outcome(output_refs(outputs), output_texts(outputs))
    if "execution_interrupted" in messages:
        data = messages["execution_interrupted"]
        raise Interrupted("interrupted", node_id=data.get("node_id"), node_type=data.get("node_type"))
    if "execution_error" in messages:
        raise execution_failure(messages["execution_error"])
    raise ExecutionError(f"ComfyUI ended the prompt as {status.get('status_str')!r} without saying why")


def execution_failure(data: Mapping[str, Any]) -> JobFailed:
    """Classify an ``execution_error``: out of memory, or an error in a named node."""
    exc_type, text = str(data.get("exception_type", "")), str(data.get("exception_message", "")).strip()
    node_id, node_type = data.get("node_id"), data.get("node_type")
    where = f"node {node_id} ({node_type})" if node_id else "ComfyUI"
    if is_out_of_memory(exc_type, text):
        return OutOfMemory(f"out of memory in {where}: {text}", node_id=node_id, node_type=node_type)
    return ExecutionError(f"{where} failed: {exc_type}: {text}", node_id=node_id, node_type=node_type)


def is_out_of_memory(exception_type: str, message: str) -> bool:
    # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError before 2.5); other backends only say it in words
    return "OutOfMemoryError" in exception_type or "out of memory" in message.lower()


def output_refs(outputs: Mapping[str, Any]) -> list[OutputRef]:
    """Every file in every output list of every node: images, gifs, audio, latents, ..."""
    refs = []
    for node_id, ui in outputs.items():
        for kind, items in (ui or {}).items():
            for item in items if isinstance(items, list) else ():
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    refs.append(OutputRef(node_id, kind, item["filename"], item.get("subfolder") or "",
                                          item.get("type") or "output"))
    return refs


def output_texts(outputs: Mapping[str, Any]) -> list[str]:
    """Every string in a text output list (``TEXT_KINDS``), node by node, in order. They travel to
    the router inside one message: past ``TEXTS_MAX`` in all, the job fails saying so."""
    texts = [item for ui in outputs.values() for kind, items in (ui or {}).items() if kind in TEXT_KINDS
             for item in (items if isinstance(items, list) else ()) if isinstance(item, str)]
    if sum(len(t) for t in texts) > TEXTS_MAX:
        raise ExecutionError(f"the workflow's text outputs are larger than {TEXTS_MAX // 2**20} MB in all; "
                             "save large text to a file instead")
    return texts


def combo_values(object_info: Mapping[str, Any], class_type: str, input_name: str) -> list[str] | None:
    """The values a combo input accepts, or None when the node or input is unknown or not a combo."""
    inputs = (object_info.get(class_type) or {}).get("input") or {}
    spec = (inputs.get("required") or {}).get(input_name) or (inputs.get("optional") or {}).get(input_name)
    if not spec:
        return None
    if isinstance(spec[0], list):  # classic form: [["a", "b"], {...}]
        return [str(v) for v in spec[0]]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):  # newer form
        return [str(v) for v in spec[1].get("options", [])]
    return None
