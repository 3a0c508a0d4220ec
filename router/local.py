"""The router's own worker: image transforms that run here (with Pillow, in worker threads) rather
than on an agent. It joins the agent registry like any agent, so its jobs use the same queue,
states, retries and status; it only skips the network."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

from gpugate.errors import FailureKind, InfrastructureFault, JobFailed
from gpugate.wire import Ack, Artifact, Capability, Device, Done, Failed, Failure, Hello, JobOffer, StopJob

from .artifacts import ArtifactStore
from .dispatch import Dispatcher
from .images import TRANSFORMS
from .outcomes import Outcomes
from .sessions import LOCAL_WORKER, AgentSession, SessionRegistry

log = logging.getLogger(__name__)
CONCURRENCY = 2


@contextlib.asynccontextmanager
async def local_worker(sessions: SessionRegistry, outcomes: Outcomes, dispatcher: Dispatcher,
                       artifacts: ArtifactStore, name: str = LOCAL_WORKER) -> AsyncIterator[None]:
    """Join the registry (as ``name``) for the lifetime of the block; its running jobs are awaited on exit."""
    tasks: dict[int, asyncio.Task[None]] = {}

    async def send(message: JobOffer | StopJob | Ack) -> None:
        if isinstance(message, Ack):
            return
        if isinstance(message, StopJob):  # cancelled: the queue has already ended the job
            if (running := tasks.get(message.job_id)) is not None:
                running.cancel()
            return
        task = asyncio.create_task(_run(me, message, outcomes, dispatcher, artifacts), name=f"local-job-{message.job_id}")
        tasks[message.job_id] = task
        task.add_done_callback(lambda done: tasks.pop(message.job_id) if tasks.get(message.job_id) is done else None)

    async def disconnect() -> None:
        return None

    hello = Hello(name=name, instance=name, cpu_only=True,
                  devices=[Device(index=-1, name="router", vram_total=0, vram_free=0)], models=[],
                  capabilities=[Capability(name=c, vram_base=0, vram_per_megapixel=0) for c in TRANSFORMS],
                  concurrency=CONCURRENCY)
    me, _ = sessions.join(hello, send, disconnect, local=True)
    await outcomes.resume(me, [])  # what the last router's own worker was running died with it: queued again
    me.slots = CONCURRENCY
    me.last_seen = math.inf  # in-process: never silent
    try:
        yield
    finally:
        me.draining = True
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        sessions.leave(me)


async def _run(me: AgentSession, offer: JobOffer, outcomes: Outcomes, dispatcher: Dispatcher,
               artifacts: ArtifactStore) -> None:
    try:
        try:
            files = {}
            for name, artifact in offer.inputs.items():
                path = artifacts.path(artifact)
                if path is None:
                    raise InfrastructureFault(f"input {name} is missing from the router's file store")
                files[name] = await asyncio.to_thread(path.read_bytes)
            data, ext = await asyncio.to_thread(TRANSFORMS[offer.capability], offer.params, files)
            name = await artifacts.put(data, f".{ext}")
        except OSError as exc:  # a full disk, say
            raise InfrastructureFault.of_os_error(exc, "the image transform") from exc
        await outcomes.done(me, Done(job_id=offer.job_id, attempt=offer.attempt,
                                     artifacts=[Artifact(name=name, file_name=f"{offer.capability}.{ext}",
                                                         media_type=f"image/{ext}", size=len(data))]))
    except JobFailed as exc:
        await outcomes.failed(me, Failed(job_id=offer.job_id, attempt=offer.attempt, failure=Failure.of(exc)))
    except asyncio.CancelledError:  # stopped: the job is over already; only the slot comes back
        pass
    except Exception as exc:  # a bug or a broken file must end the job, never hang it
        log.exception("local transform failed", extra={"job": offer.job_id})
        await outcomes.failed(me, Failed(job_id=offer.job_id, attempt=offer.attempt, failure=Failure(
            kind=FailureKind.EXECUTION, message=f"{type(exc).__name__}: {exc}")))
    finally:
        me.slots += 1
        dispatcher.wake()
