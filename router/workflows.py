"""Checking a workflow's arguments against the declaration its agents sent (gpugate.wire.WorkflowParam).

The agent validates again with ComfyUI's own lists just before it runs the job; the router checks
what it can before it queues (with the same rules: gpugate/params.py), so a wrong name or value is
a 400 naming it rather than a job that fails later. Model parameters are resolved by the model
book (router/models.py), not checked against one agent's list: another agent may have the file,
or the value may be an alias.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gpugate import params as check
from gpugate.errors import FieldError
from gpugate.wire import Capability, WorkflowParam


def check_args(workflow: Capability, args: Mapping[str, Any], *, files: frozenset[str] = frozenset(),
               complete: bool = True, field: Callable[[str], str] = str) -> list[FieldError]:
    """Problems with ``args`` (values) and ``files`` (names of uploaded parts) for ``workflow``,
    each naming ``field(parameter)``. ``complete=False``: other fields give the rest, so a required
    parameter may be missing here."""
    params = workflow.params or {}
    errors = []
    takes = ", ".join(params) or "no parameters"
    for name in [*args, *files]:
        if name not in params:
            errors.append(FieldError(field(name), f"unknown parameter; {workflow.name} takes {takes}", "unknown"))
    for name, param in params.items():
        given = args.get(name)
        if param.type == "image":
            if given is not None:
                errors.append(FieldError(field(name), "is an image: upload it as a file part", "invalid"))
            elif param.required and complete and name not in files:
                errors.append(FieldError(field(name), "is required (an image file)", "required"))
        elif name in files:
            errors.append(FieldError(field(name), "takes a value, not a file", "invalid"))
        elif given is None or given == "" and param.type != "string":
            if param.required and complete:
                errors.append(FieldError(field(name), "is required", "required"))
        else:
            try:
                _check(param, given)
            except check.Rejected as exc:
                errors.append(FieldError(field(name), str(exc), exc.code))
    return errors


def _check(param: WorkflowParam, value: Any) -> None:
    if param.type in check.NUMBERS:
        check.number(param, value)
    elif param.type == "bool":
        check.boolean(value)
    elif param.type == "choice":
        check.choice(value, param.values)
    else:  # string, and model (resolved by the model book)
        check.text(value)
