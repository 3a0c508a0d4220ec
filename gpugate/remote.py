"""``gpugate run WORKFLOW --router URL``: run a workflow some agent serves, through a router, as any
client would (GetComfyWorkflowInfo, then ComfyWorkflow), and save its outputs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp

from .errors import FieldError, GpugateError, InvalidRequest

POLL_S = 1.0
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)


class RemoteError(GpugateError):
    """The router refused the call or the job failed; the message is the router's."""


async def run_workflow(router: str, key: str | None, workflow: str, values: list[str], out: Path) -> list[str]:
    """Run it and wait; returns the paths of the saved files and the texts, in order."""
    key = key or os.environ.get("GPUGATE_API_KEY")
    if not key:
        raise GpugateError("an API key is needed: --key or GPUGATE_API_KEY")
    router = router.rstrip("/")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT) as http:
        info = await _json(http.get(f"{router}/api/GetComfyWorkflowInfo", params={"workflow": workflow}))
        params = info["result"]["parameters"]
        answer = await _json(http.post(f"{router}/api/ComfyWorkflow", data=_form(workflow, values, params)))
        while "results" not in answer or answer.get("jobState") in ("Queued", "Started"):
            await asyncio.sleep(POLL_S)
            answer = await _json(http.get(f"{router}/api/GetArtifactGenerationStatus", params={"jobId": answer["jobId"]}))
        if answer.get("responseStatus"):
            raise RemoteError(answer["responseStatus"].get("message", "the job failed"))
        saved = []
        out.mkdir(parents=True, exist_ok=True)
        for result in answer["results"]:
            if result.get("url"):
                async with http.get(result["url"]) as r:
                    r.raise_for_status()
                    path = out / Path(result.get("fileName") or "output").name
                    path.write_bytes(await r.read())
                    saved.append(str(path))
            elif result.get("text") is not None:
                saved.append(result["text"])
        return saved


def _form(workflow: str, values: list[str], params: dict[str, Any]) -> aiohttp.FormData:
    """KEY=VALUE items as parts; an image parameter's value is a file path (``@`` optional)."""
    form = aiohttp.FormData()
    form.add_field("workflow", workflow)
    for item in values:
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidRequest(FieldError(key, "expected KEY=VALUE"))
        if params.get(key, {}).get("type") == "image":
            path = Path(value.removeprefix("@"))
            try:
                form.add_field(key, path.read_bytes(), filename=path.name, content_type="application/octet-stream")
            except OSError as exc:
                raise InvalidRequest(FieldError(key, f"cannot read {value}: {exc.strerror}")) from exc
        else:
            form.add_field(key, value)
    return form


async def _json(call: Any) -> dict[str, Any]:
    async with call as r:
        body = await r.json(content_type=None)
        if r.status != 200:
            status = body.get("responseStatus") or {}
            errors = [FieldError(e.get("fieldName", ""), e.get("message", "")) for e in status.get("errors", [])]
            if r.status == 400 and errors:
                raise InvalidRequest(errors)
            raise RemoteError(f"{r.status}: {status.get('message', body)}")
        return dict(body)
