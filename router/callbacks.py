"""ReplyTo callbacks: a finished job's final status, POSTed to the URL its Queue* call gave.

- The body is what GetArtifactGenerationStatus / GetTextGenerationStatus answers for the job
  (GetOpenAiChatStatus for a chat).
- It is written to the store's outbox (the deliveries table) in the same transaction that
  finishes the job, so a router restart loses no delivery; a sender task drains the outbox.
- Every attempt is signed the Standard Webhooks way (webhook-id, webhook-timestamp,
  webhook-signature = v1,base64(HMAC-SHA256(secret, "id.timestamp.body"))) with the job's key's
  webhook secret, or the server's. The webhook-id is the same on every attempt, so a receiver that
  saw it already can drop the repeat.
- Failed attempts are retried with exponential backoff until ``callback_give_up_s`` after the job
  finished. A dead or slow receiver only delays its own deliveries (a timeout per attempt).
- A replyTo on a loopback, private, link-local or otherwise non-public address is refused, at
  submission and again at each attempt, unless an allowed network holds it. At each attempt the
  host is resolved once, inside the attempt's timeout, and the connection goes to the addresses
  that passed the check (``CheckedResolver``): a DNS answer that changes between a check and the
  connection (rebinding) cannot steer a callback to an internal address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from gpugate.settings import Router as RouterSettings

from .api.responses import status_of, status_text
from .chat import CAPABILITY as CHAT, chat_status_body
from .store import Delivery, Job, Store, store_call
from .urls import Links, UrlSigner

log = logging.getLogger(__name__)
MAX_IN_FLIGHT = 64  # deliveries attempted at once
LOOKUP_TIMEOUT_S = 5.0  # resolving a replyTo host at submission
LEASE_MARGIN_S = 5.0
RETRY_PASS_S = 1.0
IDLE_LOOK_S = 5.0  # the outbox is looked at this often even when nothing is due
PRUNE_EVERY_S = 3600.0
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value for one attempt."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def next_attempt_at(delivery: Delivery, now: float, settings: RouterSettings) -> float | None:
    """When to try a failed delivery again (pure): the wait doubles from ``callback_retry_s`` up to
    ``callback_retry_max_s``; None once past ``callback_give_up_s``."""
    wait = min(settings.callback_retry_s * 2 ** max(delivery.attempts - 1, 0), settings.callback_retry_max_s)
    at = now + wait
    return at if at <= delivery.created + settings.callback_give_up_s else None


def address_problem(addresses: Iterable[IpAddress], allowed: Iterable[str]) -> str | None:
    """Why a callback may not go to these addresses, or None (pure)."""
    networks = [ipaddress.ip_network(n, strict=False) for n in allowed]
    for address in addresses:
        if any(address in network for network in networks):
            continue
        if not address.is_global or address.is_multicast:
            return f"points at a non-public address ({address}); only public addresses may receive callbacks"
    return None


def url_problem(url: str, allowed: Iterable[str]) -> str | None:
    """What is wrong with ``url`` that needs no lookup: not http(s), or a literal non-public address."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http:// or https:// URL"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return address_problem([address], allowed)


async def reply_to_problem(url: str, allowed: Iterable[str]) -> str | None:
    """Why ``url`` cannot receive callbacks (bad URL, unresolvable host, non-public address), or None."""
    if problem := url_problem(url, allowed):
        return problem
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        return None  # a literal address, checked above
    except ValueError:
        pass
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError, TimeoutError):
        return f"host {host!r} does not resolve"
    return address_problem([ipaddress.ip_address(info[4][0]) for info in infos], allowed)


class RefusedAddress(OSError):
    """A callback's host resolved to an address it may not be sent to."""


class CheckedResolver(AbstractResolver):
    """aiohttp's resolver for callbacks: one lookup per connection, and only addresses that pass
    ``address_problem`` are handed on, so the socket connects to what was checked."""

    def __init__(self, allowed: Iterable[str], inner: AbstractResolver | None = None) -> None:
        self.allowed = tuple(allowed)
        self.inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        if problem := address_problem([ipaddress.ip_address(r["host"]) for r in found], self.allowed):
            raise RefusedAddress(problem)
        return found

    async def close(self) -> None:
        await self.inner.close()


