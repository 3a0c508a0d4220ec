"""Structured logging: one line per event, ``key=value`` fields after the message.

Call sites pass context through ``extra`` (``log.info("prompt submitted", extra={"job": job_id})``);
every field that is not a standard LogRecord attribute is printed, so a grep for ``job=<id>``
finds everything that happened to a job on either side.
"""

from __future__ import annotations

import logging
import sys

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class KeyValueFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={_quote(v)}" for k, v in vars(record).items() if k not in _STANDARD]
        return f"{line} {' '.join(fields)}" if fields else line


def _quote(value: object) -> str:
    text = str(value)
    return repr(text) if (not text or any(c.isspace() for c in text)) else text


def setup_logging(level: str = "INFO") -> None:
    """Send every gpugate logger to stderr in the key=value format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
