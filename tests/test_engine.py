"""The agent's engine against a real ComfyUI subprocess on the CPU, with tiny real models."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from PIL import ImageChops, ImageDraw

from agent.comfy.engine import ComfyEngine
from gpugate.errors import ExecutionError, Interrupted, InvalidRequest, JobTimeout, OutOfMemory
from tests.conftest import TESTS, image_of, png
from tests.model_fixtures import CHECKPOINT, UPSCALER

FAST = {"steps": 2, "checkpoint": CHECKPOINT}


async def test_txt2img_makes_a_batch_of_the_requested_size(engine: ComfyEngine) -> None:
    seen = []
    outputs = await engine.run("txt2img", {"prompt": "a red fox", "width": 96, "height": 64, "batch_size": 3, **FAST},
                               on_progress=seen.append)
    assert [o.kind for o in outputs] == ["images"] * 3
    assert all(image_of(o.data).size == (96, 64) and o.media_type == "image/png" for o in outputs)
    steps = [(p.step, p.total) for p in seen if p.node_type == "KSampler" and p.total]
    assert steps[-1] == (2, 2)
    assert {"CheckpointLoaderSimple", "VAEDecode", "SaveImage"} <= {p.node_type for p in seen}


async def test_img2img_keeps_the_input_size(engine: ComfyEngine) -> None:
    outputs = await engine.run("img2img", {"image": png(80, 64), "prompt": "oil painting", "batch_size": 2, **FAST})
    assert [image_of(o.data).size for o in outputs] == [(80, 64), (80, 64)]


@pytest.mark.parametrize("workflow", ["inpaint", "inpaint-flux", "inpaint-sd3"])  # each family's inpaint
async def test_inpaint_changes_only_the_masked_area(engine: ComfyEngine, workflow: str) -> None:
    original = png(64, 64, (20, 120, 220))
    mask = image_of(png(64, 64, (0, 0, 0)))
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=(255, 255, 255))
    mask_bytes = _encode(mask)
    [output] = await engine.run(workflow, {"image": original, "mask": mask_bytes, "prompt": "a hole", **FAST})
    result = image_of(output.data).convert("RGB")
    assert result.size == (64, 64)
    diff = ImageChops.difference(result, image_of(original).convert("RGB"))
    outside = diff.copy()
    ImageDraw.Draw(outside).rectangle((16, 16, 47, 47), fill=(0, 0, 0))
    assert outside.getbbox() is None, "pixels outside the mask changed"
    assert diff.crop((16, 16, 48, 48)).getbbox() is not None, "the masked area did not change"


async def test_upscale_doubles_the_size(engine: ComfyEngine) -> None:
    [output] = await engine.run("upscale", {"image": png(40, 24), "model": UPSCALER})
    assert image_of(output.data).size == (80, 48)


async def test_outputs_other_than_images_are_fetched(engine: ComfyEngine) -> None:
    [output] = await engine.run("latent", {})
    assert output.kind == "latents" and output.filename.endswith(".latent")
    assert output.data[:8] and len(output.data) > 100  # a safetensors file with the latent tensor


async def test_comfyui_is_left_clean_after_jobs(engine: ComfyEngine, settings) -> None:
    await engine.run("img2img", {"image": png(64, 64), **FAST})
    with pytest.raises(ExecutionError):
        await engine.run("fail", {"error": "runtime"})
    await engine.settle()
    assert await engine.client.get_json("/history") == {}
    state = settings.comfy_state_dir
    assert list((state / "output").iterdir()) == []
    assert [p.name for p in (state / "input").iterdir() if p.name != "3d"] == []


@pytest.mark.parametrize("params, field, words", [
    ({"prompt": "x", "width": 4000}, "width", "between 64 and 2048"),
    ({"prompt": "x", "width": 100}, "width", "multiple of 8"),
    ({"prompt": "x", "steps": "many"}, "steps", "integer"),
    ({"prompt": "x", "sampler": "warp_drive"}, "sampler", "must be one of"),
    ({"prompt": "x", "colour": "red"}, "colour", "unknown parameter"),
    ({"width": 64}, "prompt", "required"),
    ({"prompt": "x", "checkpoint": "missing.safetensors"}, "checkpoint", "'missing.safetensors' is not installed"),
])
async def test_bad_parameters_are_refused_by_name_before_comfyui(engine: ComfyEngine, params, field, words) -> None:
    with pytest.raises(InvalidRequest) as info:
        await engine.run("txt2img", {"checkpoint": CHECKPOINT, **params})
    assert [e.field for e in info.value.errors] == [field]
    assert words in info.value.message


async def test_a_file_that_is_not_an_image_is_refused(engine: ComfyEngine) -> None:
    with pytest.raises(InvalidRequest, match="image: is not an image"):
        await engine.run("upscale", {"image": b"just some text, not a PNG", "model": UPSCALER})
    with pytest.raises(InvalidRequest, match=r"mask: must be the same size as image \(64x64\), got 32x32"):
        await engine.run("inpaint", {"image": png(64, 64), "mask": png(32, 32)})


async def test_a_workflow_naming_a_missing_checkpoint_fails_as_invalid_and_names_it(engine: ComfyEngine) -> None:
    # The checkpoint is written into the template, not a parameter: ComfyUI's own validation refuses it.
    with pytest.raises(InvalidRequest) as info:
        await engine.run("missing_checkpoint", {})
    assert info.value.errors[0].field == "4.ckpt_name"
    assert "no-such-model.safetensors" in info.value.message


async def test_a_partly_valid_workflow_is_refused_and_its_valid_half_does_not_linger(engine: ComfyEngine, settings) -> None:
    # ComfyUI answers 200 with node_errors and queues the half that validated; we take it back.
    with pytest.raises(InvalidRequest) as info:
        await engine.run("partly_invalid", {}, job_id="partly-invalid")
    assert info.value.errors[0].field == "4.ckpt_name" and "no-such-model.safetensors" in info.value.message
    await engine.settle()
    assert await engine.client.get_json("/history") == {}
    assert await engine.client.get_json("/queue") == {"queue_running": [], "queue_pending": []}
    assert not (settings.comfy_state_dir / "output" / "partly-invalid").exists()


async def test_execution_errors_are_classified(engine: ComfyEngine) -> None:
    with pytest.raises(OutOfMemory, match="out of memory in node 2 \\(GpugateTestFail\\)"):
        await engine.run("fail", {"error": "out_of_memory"})
    with pytest.raises(ExecutionError) as info:
        await engine.run("fail", {"error": "runtime"})
    assert (info.value.node_id, info.value.node_type) == ("2", "GpugateTestFail")
    assert "RuntimeError: deliberate failure" in info.value.message


async def test_a_running_prompt_can_be_interrupted_by_id(engine: ComfyEngine) -> None:
    started = asyncio.Event()
    job = asyncio.create_task(engine.run(
        "txt2img", {"prompt": "long", "steps": 150, "width": 256, "height": 256, "checkpoint": CHECKPOINT},
        job_id="interrupt-me", on_progress=lambda p: p.step and started.set()))
    await asyncio.wait_for(started.wait(), 60)
    await engine.interrupt("interrupt-me")
    with pytest.raises(Interrupted):
        await asyncio.wait_for(job, 60)
    assert (await engine.run("blank", {}))[0].kind == "images"  # and ComfyUI carries on


async def test_a_job_past_its_time_limit_is_interrupted(engine: ComfyEngine, settings, monkeypatch) -> None:
    monkeypatch.setattr(engine, "settings", settings.model_copy(update={"comfy": settings.comfy.model_copy(update={"job_timeout_s": 1.0})}))
    with pytest.raises(JobTimeout, match="still running after 1s"):
        await engine.run("txt2img", {"prompt": "slow", "steps": 150, "width": 256, "height": 256, "checkpoint": CHECKPOINT})
    assert await engine.client.get_json("/queue") == {"queue_running": [], "queue_pending": []}


async def test_a_workflow_dropped_into_a_folder_runs_by_name(engine: ComfyEngine, drop_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match="no workflow named 'my_blank'"):
        await engine.run("my_blank", {})
    shutil.copy(TESTS / "workflows" / "blank.json", drop_dir / "my_blank.json")
    (drop_dir / "my_blank.toml").write_text('[params.size]\ntype = "int"\nmax = 256\nbind = ["1.width", "1.height"]\n')
    [output] = await engine.run("my_blank", {"size": 48})
    assert image_of(output.data).size == (48, 48)


async def test_models_are_listed_by_kind(engine: ComfyEngine, models_dir: Path) -> None:
    models = {(m.kind, m.name): m.size for m in await engine.models()}
    assert models == {
        ("checkpoints", CHECKPOINT): (models_dir / "checkpoints" / CHECKPOINT).stat().st_size,
        ("upscale_models", UPSCALER): (models_dir / "upscale_models" / UPSCALER).stat().st_size,
    }


async def test_attach_mode_drives_a_running_comfyui(engine: ComfyEngine, settings) -> None:
    attached = settings.model_copy(update={"comfy": settings.comfy.model_copy(update={"mode": "attach", "url": engine.url})})
    async with ComfyEngine(attached) as other:
        assert other.process is None
        [output] = await other.run("blank", {"width": 32})
    assert image_of(output.data).size == (32, 64)


def _encode(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


async def test_a_text_a_node_shows_comes_back_as_a_text_not_a_file(engine: ComfyEngine) -> None:
    from agent.runners.comfy import ComfyRunner

    outputs = await engine.run("caption", {"subject": "fox cub"})
    assert list(outputs) == [] and outputs.texts == ["a red fox cub"]
    result = await ComfyRunner(engine).run("caption", "caption-job", {"subject": "owl"}, lambda p: None)
    assert result.files == [] and result.texts == ["a red owl"]  # what the agent answers (Done.texts)
