"""The scheduling rules, as a pure function of what agents report."""

from __future__ import annotations

from router.scheduler import GB, AgentView, JobNeeds, Unplaceable, choose, vram_needed
from gpugate.wire import Capability

TXT2IMG = {"txt2img": Capability(name="txt2img", model_kind="checkpoints")}
X, Y = ("checkpoints", "x.safetensors"), ("checkpoints", "y.safetensors")


def agent(name: str, free_gb: float, models=(X,), loaded=(), running=0, slots=1, caps=TXT2IMG) -> AgentView:
    return AgentView(name, caps, {m: 2 * GB for m in models}, int(free_gb * GB), frozenset(loaded), running, slots)


def job(model: str | None = "x.safetensors", megapixels: float = 0.25, **kw) -> JobNeeds:
    return JobNeeds("txt2img", model, megapixels, **kw)


def test_a_job_goes_to_the_agent_that_has_its_model() -> None:
    assert choose(job(), [agent("a", 20, models=[Y]), agent("b", 8, models=[X])]).name == "b"


def test_a_loaded_model_beats_more_free_vram_which_beats_fewer_running_jobs() -> None:
    assert choose(job(), [agent("a", 20), agent("b", 8, loaded=["x.safetensors"])]).name == "b"
    assert choose(job(), [agent("a", 20), agent("b", 8)]).name == "a"
    assert choose(job(), [agent("a", 8, running=2), agent("b", 8, running=1)]).name == "b"


def test_reasons_when_nothing_fits() -> None:
    # missing: no agent could run it as things stand (a sync call answers at once); memory is not that
    assert choose(job(), []) == Unplaceable("no agent is connected", missing=True)
    assert choose(JobNeeds("upscale"), [agent("a", 8)]) == Unplaceable("no agent can run upscale", missing=True)
    assert choose(job("z.safetensors"), [agent("a", 8)]) == Unplaceable("no agent has model z.safetensors", missing=True)
    need = vram_needed(job(megapixels=4), TXT2IMG["txt2img"], 2 * GB)
    assert choose(job(megapixels=4), [agent("a", 3), agent("b", 4)]) == Unplaceable(
        f"needs about {need / GB:.1f} GB VRAM, the most free is 4.0 GB")
    busy = choose(job(), [agent("a", 8, slots=0)])
    assert isinstance(busy, Unplaceable) and busy.busy


def test_after_out_of_memory_only_an_agent_with_more_free_vram_qualifies() -> None:
    retry = job(min_free_vram=8 * GB)
    assert choose(retry, [agent("a", 8), agent("b", 12)]).name == "b"
    assert choose(retry, [agent("a", 8)]).reason.startswith("needs about 8.0 GB VRAM")


def test_an_agent_that_lost_the_job_is_preferred_last_but_never_banned() -> None:
    assert choose(job(avoid=frozenset({"a"})), [agent("a", 20), agent("b", 8)]).name == "b"
    assert choose(job(avoid=frozenset({"a"})), [agent("a", 20)]).name == "a", "with one agent it runs there again"
    assert choose(job(avoid=frozenset({"a"})), [agent("a", 20), agent("b", 8, slots=0)]).name == "a", \
        "a free agent that lost it beats waiting for a busy one"


def test_a_paused_agent_gets_no_jobs_and_the_reason_says_so() -> None:
    paused = AgentView("a", TXT2IMG, {X: 2 * GB}, 20 * GB, slots=1, paused="3 infrastructure failures in a row")
    assert choose(job(), [paused, agent("b", 8)]).name == "b"
    waiting = choose(job(), [paused])
    assert isinstance(waiting, Unplaceable) and waiting.busy and "paused (3 infrastructure failures" in waiting.reason


def test_the_estimate_can_be_overridden_per_workflow() -> None:
    cheap = Capability(name="upscale", model_kind="upscale_models", vram_base=0, vram_per_megapixel=GB // 4)
    assert vram_needed(JobNeeds("upscale", megapixels=4), cheap, None) == GB
