"""A key's limits: a cap on its queued jobs and on its jobs a minute (429 naming the limit, nothing
queued), and its weight when keys take turns; set when the key is made or later, by an admin."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gpugate.settings import Settings
from router.dispatch import fair_order
from router.keys import create_key
from router.state import QUEUE, STORE
from router.store import Job, KeyLimits
from tests.services import Router, call, router_settings_in


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), echo_api="true")  # no agent: echo jobs wait


def _queued(router: Router, key_id: int) -> int:
    return sum(1 for j in router.app[QUEUE].live.values() if j.key_id == key_id)


async def test_a_key_past_its_queued_cap_gets_a_429_naming_the_cap(router: Router) -> None:
    capped = create_key(router.app[STORE], "capped", limits=KeyLimits(max_queued=2))
    first = [await call(router, capped.token, "QueueEcho", {"text": f"job {n}", "refId": f"c{n}"}) for n in range(2)]
    refused = await call(router, capped.token, "QueueEcho", {"text": "one too many"}, status=429)
    assert refused["responseStatus"]["errorCode"] == "TooManyRequests"
    assert "at most 2 queued jobs (maxQueued) and has 2" in refused["responseStatus"]["message"]
    assert _queued(router, capped.key.id) == 2, "nothing was queued for the refused request"
    retried = await call(router, capped.token, "QueueEcho", {"text": "job 0", "refId": "c0"})
    assert retried["jobId"] == first[0]["jobId"], "a retried request is answered with its job, cap or not"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {capped.token}"}) as http:
        async with http.post(f"{router.url}/v1/chat/completions",
                             json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}) as r:
            assert r.status == 429 and "maxQueued" in (await r.json())["error"]["message"], "chats count too"


async def test_a_key_past_its_rate_gets_a_429_with_retry_after(router: Router) -> None:
    limited = create_key(router.app[STORE], "limited", limits=KeyLimits(per_minute=3))
    for n in range(3):
        await call(router, limited.token, "QueueEcho", {"text": f"job {n}"})
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {limited.token}"}) as http:
        async with http.post(f"{router.url}/api/QueueEcho", json={"text": "too soon"}) as r:
            answer = await r.json()
            assert r.status == 429 and 1 <= int(r.headers["Retry-After"]) <= 20
    assert "may submit 3 jobs a minute (perMinute)" in answer["responseStatus"]["message"]
    assert _queued(router, limited.key.id) == 3


async def test_an_admin_sets_a_keys_limits(router: Router, admin: Any) -> None:
    made = await call(router, admin.token, "CreateApiKey", {"name": "batch", "weight": 4, "maxQueued": 100})
    assert (made["key"]["weight"], made["key"]["maxQueued"], made["key"]["perMinute"]) == (4, 100, None)
    changed = await call(router, admin.token, "SetApiKeyLimits", {"id": made["key"]["id"], "perMinute": 60})
    assert (changed["weight"], changed["maxQueued"], changed["perMinute"]) == (1, None, 60)
    refused = await call(router, admin.token, "SetApiKeyLimits", {"id": made["key"]["id"], "weight": 0}, status=400)
    assert refused["responseStatus"]["errors"][0]["fieldName"] == "weight"
    client = create_key(router.app[STORE], "client").token
    assert (await call(router, client, "SetApiKeyLimits", {"id": 1, "weight": 9}, status=403))


def _job(job_id: int, key_id: int) -> Job:
    return Job(id=job_id, api="Echo", capability="echo", params={}, inputs={}, model=None, megapixels=0,
               max_attempts=1, key_id=key_id)


def test_keys_take_turns_by_weight() -> None:
    jobs = [_job(i, 1) for i in range(1, 9)] + [_job(i, 2) for i in range(9, 13)]
    order = [j.key_id for j in fair_order(jobs, {}, {1: 3, 2: 1}.__getitem__)]
    assert order == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 2, 2]
    flat = [j.key_id for j in fair_order(jobs, {})]
    assert flat[:6] == [1, 2, 1, 2, 1, 2], "weight 1 each: one job of each key a turn"
