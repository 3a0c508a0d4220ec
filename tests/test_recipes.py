"""Model families on the router: each family's request becomes its own workflow with its own
defaults, rendered from the shipped templates exactly as an agent would render it; client values
win; ``arguments`` reach their nodes; unknown models and arguments are refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.comfy.workflows import WorkflowLibrary, render, validate
from gpugate.catalog import Catalog
from gpugate.errors import InvalidRequest
from gpugate.settings import PROJECT_ROOT
from gpugate.params import TEXT_MAX
from gpugate.wire import Capability, Heartbeat, Hello, Model, WorkflowParam
from router.api.requests import TextToImage, parse
from router.families import TASKS, FamilyTable
from router.models import ModelBook
from router.sessions import SessionRegistry
from router.workflows import check_args

WORKFLOWS = PROJECT_ROOT / "workflows"
CATALOG = """
[models.sd15]
kind = "checkpoints"
file = "sd15.safetensors"
family = "sd15"
default = true
[models.schnell]
kind = "checkpoints"
file = "flux1-schnell-fp8.safetensors"
family = "flux1-schnell"
aliases = ["flux1-schnell"]
[models.dev]
kind = "checkpoints"
file = "flux1-dev.safetensors"
family = "flux1-dev"
[models.sdxl]
kind = "checkpoints"
file = "sd_xl_base_1.0.safetensors"
family = "sdxl"
[models.lightning]
kind = "checkpoints"
file = "sdxl_lightning_4step.safetensors"
family = "sdxl-lightning"
aliases = ["sdxl_lightning_4step"]
[models.large]
kind = "checkpoints"
file = "sd3.5_large.safetensors"
family = "sd35-large"
aliases = ["sd3.5_large"]
"""


@pytest.fixture(scope="module")
def table() -> FamilyTable:
    return FamilyTable.load(WORKFLOWS / "families.toml")


@pytest.fixture
def book(tmp_path: Path, table: FamilyTable) -> ModelBook:
    (tmp_path / "catalog.toml").write_text(CATALOG)
    return ModelBook(Catalog.load(tmp_path / "catalog.toml"), table, SessionRegistry())


def rendered(spec_params: dict[str, Any], workflow: str) -> dict[str, Any]:
    """The prompt an agent would submit for these parameters (validation without ComfyUI's lists)."""
    template = WorkflowLibrary([WORKFLOWS]).get(workflow)
    values = validate(template, spec_params, lambda node, name: None)
    return render(template, values, {}, "job1")


def node(prompt: dict[str, Any], class_type: str) -> dict[str, Any]:
    [found] = [n["inputs"] for n in prompt.values() if n["class_type"] == class_type]
    return found


def test_every_family_recipe_names_a_shipped_workflow_and_only_its_parameters(table: FamilyTable) -> None:
    library = WorkflowLibrary([WORKFLOWS])
    assert {"sd15", "sdxl", "sdxl-lightning", "sdxl-turbo", "flux1-schnell", "flux1-dev", "sd35-medium", "sd35-large",
            "sd35-large-turbo"} <= set(table.families)
    for family in table.families.values():
        assert set(family.recipes) == set(TASKS), family.name
        for recipe in family.recipes.values():
            template = library.get(recipe.workflow)
            assert set(recipe.defaults) <= set(template.params), (family.name, recipe.task)
            assert ("negative_prompt" in template.params) == family.negative_prompt, (family.name, recipe.task)


@pytest.mark.parametrize(("model", "workflow", "steps", "cfg", "sampler", "scheduler", "size", "latent"), [
    ("sd15", "txt2img", 20, 7.0, "euler", "normal", 512, "EmptyLatentImage"),
    ("sdxl", "txt2img", 25, 7.0, "dpmpp_2m", "karras", 1024, "EmptyLatentImage"),
    ("sdxl_lightning_4step", "txt2img", 4, 1.0, "euler", "sgm_uniform", 1024, "EmptyLatentImage"),
    ("flux1-schnell", "txt2img-flux", 4, 1.0, "euler", "simple", 1024, "EmptySD3LatentImage"),
    ("dev", "txt2img-flux", 20, 1.0, "euler", "simple", 1024, "EmptySD3LatentImage"),
    ("sd3.5_large", "txt2img-sd3", 28, 4.5, "dpmpp_2m", "sgm_uniform", 1024, "EmptySD3LatentImage"),
])
def test_text_to_image_renders_the_familys_workflow_with_its_defaults(
        book: ModelBook, model: str, workflow: str, steps: int, cfg: float, sampler: str, scheduler: str, size: int,
        latent: str) -> None:
    spec = parse(TextToImage, {"positivePrompt": "a lighthouse", "model": model}).job(book)
    assert spec.capability == workflow
    prompt = rendered(spec.params, workflow)
    sampling = node(prompt, "KSampler")
    assert (sampling["steps"], sampling["cfg"], sampling["sampler_name"], sampling["scheduler"]) == (steps, cfg, sampler, scheduler)
    assert node(prompt, latent)["width"] == node(prompt, latent)["height"] == size
    assert spec.megapixels == pytest.approx(size * size / 1e6)
    assert node(prompt, "CheckpointLoaderSimple")["ckpt_name"] == book.catalog.find(model, "checkpoints").file
    if workflow == "txt2img-sd3":
        assert node(prompt, "ModelSamplingSD3")["shift"] == 3.0
    if workflow == "txt2img-flux":
        assert node(prompt, "FluxGuidance")["guidance"] == 3.5


def test_client_values_and_arguments_override_the_family_defaults(book: ModelBook) -> None:
    spec = parse(TextToImage, {"positivePrompt": "p", "model": "flux1-schnell", "width": 512, "height": 256,
                               "arguments": '{"steps": 2, "guidance": 5.5, "sampler": "dpmpp_2m"}'}).job(book)
    prompt = rendered(spec.params, spec.capability)
    assert node(prompt, "EmptySD3LatentImage")["width"] == 512 and node(prompt, "EmptySD3LatentImage")["height"] == 256
    assert node(prompt, "KSampler")["steps"] == 2 and node(prompt, "KSampler")["sampler_name"] == "dpmpp_2m"
    assert node(prompt, "FluxGuidance")["guidance"] == 5.5


def test_a_negative_prompt_the_family_cannot_use_is_dropped_and_said_so(book: ModelBook) -> None:
    spec = parse(TextToImage, {"positivePrompt": "p", "negativePrompt": "blurry", "model": "flux1-schnell"}).job(book)
    assert "negative_prompt" not in spec.params
    assert spec.notes == ["negativePrompt is ignored: FLUX.1 [schnell] takes no negative prompt"]
    kept = parse(TextToImage, {"positivePrompt": "p", "negativePrompt": "blurry", "model": "sdxl"}).job(book)
    assert kept.params["negative_prompt"] == "blurry" and not kept.notes


def test_an_unknown_model_is_refused_naming_it_and_its_closest_ids(book: ModelBook) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse(TextToImage, {"positivePrompt": "p", "model": "flux1-schnel"}).job(book)
    [error] = refused.value.errors
    assert error.field == "model" and "'flux1-schnel'" in error.message and "'flux1-schnell'" in error.message


def test_a_file_an_agent_reports_is_known_with_the_family_it_detected(book: ModelBook) -> None:
    hello = Hello(name="a", instance="i", cpu_only=True, devices=[], capabilities=[], concurrency=1,
                  models=[Model(kind="checkpoints", name="mystery.safetensors", size=1, family="sd35-medium")])

    async def noop(*_: object) -> None:
        return None

    book.sessions.join(hello, noop, noop)
    spec = parse(TextToImage, {"positivePrompt": "p", "model": "mystery.safetensors"}).job(book)
    assert spec.capability == "txt2img-sd3" and spec.params["steps"] == 40 and spec.params["checkpoint"] == "mystery.safetensors"


def test_a_model_of_unknown_family_uses_the_default_family_and_says_so(book: ModelBook) -> None:
    hello = Hello(name="a", instance="i", cpu_only=True, devices=[], capabilities=[], concurrency=1,
                  models=[Model(kind="checkpoints", name="odd.safetensors", size=1)])

    async def noop(*_: object) -> None:
        return None

    book.sessions.join(hello, noop, noop)
    spec = parse(TextToImage, {"positivePrompt": "p", "model": "odd.safetensors"}).job(book)
    assert spec.capability == "txt2img" and spec.params["width"] == 512
    assert spec.notes[0] == "the family of odd.safetensors is not known; Stable Diffusion 1.5 defaults are used"


def test_arguments_may_not_name_the_model_and_are_checked_like_the_agent_checks_them(book: ModelBook) -> None:
    declared = Capability(name="txt2img", model_kind="checkpoints", params={
        "prompt": WorkflowParam(type="string", required=True), "seed": WorkflowParam(type="seed"),
        "steps": WorkflowParam(type="int", min=1, max=150), "checkpoint": WorkflowParam(type="model", kind="checkpoints"),
        "width": WorkflowParam(type="int", min=64, max=2048, step=8), "height": WorkflowParam(type="int", min=64, max=2048, step=8),
        "batch_size": WorkflowParam(type="int", min=1, max=10), "cfg": WorkflowParam(type="float"),
        "sampler": WorkflowParam(type="choice", values=["euler"]), "scheduler": WorkflowParam(type="choice")})
    book.sessions.declared["txt2img"] = declared
    with pytest.raises(InvalidRequest) as refused:
        parse(TextToImage, {"positivePrompt": "p", "arguments": {"checkpoint": "other.safetensors", "steps": "x",
                                                                   "sampler": "dpmpp_2m"}}).job(book)
    assert {(e.field, e.code) for e in refused.value.errors} == {
        ("arguments.checkpoint", "invalid"), ("arguments.steps", "invalid"), ("arguments.sampler", "not_in_list")}
    top = str(2**64 - 1)  # a seed near 2**64 keeps every digit (a float would round it past the limit)
    assert check_args(declared, {"prompt": "p", "seed": top}) == []
    assert check_args(declared, {"prompt": "p" * (TEXT_MAX + 1)})[0].code == "out_of_range"


def test_a_workflow_stays_known_while_its_agents_comfyui_restarts(book: ModelBook) -> None:
    declared = Capability(name="poster", params={"title": WorkflowParam(type="string", required=True)})
    hello = Hello(name="a", instance="i", cpu_only=True, devices=[], models=[], capabilities=[declared], concurrency=1)

    async def noop(*_: object) -> None:
        return None

    session, _ = book.sessions.join(hello, noop, noop)
    book.sessions.heard(session, Heartbeat(devices=[], capabilities=[]))  # ComfyUI down: workflows withdrawn
    assert book.workflows() == {} and book.workflow("poster") == declared


def test_file_names_are_trusted_only_while_no_agent_could_say(book: ModelBook) -> None:
    spec = parse(TextToImage, {"positivePrompt": "p", "model": "later.safetensors"}).job(book)
    assert spec.params["checkpoint"] == "later.safetensors"
    assert "model 'later.safetensors' is not checked: no agent serving checkpoints is connected now" in spec.notes
    assert parse(TextToImage, {"positivePrompt": "p", "model": "sd15.safetensors"}).job(book).model == "sd15.safetensors"
    hello = Hello(name="a", instance="i", cpu_only=True, devices=[], concurrency=1,
                  capabilities=[Capability(name="txt2img", model_kind="checkpoints")],
                  models=[Model(kind="checkpoints", name="sd15.safetensors")])

    async def noop(*_: object) -> None:
        return None

    book.sessions.join(hello, noop, noop)
    with pytest.raises(InvalidRequest):
        parse(TextToImage, {"positivePrompt": "p", "model": "later.safetensors"}).job(book)
