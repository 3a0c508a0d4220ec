"""One workflow parameter's value, checked and converted: shared by the router (before it queues a
ComfyWorkflow or an image job's ``arguments``) and the agent (before anything reaches ComfyUI), so
both say the same thing about the same value.

``param`` is anything with the declaration's fields (agent/comfy/workflows.ParamSpec, or
gpugate.wire.WorkflowParam as the router receives it): ``type``, ``min``, ``max``, ``step``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

SEED_MAX = 2**64 - 1
TEXT_MAX = 64 * 1024  # characters in one text parameter: a prompt, not a document
NUMBERS = ("int", "float", "seed")


class Limits(Protocol):
    type: Any  # a ParamType (a StrEnum) or its string
    min: float | None
    max: float | None
    step: int | None


class Rejected(ValueError):
    """A value a parameter does not take; ``code`` as in gpugate.errors.FieldError."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise Rejected(f"must be text, got {type(value).__name__}")
    if len(value) > TEXT_MAX:
        raise Rejected(f"must be at most {TEXT_MAX} characters, got {len(value)}", "out_of_range")
    return value


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise Rejected(f"must be true or false, got {value!r}")


def number(param: Limits, value: Any) -> int | float:
    """An int, seed or float within the declared limits; integers parsed exactly (a seed near 2**64
    keeps every digit)."""
    integral = param.type != "float"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Rejected(f"must be {'an integer' if integral else 'a number'}, got {value!r}")
    parsed: int | float
    try:
        parsed = int(value.strip()) if integral and isinstance(value, str) and _is_int(value) else (
            value if isinstance(value, int) else float(value))
    except (TypeError, ValueError):
        raise Rejected(f"must be {'an integer' if integral else 'a number'}, got {value!r}") from None
    if parsed != parsed or parsed in (float("inf"), float("-inf")):
        raise Rejected(f"must be a finite number, got {value!r}")
    if integral:
        if isinstance(parsed, float) and not parsed.is_integer():
            raise Rejected(f"must be an integer, got {value!r}")
        parsed = int(parsed)
    low, high = (0, SEED_MAX) if param.type == "seed" else (param.min, param.max)
    if (low is not None and parsed < low) or (high is not None and parsed > high):
        bounds = f"between {_fmt(low)} and {_fmt(high)}" if low is not None and high is not None else (
            f"at least {_fmt(low)}" if low is not None else f"at most {_fmt(high)}")
        raise Rejected(f"must be {bounds}, got {_fmt(parsed)}", "out_of_range")
    if param.step and parsed % param.step:
        raise Rejected(f"must be a multiple of {param.step}, got {_fmt(parsed)}", "out_of_range")
    return parsed


def choice(value: Any, allowed: Sequence[str] | None, *, model: bool = False) -> str:
    """One of ``allowed`` (None: any text); a model that is not there is "not installed"."""
    value = text(value)
    if allowed is not None and value not in allowed:
        shown = ", ".join(allowed[:20]) + (", ..." if len(allowed) > 20 else "")
        if model:
            raise Rejected(f"{value!r} is not installed; installed: {shown or 'none'}", "not_installed")
        raise Rejected(f"must be one of {shown}; got {value!r}", "not_in_list")
    return value


def _is_int(value: str) -> bool:
    digits = value.strip().removeprefix("-").removeprefix("+")
    return digits.isdigit()


def _fmt(x: float | None) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)
