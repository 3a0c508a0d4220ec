"""Workflow templates: loading, validation and rendering are pure and tested without ComfyUI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.comfy.workflows import (
    ImageInput,
    WorkflowDefinitionError,
    WorkflowLibrary,
    load_workflow,
    render,
    validate,
)
from gpugate.errors import InvalidRequest
from gpugate.settings import PROJECT_ROOT
from tests.conftest import png

WORKFLOWS = PROJECT_ROOT / "workflows"
SAMPLERS = {("KSampler", "sampler_name"): ["euler", "dpmpp_2m"], ("KSampler", "scheduler"): ["normal", "karras"],
            ("CheckpointLoaderSimple", "ckpt_name"): ["a.safetensors", "b.safetensors"]}


def combos(node: str, name: str):
    return SAMPLERS.get((node, name))


@pytest.mark.parametrize("name", ["txt2img", "img2img", "inpaint", "upscale"])
def test_the_shipped_workflows_load(name: str) -> None:
    wf = load_workflow(WORKFLOWS / f"{name}.json")
    assert wf.params and wf.description


def test_defaults_come_from_the_template_and_seeds_are_drawn() -> None:
    wf = load_workflow(WORKFLOWS / "txt2img.json")
    values = validate(wf, {"prompt": "a cat", "checkpoint": "a.safetensors"}, combos)
    assert (values["width"], values["steps"], values["sampler"], values["cfg"]) == (512, 20, "euler", 7.0)
    assert 0 <= values["seed"] < 2**53
    assert values["seed"] != validate(wf, {"prompt": "a cat", "checkpoint": "a.safetensors"}, combos)["seed"]


def test_strings_from_a_command_line_are_converted() -> None:
    wf = load_workflow(WORKFLOWS / "txt2img.json")
    values = validate(wf, {"prompt": "x", "width": "64", "cfg": "4.5", "seed": "7", "checkpoint": "b.safetensors"}, combos)
    assert (values["width"], values["cfg"], values["seed"]) == (64, 4.5, 7)


def test_every_bad_field_is_reported_at_once() -> None:
    wf = load_workflow(WORKFLOWS / "txt2img.json")
    with pytest.raises(InvalidRequest) as info:
        validate(wf, {"width": 7, "height": True, "seed": -1, "checkpoint": "c.safetensors", "denoise": 2}, combos)
    assert {e.field: e.code for e in info.value.errors} == {
        "prompt": "required", "width": "out_of_range", "height": "invalid", "seed": "out_of_range",
        "checkpoint": "not_installed", "denoise": "out_of_range"}
    assert "checkpoint: 'c.safetensors' is not installed; installed: a.safetensors, b.safetensors" in info.value.message


def test_images_are_checked_from_their_header() -> None:
    wf = load_workflow(WORKFLOWS / "upscale.json")
    values = validate(wf, {"image": png(30, 20)}, lambda n, i: None)
    assert isinstance(values["image"], ImageInput) and (values["image"].width, values["image"].height) == (30, 20)
    for bad, words in ((b"", "empty file"), (b"GIF89a-but-not-really", "not an image"), ("a path", "must be an image file")):
        with pytest.raises(InvalidRequest, match=words):
            validate(wf, {"image": bad}, lambda n, i: None)


def test_render_binds_values_and_gives_each_job_its_own_output_folder() -> None:
    wf = load_workflow(WORKFLOWS / "img2img.json")
    values = validate(wf, {"image": png(8, 8), "prompt": "p", "batch_size": 3, "seed": 5}, lambda n, i: None)
    prompt = render(wf, values, {"image": "job-1/image.png"}, "job-1")
    assert prompt["10"]["inputs"]["image"] == "job-1/image.png"
    assert (prompt["12"]["inputs"]["amount"], prompt["3"]["inputs"]["seed"], prompt["6"]["inputs"]["text"]) == (3, 5, "p")
    assert prompt["9"]["inputs"]["filename_prefix"] == "job-1/img2img"
    assert wf.prompt["9"]["inputs"]["filename_prefix"] == "img2img", "the template itself is untouched"
    with pytest.raises(ValueError, match="job id"):
        render(wf, values, {"image": "x.png"}, "../escape")


def test_broken_definitions_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "ui.json").write_text(json.dumps({"nodes": [], "links": []}))
    (tmp_path / "bad_bind.json").write_text(json.dumps({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}))
    (tmp_path / "bad_bind.toml").write_text('[params.height]\ntype = "int"\nbind = "1.height"\n')
    (tmp_path / "bad_type.json").write_text(json.dumps({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}))
    (tmp_path / "bad_type.toml").write_text('[params.width]\ntype = "integer"\nbind = "1.width"\n')
    (tmp_path / "reserved.json").write_text(json.dumps({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}))
    (tmp_path / "reserved.toml").write_text('[params.Tag]\ntype = "int"\nbind = "1.width"\n')  # the API's own field
    for name, words in (("ui", "UI format, converted once ComfyUI is up"), ("bad_bind", "binds to 1.height, which the workflow lacks"),
                        ("bad_type", "type"), ("reserved", "'Tag' is a name the router's API uses itself")):
        with pytest.raises(WorkflowDefinitionError, match=words):
            load_workflow(tmp_path / f"{name}.json")
    workflows, problems = WorkflowLibrary([tmp_path]).scan()
    assert workflows == [] and len(problems) == 4


def test_a_later_folder_replaces_a_workflow_and_edits_are_picked_up(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (first / "w.json").write_text(json.dumps({"1": {"class_type": "A", "inputs": {}}}))
    library = WorkflowLibrary([first, second])
    assert library.get("w").prompt["1"]["class_type"] == "A"
    (second / "w.json").write_text(json.dumps({"1": {"class_type": "B", "inputs": {}}}))
    assert library.get("w").prompt["1"]["class_type"] == "B"