class CallbackSender:
    """Makes a finished job's delivery (for the queue) and drains the outbox (a task of its own)."""

    def __init__(self, store: Store, settings: RouterSettings, server_secret: str,
                 field_names: Callable[[str], dict[str, str]], signer: UrlSigner,
                 resolver: AbstractResolver | None = None) -> None:
        self.store, self.settings, self.server_secret, self.signer = store, settings, server_secret, signer
        self._resolver = resolver  # where callback hosts are looked up (tests give their own)
        self._field_names = field_names
        self.base_url = (settings.public_base_url or settings.local_url).rstrip("/")  # for jobs without their own
        self.outcomes = {"delivered": 0, "retried": 0, "failed": 0}  # since start, for /metrics
        self._wake = asyncio.Event()
        self._pruned = 0.0
        self._in_flight: dict[int, asyncio.Task[None]] = {}

    def delivery_for(self, job: Job) -> Delivery | None:
        """The delivery a job that just finished owes (None without replyTo); the queue stores it."""
        if not job.reply_to:
            return None
        now = time.time()
        links = Links(job.base_url or self.base_url, self.signer, now)
        if job.capability == CHAT:
            body = chat_status_body(job, status_text(job))
        else:
            body = status_of(job, links, status_text(job), None, self._field_names(job.api)).body()
        self._wake.set()
        return Delivery(id=0, job_id=job.id, key_id=job.key_id, url=job.reply_to, webhook_id=f"msg_{secrets.token_hex(12)}",
                        body=json.dumps(body, separators=(",", ":")), created=now, next_at=now)

    async def run(self) -> None:
        """Start an attempt for each delivery as it falls due, each on its own (a slow or dead
        receiver delays only its own deliveries), and sleep until the next is due or a job finishes.
        A failing pass (the store busy, say) is logged and tried again; it is all in the outbox."""
        timeout = aiohttp.ClientTimeout(total=self.settings.callback_timeout_s)  # the lookup included
        connector = aiohttp.TCPConnector(resolver=CheckedResolver(self.settings.callback_allow_networks, self._resolver),
                                         use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         headers={"User-Agent": "gpugate-callbacks"}) as http:
            try:
                while True:
                    try:
                        wait = await self._start_due(http)
                    except Exception:
                        log.exception("callback pass failed; retrying")
                        wait = RETRY_PASS_S
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
            finally:
                for task in self._in_flight.values():
                    task.cancel()
                await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    async def _start_due(self, http: aiohttp.ClientSession) -> float:
        """Start what is due (up to MAX_IN_FLIGHT at once); how long until the next is due."""
        self._wake.clear()
        now = time.time()
        if now - self._pruned > PRUNE_EVERY_S:  # finished deliveries are kept a while, then dropped
            await store_call(self.store, self.store.forget_deliveries, now - self.settings.callback_give_up_s)
            self._pruned = now
        room = MAX_IN_FLIGHT - len(self._in_flight)
        for delivery in await store_call(self.store, self.store.due_deliveries, now, room) if room > 0 else ():
            # leased for the attempt's length (due again only if the router stops meanwhile), by one
            # router: routers sharing a database (router.shared) each deliver what they lease
            until = now + self.settings.callback_timeout_s + LEASE_MARGIN_S
            if not await store_call(self.store, self.store.claim_delivery, delivery, until):
                continue
            delivery.attempts += 1
            delivery.next_at = until
            task = asyncio.create_task(self._attempt(http, delivery), name=f"callback-job-{delivery.job_id}")
            self._in_flight[delivery.id] = task
            task.add_done_callback(lambda _, key=delivery.id: self._attempt_ended(key))
        next_at = await store_call(self.store, self.store.next_delivery_at)  # (routers sharing a database add deliveries unseen: look again soon)
        return min(max(0.0, next_at - time.time()), IDLE_LOOK_S) if next_at is not None else IDLE_LOOK_S

    def _attempt_ended(self, delivery_id: int) -> None:
        self._in_flight.pop(delivery_id, None)
        self._wake.set()

    async def _attempt(self, http: aiohttp.ClientSession, delivery: Delivery) -> None:
        extra = {"job": delivery.job_id, "url": delivery.url, "attempt": delivery.attempts}
        try:
            error = url_problem(delivery.url, self.settings.callback_allow_networks)
            refused = error is not None
            if error is None:
                error, refused = await self._post(http, delivery)
            if error is None:
                delivery.state, delivery.last_error = "delivered", None
                log.info("callback delivered", extra=extra)
            else:
                delivery.last_error = error
                next_at = next_attempt_at(delivery, time.time(), self.settings)
                if next_at is None or refused:
                    delivery.state = "failed"
                    log.warning("callback given up", extra={**extra, "error": error})
                else:
                    delivery.next_at = next_at
                    log.info("callback failed; will retry", extra={**extra, "error": error,
                                                                  "in_s": round(next_at - time.time(), 1)})
            self.outcomes["retried" if delivery.state == "pending" else delivery.state] += 1
            await store_call(self.store, self.store.update_delivery, delivery)
        except Exception:  # the lease runs out and the delivery is tried again
            log.exception("callback attempt failed", extra=extra)

    async def _post(self, http: aiohttp.ClientSession, delivery: Delivery) -> tuple[str | None, bool]:
        """One signed POST: (None, False) on a 2xx answer, else what went wrong and whether the
        address was refused (then retrying is pointless)."""
        key = await store_call(self.store, self.store.get_key, delivery.key_id) if delivery.key_id is not None else None
        secret = key.webhook_secret if key is not None and key.webhook_secret else self.server_secret
        body = delivery.body.encode()
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "webhook-id": delivery.webhook_id,
                   "webhook-timestamp": str(timestamp), "webhook-signature": sign(secret, delivery.webhook_id, timestamp, body)}
        try:
            async with http.post(delivery.url, data=body, headers=headers, allow_redirects=False) as r:
                return (None if 200 <= r.status < 300 else f"answered HTTP {r.status}"), False
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, RefusedAddress):
                return str(exc.os_error), True
            return f"host does not resolve: {exc.os_error}", False
        except (aiohttp.ClientError, TimeoutError) as exc:
            return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), False
