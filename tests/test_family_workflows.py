"""The FLUX.1 and SD 3.5 templates in workflows/, checked against the pinned ComfyUI for real.

No FLUX or SD3.5 weights are available to the tests, so every template is (a) loaded with the
project's own loader, (b) checked node by node against the running ComfyUI's ``/object_info``
(classes, input names, literal values within its limits and lists, links of the right type) and
(c) run end to end on the tiny SD1.5-shaped checkpoint. That last part works because nothing these
templates add is tied to the architecture: EmptySD3LatentImage's 16-channel empty latent is
reshaped by ComfyUI to the model's 4 channels (comfy.sample.fix_empty_latent_channels),
FluxGuidance only sets a ``guidance`` key that an SD1.5 UNet never reads, ConditioningZeroOut
zeroes a tensor of any shape, and ModelSamplingSD3 only swaps the sampling schedule (flow matching)
without touching the weights. The images are noise, but ComfyUI validates, loads, samples,
decodes and saves through exactly the graph a real FLUX/SD3.5 checkpoint would use. (The
inpaint templates run in tests/test_engine.py, beside the generic one.)
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.comfy.engine import ComfyEngine
from agent.comfy.workflows import ParamType, Workflow, load_workflow
from gpugate.settings import PROJECT_ROOT
from tests.conftest import image_of, png
from tests.model_fixtures import CHECKPOINT

WORKFLOWS = PROJECT_ROOT / "workflows"
FAMILIES = ("flux", "sd3")
TEMPLATES = [f"{kind}-{family}" for kind in ("txt2img", "img2img", "inpaint") for family in FAMILIES]

# Parameter names of the generic template each family one derives from, and what each family changes.
GENERIC = {name: set(load_workflow(WORKFLOWS / f"{name}.json").params) for name in ("txt2img", "img2img", "inpaint")}
FAMILY_DEFAULTS = {
    "flux": {"steps": 4, "cfg": 1.0, "sampler": "euler", "scheduler": "simple", "guidance": 3.5},
    "sd3": {"steps": 28, "cfg": 4.5, "sampler": "dpmpp_2m", "scheduler": "sgm_uniform", "shift": 3.0},
}


def _template(name: str) -> Workflow:
    return load_workflow(WORKFLOWS / f"{name}.json")


def _node_classes(workflow: Workflow) -> set[str]:
    return {node["class_type"] for node in workflow.prompt.values()}


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_and_declares_the_generic_params_plus_its_family_knob(name: str) -> None:
    workflow = _template(name)
    kind, family = name.split("-")
    for param, spec in workflow.params.items():  # load_workflow checks this too; say it here by name
        for b in spec.bind:
            assert b.input in workflow.prompt[b.node]["inputs"], f"{param} binds to missing {b}"
            assert not isinstance(workflow.prompt[b.node]["inputs"][b.input], list), f"{param} binds to a link"
    expected = GENERIC[kind] | ({"guidance"} if family == "flux" else {"shift"})
    if family == "flux":
        expected -= {"negative_prompt"}  # FLUX takes no negative prompt
    assert set(workflow.params) == expected
    generic = load_workflow(WORKFLOWS / f"{kind}.json")
    for param in expected & set(generic.params):  # same types and limits as the generic template
        mine, theirs = workflow.params[param], generic.params[param]
        assert (mine.type, mine.min, mine.max, mine.step, mine.required, mine.kind, mine.match_size) == (
            theirs.type, theirs.min, theirs.max, theirs.step, theirs.required, theirs.kind, theirs.match_size), param
    for param, value in FAMILY_DEFAULTS[family].items():
        assert workflow.default(param) == value, param
    assert workflow.default("denoise") == generic.default("denoise")
    assert workflow.vram is not None and workflow.vram.base_gb and workflow.vram.per_megapixel_gb
    assert ("FLUX" if family == "flux" else "Stable Diffusion 3.5") in workflow.description
    if kind == "txt2img":
        assert (workflow.default("width"), workflow.default("height")) == (1024, 1024)
        assert "EmptySD3LatentImage" in _node_classes(workflow)


def test_family_nodes_are_wired_as_their_families_need() -> None:
    for kind in ("txt2img", "img2img", "inpaint"):
        flux = _template(f"{kind}-flux").prompt
        sampler = next(n for n in flux.values() if n["class_type"] == "KSampler")["inputs"]
        positive, negative = flux[sampler["positive"][0]], flux[sampler["negative"][0]]
        assert positive["class_type"] == "FluxGuidance" and negative["class_type"] == "ConditioningZeroOut"
        assert positive["inputs"]["conditioning"] == negative["inputs"]["conditioning"]  # both from the prompt
        assert flux[positive["inputs"]["conditioning"][0]]["class_type"] == "CLIPTextEncode"

        sd3 = _template(f"{kind}-sd3").prompt
        sampler = next(n for n in sd3.values() if n["class_type"] == "KSampler")["inputs"]
        assert sd3[sampler["model"][0]]["class_type"] == "ModelSamplingSD3"
        assert sd3[sd3[sampler["model"][0]]["inputs"]["model"][0]]["class_type"] == "CheckpointLoaderSimple"
        # Everything but the family's nodes is the generic template's graph.
        generic = load_workflow(WORKFLOWS / f"{kind}.json")
        family_nodes = {"FluxGuidance", "ConditioningZeroOut", "ModelSamplingSD3", "EmptySD3LatentImage"}
        for prompt in (flux, sd3):
            assert _node_classes(generic) - {"EmptyLatentImage"} <= {n["class_type"] for n in prompt.values()}
            assert {n["class_type"] for n in prompt.values()} - _node_classes(generic) <= family_nodes


# ---- against the running ComfyUI ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def object_info(engine: ComfyEngine) -> dict[str, Any]:
    return await engine.client.get_json("/object_info")


def _input_specs(info: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    inputs = info.get("input") or {}
    required = inputs.get("required") or {}
    return {**required, **(inputs.get("optional") or {})}, set(required)


def _combo(spec: list[Any]) -> list[Any] | None:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return spec[1].get("options", []) if len(spec) > 1 else []
    return None


@pytest.mark.parametrize("name", TEMPLATES)
async def test_every_node_and_input_is_what_the_pinned_comfyui_takes(name: str, object_info: dict[str, Any]) -> None:
    workflow = _template(name)
    substituted = {(b.node, b.input): spec for spec in workflow.params.values() for b in spec.bind}
    problems = []
    for node_id, node in workflow.prompt.items():
        where = f"{name} node {node_id} ({node['class_type']})"
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"{where}: no such node class")
            continue
        specs, required = _input_specs(info)
        problems += [f"{where}: lacks required input {i!r}" for i in sorted(required - set(node["inputs"]))]
        for input_name, value in node["inputs"].items():
            spec = specs.get(input_name)
            if spec is None:
                problems.append(f"{where}: ComfyUI knows no input {input_name!r}")
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(value, list):  # a link: [node id, output index] of the input's type
                source = workflow.prompt.get(value[0])
                outputs = object_info.get(source["class_type"], {}).get("output", []) if source else []
                if not source or value[1] >= len(outputs):
                    problems.append(f"{where}: {input_name} links to missing output {value}")
                elif outputs[value[1]] != spec[0]:
                    problems.append(f"{where}: {input_name} wants {spec[0]}, gets {outputs[value[1]]} from node {value[0]}")
                continue
            combo = _combo(spec)
            bound = substituted.get((node_id, input_name))
            if combo is not None:
                # Model files and uploaded images are filled in per job; any other literal must be listed.
                if bound is None or bound.type not in (ParamType.MODEL, ParamType.IMAGE):
                    if value not in combo:
                        problems.append(f"{where}: {input_name}={value!r} not among {combo[:10]}")
                continue
            kind = spec[0]
            if kind in ("INT", "FLOAT"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind == "FLOAT" or isinstance(value, int))
                ok = ok and options.get("min", value) <= value <= options.get("max", value)
            else:
                ok = isinstance(value, {"BOOLEAN": bool, "STRING": str}.get(kind, object))
            if not ok:
                problems.append(f"{where}: {input_name}={value!r} is not a valid {kind} {options}")
            if bound is not None and bound.type in (ParamType.INT, ParamType.FLOAT):
                # The declared range must lie within what ComfyUI accepts there.
                if bound.min is not None and "min" in options and bound.min < options["min"]:
                    problems.append(f"{where}: parameter min {bound.min} below ComfyUI's {options['min']}")
                if bound.max is not None and "max" in options and bound.max > options["max"]:
                    problems.append(f"{where}: parameter max {bound.max} above ComfyUI's {options['max']}")
    assert problems == []


async def test_family_defaults_are_in_comfyuis_lists(object_info: dict[str, Any]) -> None:
    samplers = _combo(object_info["KSampler"]["input"]["required"]["sampler_name"])
    schedulers = _combo(object_info["KSampler"]["input"]["required"]["scheduler"])
    for defaults in FAMILY_DEFAULTS.values():
        assert defaults["sampler"] in samplers and defaults["scheduler"] in schedulers


# ---- end to end on the tiny checkpoint ---------------------------------------------------------

FAST = {"steps": 2, "checkpoint": CHECKPOINT}


@pytest.mark.parametrize("family", FAMILIES)
async def test_txt2img_family_runs_end_to_end(engine: ComfyEngine, family: str) -> None:
    knob = {"guidance": 4.0} if family == "flux" else {"shift": 2.5, "negative_prompt": "blurry"}
    outputs = await engine.run(f"txt2img-{family}", {"prompt": "a red fox", "width": 64, "height": 64,
                                                     "batch_size": 2, **knob, **FAST})
    assert [o.kind for o in outputs] == ["images", "images"]
    assert all(image_of(o.data).size == (64, 64) and o.media_type == "image/png" for o in outputs)
    assert all(f"txt2img-{family}" in o.filename for o in outputs)


@pytest.mark.parametrize("family", FAMILIES)
async def test_img2img_family_keeps_the_input_size(engine: ComfyEngine, family: str) -> None:
    outputs = await engine.run(f"img2img-{family}", {"image": png(80, 64), "prompt": "oil painting", **FAST})
    assert [image_of(o.data).size for o in outputs] == [(80, 64)]

