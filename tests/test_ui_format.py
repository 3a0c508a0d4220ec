"""UI-format workflows (the web UI's "Save") converted to API format with the real ComfyUI's node definitions."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from agent.comfy.engine import ComfyEngine
from agent.comfy.ui_format import UiFormatError, is_ui_format, to_api_format
from gpugate.settings import PROJECT_ROOT
from tests.conftest import TESTS

UI = json.loads((TESTS / "workflows" / "txt2img_ui.json").read_text())
API = json.loads((PROJECT_ROOT / "workflows" / "txt2img.json").read_text())


@pytest.fixture(scope="module")
async def object_info(engine: ComfyEngine) -> dict[str, Any]:
    assert engine.client is not None
    info: dict[str, Any] = await engine.client.get_json("/object_info")
    return info


def node(ui: dict[str, Any], node_id: int) -> dict[str, Any]:
    return next(n for n in ui["nodes"] if n["id"] == node_id)


def add_node(ui: dict[str, Any], node_id: int, type_: str, *, mode: int = 0, inputs: list[dict[str, Any]] | None = None,
             outputs: list[dict[str, Any]] | None = None, widgets_values: list[Any] | None = None) -> None:
    ui["nodes"].append({"id": node_id, "type": type_, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0,
                        "mode": mode, "inputs": inputs or [], "outputs": outputs or [], "properties": {},
                        "widgets_values": widgets_values or []})


def relink(ui: dict[str, Any], link_id: int, origin: int, origin_slot: int, target: int, target_slot: int,
           type_: str) -> None:
    """Point link ``link_id`` (new or existing) from origin to target, and the target's input at it."""
    ui["links"] = [link for link in ui["links"] if link[0] != link_id]
    ui["links"].append([link_id, origin, origin_slot, target, target_slot, type_])
    node(ui, target)["inputs"][target_slot]["link"] = link_id


def test_the_ui_export_of_txt2img_converts_to_its_api_format(object_info: dict[str, Any]) -> None:
    assert is_ui_format(UI) and not is_ui_format(API)
    assert to_api_format(UI, object_info) == API


