"""AI Server's error shape, and the one place domain errors become HTTP answers.

``{"responseStatus": {"errorCode", "message", "errors": [{"errorCode", "fieldName", "message"}]}}``
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from gpugate.errors import FailureKind, FieldError

# our field-error codes -> AI Server's (ServiceStack validator) names
_CODES = {"required": "NotEmpty", "missing": "NotEmpty", "out_of_range": "InclusiveBetween",
          "not_an_image": "InvalidImage", "not_installed": "NotFound", "unknown": "Unknown"}
_FAILURE_CODES = {FailureKind.INVALID: "ValidationException", FailureKind.OUT_OF_MEMORY: "OutOfMemory",
                  FailureKind.EXECUTION: "ExecutionError", FailureKind.INTERRUPTED: "Cancelled",
                  FailureKind.WORKER_LOST: "WorkerLost", FailureKind.INFRASTRUCTURE: "InfrastructureError",
                  FailureKind.TIMEOUT: "Timeout", FailureKind.SHUTDOWN: "ShutDown",
                  FailureKind.UNSCHEDULABLE: "Unschedulable"}
_FAILURE_STATUS = {FailureKind.INVALID: 400, FailureKind.UNSCHEDULABLE: 503}  # else 500


log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 200, in AI Server's shape."""

    def __init__(self, status: int, code: str, message: str, errors: list[FieldError] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors or []
        self.headers = headers or {}

    def response(self, openai: bool = False) -> web.Response:
        """The answer in AI Server's shape, or in OpenAI's (``{"error": {message, type, param, code}}``)."""
        if openai:
            param = self.errors[0].field if self.errors else None
            code = "invalid_api_key" if self.status == 401 else self.errors[0].code if self.errors else self.code
            return web.json_response({"error": {"message": self.message, "type": openai_type(self.status),
                                                "param": param, "code": code}}, status=self.status, headers=self.headers)
        return web.json_response({"responseStatus": response_status(self.code, self.message, self.errors)},
                                 status=self.status, headers=self.headers)


def openai_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status (its clients tell errors apart by the status)."""
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def response_status(code: str, message: str, errors: list[FieldError] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {"errorCode": code, "message": message,
            "errors": [{"errorCode": _CODES.get(e.code, e.code[:1].upper() + e.code[1:]), "fieldName": e.field,
                        "message": e.message} for e in errors]}


def invalid(errors: list[FieldError]) -> ApiError:
    first = errors[0]
    return ApiError(400, _CODES.get(first.code, "ValidationException"), f"{first.field}: {first.message}", errors)


def failure_status(error: dict[str, Any], field_names: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """A failed job's stored error as (HTTP status, responseStatus); parameters renamed to API fields."""
    kind = FailureKind(error.get("kind", FailureKind.EXECUTION))
    errors = [FieldError(field_names.get(e["field"], e["field"]), e["message"], e.get("code", "invalid"))
              for e in error.get("errors", [])]
    message = "; ".join(f"{e.field}: {e.message}" for e in errors) or error.get("message", "failed")
    return _FAILURE_STATUS.get(kind, 500), response_status(_FAILURE_CODES[kind], message, errors)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    openai = request.path.startswith("/v1/")  # OpenAI's clients read OpenAI's error shape
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response(openai)
    except web.HTTPException as exc:  # aiohttp's own (404 for unknown paths, 405, 413 ...)
        if exc.status < 400:
            raise
        return ApiError(exc.status, exc.reason.replace(" ", ""), exc.reason).response(openai)
    except Exception:
        log.exception("request failed", extra={"path": request.path})
        return ApiError(500, "InternalServerError", "the router failed to handle this request").response(openai)
