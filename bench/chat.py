"""Chat through router + agent against llama.cpp's own server called directly, side by side.

Both sides run the same llama-server build with the same arguments (the direct one is started by
the agent's own code, agent/chat/servers.py, in this process; the agent starts its own), the same
model (SmolLM2-135M-Instruct Q4_1 on the CPU here), the same prompt, seed and length. Measured at
the client, streaming: time to the first token, and tokens per second (completion tokens over the
time from the first token to the last); with 8 concurrent chats also the total tokens per second
of a batch. Each round runs both sides once, alternating which goes first, so only one side
generates at a time. Results: bench/results/chat.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent.chat.build import server_binary
from agent.chat.models import ModelFiles, packaged
from agent.chat.servers import LlamaServers
from bench.overhead import RESULTS
from bench.router import Services
from gpugate.settings import Chat, load_settings

PARALLEL = 8
CONTEXT = 1024
MAX_TOKENS = 128
PROMPT = "Count from 1 to 100, writing every number in words, separated by commas."


async def one_chat(http: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str) -> dict[str, float]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "seed": 7, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    assert tokens == MAX_TOKENS, f"{tokens} tokens: the chat stopped early"
    return {"ttft_ms": (first - sent) * 1000, "tokens_per_s": tokens / (last - first), "tokens": tokens,
            "end": last}


async def batch(url: str, headers: dict[str, str], model: str, n: int) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        chats = await asyncio.gather(*(one_chat(http, url, headers, model) for _ in range(n)))
    wall = max(c["end"] for c in chats) - start
    return {"chats": chats, "total_tokens_per_s": sum(c["tokens"] for c in chats) / wall}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


async def measure(rounds: int) -> dict[str, Any]:
    settings = load_settings(environ={})
    [(name, path)] = packaged().items()
    os.environ.update({"GPUGATE_CHAT__PARALLEL": str(PARALLEL), "GPUGATE_CHAT__CONTEXT": str(CONTEXT)})
    chat = Chat(parallel=PARALLEL, context=CONTEXT)
    files = ModelFiles(Path("/nonexistent"))
    direct_servers = LlamaServers(chat, server_binary(settings), 2**40, gpu=False)
    out: dict[str, Any] = {"model": name, "max_tokens": MAX_TOKENS, "parallel": PARALLEL, "rounds": rounds,
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only"}
    with tempfile.TemporaryDirectory(prefix="gpugate-bench-chat-") as tmp:
        async with Services(Path(tmp), comfy=False, runners='["chat"]') as services, \
                direct_servers.use(name, path, CONTEXT, files.memory(path, CONTEXT, PARALLEL)) as direct_url:
            sides = {"direct": (direct_url, {}, name),
                     "gpugate": (services.url, {"Authorization": f"Bearer {services.key}"}, "smollm2-135m")}
            for label, concurrency in (("sequential", 1), ("concurrent", PARALLEL)):
                results: dict[str, list[dict[str, Any]]] = {"direct": [], "gpugate": []}
                for side in sides:  # warm-up: models loaded, connections open
                    await batch(*sides[side], concurrency)
                for i in range(rounds):
                    for side in (("direct", "gpugate") if i % 2 == 0 else ("gpugate", "direct")):
                        results[side].append(await batch(*sides[side], concurrency))
                row = {}
                for side, batches in results.items():
                    chats = [c for b in batches for c in b["chats"]]
                    row[side] = {"ttft_ms": _median([c["ttft_ms"] for c in chats]),
                                 "tokens_per_s": _median([c["tokens_per_s"] for c in chats]),
                                 "total_tokens_per_s": _median([b["total_tokens_per_s"] for b in batches])}
                row["ttft_added_ms"] = round(row["gpugate"]["ttft_ms"] - row["direct"]["ttft_ms"], 1)
                row["tokens_per_s_ratio"] = round(row["gpugate"]["tokens_per_s"] / row["direct"]["tokens_per_s"], 3)
                row["total_tokens_per_s_ratio"] = round(
                    row["gpugate"]["total_tokens_per_s"] / row["direct"]["total_tokens_per_s"], 3)
                out[label] = row
        await direct_servers.close()
    return out


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chat.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Chat: router + agent against llama-server directly ({result['model']}, {result['max_tokens']} tokens "
             f"a chat, {result['machine']}, {result['rounds']} rounds)", "",
             "| chats at once | side | time to first token (ms, median) | tokens/s per chat (median) | "
             "tokens/s, all chats (median) |", "|---|---|---|---|---|"]
    for label, concurrency in (("sequential", 1), ("concurrent", result["parallel"])):
        row = result[label]
        for side in ("direct", "gpugate"):
            r = row[side]
            lines.append(f"| {concurrency} | {side} | {r['ttft_ms']} | {r['tokens_per_s']} | {r['total_tokens_per_s']} |")
        lines.append(f"| {concurrency} | gpugate vs direct | +{row['ttft_added_ms']} ms | x{row['tokens_per_s_ratio']} | "
                     f"x{row['total_tokens_per_s_ratio']} |")
    (RESULTS / "chat.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    write(asyncio.run(measure(args.rounds)))
    print(f"written to {RESULTS / 'chat.md'}")


if __name__ == "__main__":
    main()