def test_a_muted_node_is_left_out(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    add_node(ui, 12, "PreviewImage", mode=2, inputs=[{"name": "images", "type": "IMAGE", "link": None}])
    relink(ui, 11, 8, 0, 12, 0, "IMAGE")
    assert to_api_format(ui, object_info) == API


def test_an_input_from_a_muted_node_is_refused_when_required(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    node(ui, 5)["mode"] = 2
    with pytest.raises(UiFormatError, match=r"^node 3 \(KSampler\): required input 'latent_image' comes from "
                                            r"node 5 \(EmptyLatentImage\), which is muted$"):
        to_api_format(ui, object_info)


def test_a_bypassed_node_passes_its_inputs_through(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    add_node(ui, 12, "LoraLoader", mode=4, widgets_values=["missing.safetensors", 1, 1],
             inputs=[{"name": "model", "type": "MODEL", "link": None}, {"name": "clip", "type": "CLIP", "link": None}],
             outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}, {"name": "CLIP", "type": "CLIP", "links": [3, 5]}])
    relink(ui, 11, 4, 0, 12, 0, "MODEL")
    relink(ui, 12, 4, 1, 12, 1, "CLIP")
    relink(ui, 1, 12, 0, 3, 0, "MODEL")
    relink(ui, 3, 12, 1, 6, 0, "CLIP")
    relink(ui, 5, 12, 1, 7, 0, "CLIP")
    assert to_api_format(ui, object_info) == API


def test_a_bypassed_node_without_an_input_of_the_wanted_type_is_refused(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    node(ui, 5)["mode"] = 4
    with pytest.raises(UiFormatError, match=r"required input 'latent_image' comes from bypassed node 5 "
                                            r"\(EmptyLatentImage\), which has no LATENT input to pass on"):
        to_api_format(ui, object_info)


def test_a_primitive_node_sets_the_widget_it_feeds(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    add_node(ui, 12, "PrimitiveNode", widgets_values=[1234, "fixed"],
             outputs=[{"name": "INT", "type": "INT", "links": [11], "widget": {"name": "seed"}}])
    relink(ui, 11, 12, 0, 3, 4, "INT")  # KSampler's seed widget, converted to an input
    prompt = to_api_format(ui, object_info)
    assert prompt["3"]["inputs"]["seed"] == 1234
    assert prompt == {**API, "3": {**API["3"], "inputs": {**API["3"]["inputs"], "seed": 1234}}}


def test_a_widget_converted_to_an_input_takes_the_link(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    add_node(ui, 12, "PrimitiveInt", widgets_values=[77, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [11]}])
    relink(ui, 11, 12, 0, 3, 5, "INT")  # KSampler's steps
    prompt = to_api_format(ui, object_info)
    assert prompt["12"] == {"class_type": "PrimitiveInt", "inputs": {"value": 77}}
    assert prompt["3"]["inputs"]["steps"] == ["12", 0] and prompt["3"]["inputs"]["cfg"] == 7


def test_an_unknown_node_type_is_refused_naming_the_node(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    add_node(ui, 12, "FooNode", inputs=[{"name": "image", "type": "IMAGE", "link": None}])
    relink(ui, 11, 8, 0, 12, 0, "IMAGE")
    with pytest.raises(UiFormatError, match=r"^node 12 \(FooNode\): not installed in this ComfyUI$"):
        to_api_format(ui, object_info)


def test_every_problem_is_named_at_once(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    node(ui, 3)["inputs"][0]["link"] = None  # KSampler's model
    node(ui, 5)["widgets_values"] = [512, 512]
    node(ui, 8)["inputs"][0]["link"] = 99
    node(ui, 9)["type"] = "FooSave"
    with pytest.raises(UiFormatError) as err:
        to_api_format(ui, object_info)
    assert err.value.problems == [
        "node 5 (EmptyLatentImage): widgets_values has 2 values, expected 3 (width, height, batch_size)",
        "node 3 (KSampler): required input 'model' is not connected",
        "node 8 (VAEDecode): input 'samples' has link 99, which is not in the links list",
        "node 9 (FooSave): not installed in this ComfyUI",
    ]
    assert str(err.value) == "; ".join(err.value.problems)


def test_a_link_from_a_missing_node_is_refused(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    relink(ui, 7, 42, 0, 8, 0, "LATENT")
    with pytest.raises(UiFormatError, match=r"^node 8 \(VAEDecode\): input 'samples' is linked to node 42, "
                                            r"which is not in the workflow$"):
        to_api_format(ui, object_info)


def test_widget_values_keyed_by_name_and_the_seed_control_value(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    node(ui, 5)["widgets_values"] = {"width": 64, "height": 96, "batch_size": 2}
    node(ui, 3)["widgets_values"] = [5, "fixed", 3, 2.5, "ddim", "karras", 0.5, "ignored extra"]
    prompt = to_api_format(ui, object_info)
    assert prompt["5"]["inputs"] == {"width": 64, "height": 96, "batch_size": 2}
    assert {k: v for k, v in prompt["3"]["inputs"].items() if not isinstance(v, list)} == {
        "seed": 5, "steps": 3, "cfg": 2.5, "sampler_name": "ddim", "scheduler": "karras", "denoise": 0.5}


def test_a_node_saved_without_widget_values_keeps_the_defaults(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    del node(ui, 9)["widgets_values"]  # as in ComfyUI's default graph
    assert to_api_format(ui, object_info)["9"]["inputs"] == {"filename_prefix": "ComfyUI", "images": ["8", 0]}


@pytest.mark.parametrize("widgets_values", [[5, "fixed", "b"], [5, "fixed", "b", "from before frontend 1.16"]])
def test_a_seed_control_value_and_a_force_input_value_are_skipped(object_info: dict[str, Any], widgets_values: list[Any]) -> None:
    custom = {"input": {"required": {"seed": ["INT", {}], "mode": [["a", "b"]]},
                        "optional": {"text": ["STRING", {"forceInput": True}]}},
              "input_order": {"required": ["seed", "mode"], "optional": ["text"]}}
    ui: dict[str, Any] = {"nodes": [], "links": []}
    add_node(ui, 1, "CustomSeeded", widgets_values=widgets_values)
    assert to_api_format(ui, {**object_info, "CustomSeeded": custom}) == {
        "1": {"class_type": "CustomSeeded", "inputs": {"seed": 5, "mode": "b"}}}


def test_an_upload_combo_has_a_frontend_only_value_after_it(object_info: dict[str, Any]) -> None:
    ui: dict[str, Any] = {"nodes": [], "links": []}
    add_node(ui, 1, "LoadImage", widgets_values=["example.png", "image"],
             outputs=[{"name": "IMAGE", "type": "IMAGE", "links": []}, {"name": "MASK", "type": "MASK", "links": []}])
    assert to_api_format(ui, object_info) == {"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}


def test_subgraphs_are_refused_with_a_way_out(object_info: dict[str, Any]) -> None:
    ui = copy.deepcopy(UI)
    subgraph = "a3f2c0de-0000-4000-8000-000000000001"
    ui["definitions"] = {"subgraphs": [{"id": subgraph, "name": "Upscale", "nodes": [], "links": []}]}
    add_node(ui, 12, subgraph)
    with pytest.raises(UiFormatError, match=r"^node 12 \(a3f2c0de-[0-9a-f-]+\): a subgraph \('Upscale'\), "
                                            r"which is not supported; unpack it in ComfyUI"):
        to_api_format(ui, object_info)


def test_not_ui_format_is_refused(object_info: dict[str, Any]) -> None:
    with pytest.raises(UiFormatError, match="not a UI-format workflow"):
        to_api_format(API, object_info)
