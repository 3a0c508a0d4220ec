"""What the router counts, and /metrics in Prometheus' text format (written out here: a dozen lines
of format do not need a client library).

Counted as jobs finish: jobs by API and final state, and how long they took from queued to
finished (a histogram per API); for chats, tokens in and out, seconds spent generating (tokens
per second = rate of tokens out / rate of those seconds) and the time to the first token. Read at scrape time: queue depth per API, live jobs by state,
agents online, VRAM per GPU, callback outcomes.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Iterable

from .retention import Retention
from .sessions import SessionRegistry
from .store import Job, JobState

BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, math.inf)  # seconds
THROUGHPUT_WINDOW_S = 3600


class Metrics:
    def __init__(self) -> None:
        self.finished: Counter[tuple[str, str]] = Counter()  # (api, state) -> jobs
        self.durations: dict[str, list[float]] = {}  # api -> [count per bucket..., sum]
        self.recent: deque[float] = deque()  # finish times within the throughput window
        self.chat: Counter[str] = Counter()  # tokens_in, tokens_out, generation_s, first_token_s, answers

    def _chat_finished(self, job: Job) -> None:
        details = (job.results or {}).get("details") or {}
        usage = details.get("usage") or {}
        out = usage.get("completion_tokens", 0)
        self.chat["tokens_in"] += usage.get("prompt_tokens", 0)
        self.chat["tokens_out"] += out
        if details.get("tokensPerSecond"):
            self.chat["generation_s"] += out / details["tokensPerSecond"]
        if details.get("timeToFirstTokenMs") is not None:
            self.chat["first_token_s"] += details["timeToFirstTokenMs"] / 1000
            self.chat["answers"] += 1

    def job_finished(self, job: Job) -> None:
        self.finished[(job.api, job.state)] += 1
        if job.capability == "chat" and job.state == JobState.COMPLETED:
            self._chat_finished(job)
        took = max(0.0, (job.finished or time.time()) - job.created)
        row = self.durations.setdefault(job.api, [0.0] * (len(BUCKETS) + 1))
        for i, bound in enumerate(BUCKETS):
            if took <= bound:
                row[i] += 1
        row[-1] += took
        self.recent.append(job.finished or time.time())
        self._trim(time.time())

    def throughput(self, now: float, minutes: int = 60) -> list[int]:
        """Jobs finished in each of the last ``minutes`` minutes, oldest first."""
        self._trim(now)
        counts = [0] * minutes
        for when in self.recent:
            age = int((now - when) // 60)
            if age < minutes:
                counts[minutes - 1 - age] += 1
        return counts

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0] < now - THROUGHPUT_WINDOW_S:
            self.recent.popleft()

    def render(self, live: Iterable[Job], sessions: SessionRegistry, callbacks: dict[str, int],
               retention: Retention) -> str:
        live = list(live)
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            out.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples)

        depth = Counter(j.api for j in live if j.state == JobState.QUEUED)
        family("gpugate_queue_depth", "gauge", "Jobs waiting for an agent, per API.",
               (({"api": api}, n) for api, n in sorted(depth.items())))
        states = Counter(j.state for j in live)
        family("gpugate_jobs", "gauge", "Live jobs by state.",
               (({"state": s}, states.get(s, 0)) for s in (JobState.QUEUED, JobState.STARTED)))
        family("gpugate_jobs_finished_total", "counter", "Jobs finished since the router started, by API and state.",
               (({"api": api, "state": state}, n) for (api, state), n in sorted(self.finished.items())))
        out.extend(["# HELP gpugate_job_duration_seconds Time from queued to finished, per API.",
                    "# TYPE gpugate_job_duration_seconds histogram"])
        for api, row in sorted(self.durations.items()):
            for bound, count in zip(BUCKETS, row):
                out.append(f"gpugate_job_duration_seconds_bucket{_labels({'api': api, 'le': _number(bound)})} {_number(count)}")
            out.append(f"gpugate_job_duration_seconds_sum{_labels({'api': api})} {_number(row[-1])}")
            out.append(f"gpugate_job_duration_seconds_count{_labels({'api': api})} {_number(row[len(BUCKETS) - 1])}")
        family("gpugate_chat_tokens_total", "counter", "Chat tokens since the router started: in (prompts), out (answers).",
               [({"direction": "in"}, self.chat["tokens_in"]), ({"direction": "out"}, self.chat["tokens_out"])])
        family("gpugate_chat_generation_seconds_total", "counter",
               "Seconds agents spent generating chat answers (tokens out per second: divide the rates).",
               [({}, round(self.chat["generation_s"], 3))])
        out.extend(["# HELP gpugate_chat_first_token_seconds Time from a chat reaching its model to its first token.",
                    "# TYPE gpugate_chat_first_token_seconds summary",
                    f"gpugate_chat_first_token_seconds_sum {_number(round(self.chat['first_token_s'], 3))}",
                    f"gpugate_chat_first_token_seconds_count {_number(self.chat['answers'])}"])
        remote, now = sessions.remote(), time.time()
        family("gpugate_agents_online", "gauge", "Agents connected now.", [({}, len(remote))])
        family("gpugate_agent_healthy", "gauge",
               "1 while the agent takes jobs, 0 while it is paused after infrastructure failures in a row.",
               (({"agent": a.name}, 0 if sessions.paused(a.name, now) else 1) for a in remote))
        family("gpugate_agent_failures_in_row", "gauge", "Infrastructure failures in a row, per agent.",
               (({"agent": name}, h.failures_in_row) for name, h in sorted(sessions.health.items())))
        gpus = [(a.name, d) for a in remote if not a.cpu_only for d in a.devices]
        family("gpugate_gpu_vram_free_bytes", "gauge", "Free memory per GPU, as last reported.",
               (({"agent": name, "gpu": str(d.index), "name": d.name}, d.vram_free) for name, d in gpus))
        family("gpugate_gpu_vram_total_bytes", "gauge", "Memory per GPU.",
               (({"agent": name, "gpu": str(d.index), "name": d.name}, d.vram_total) for name, d in gpus))
        family("gpugate_callback_deliveries_total", "counter",
               "ReplyTo callback attempts since the router started, by outcome (delivered, retried, failed).",
               (({"outcome": k}, v) for k, v in sorted(callbacks.items())))
        family("gpugate_store_free_bytes", "gauge", "Free space on the file store's disk.", [({}, retention.free_bytes())])
        family("gpugate_store_files_removed_total", "counter", "Files deleted by retention since the router started.",
               [({}, retention.removed)])
        return "\n".join(out) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{v}"'.replace("\n", r"\n") for k, v in
               ((k, str(v).replace("\\", r"\\").replace('"', r"\"")) for k, v in labels.items()))
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))
