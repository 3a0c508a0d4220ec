"""Model-family detection from safetensors headers, on sparse files with the real names and shapes."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import pytest

from gpugate import families
from gpugate.families import Family, FamilyCache, classify_header, detect, read_header
from tests import safetensors_headers as st
from tests.model_fixtures import CHECKPOINT as CHECKPOINT_FILE
from tests.safetensors_headers import BARE, CHECKPOINT, Tensors, write_sparse

GIB = 2**30
MIB = 2**20

CASES: dict[str, tuple[Callable[[], Tensors], Family]] = {
    "v1-5-pruned-emaonly.safetensors": (st.sd15, Family.SD15),
    "v2-1_768-ema-pruned.safetensors": (st.sd2, Family.SD2),
    "sd_xl_base_1.0.safetensors": (st.sdxl, Family.SDXL),
    "flux1-dev-fp8.safetensors": (lambda: st.flux1(dev=True, prefix=CHECKPOINT, dtype="F8_E4M3"), Family.FLUX1_DEV),
    "flux1-schnell-fp8.safetensors": (
        lambda: st.flux1(dev=False, prefix=CHECKPOINT, dtype="F8_E4M3"),
        Family.FLUX1_SCHNELL,
    ),
    "flux1-dev.safetensors": (lambda: st.flux1(dev=True), Family.FLUX1_DEV),
    "flux1-schnell.sft": (lambda: st.flux1(dev=False), Family.FLUX1_SCHNELL),
    "sd3.5_medium.safetensors": (lambda: st.sd35(large=False), Family.SD35_MEDIUM),
    "sd3.5_large.safetensors": (lambda: st.sd35(large=True), Family.SD35_LARGE),
    "sd3.5_large_turbo.safetensors": (lambda: st.sd35(large=True), Family.SD35_LARGE_TURBO),
    "sd3.5_medium_fp8_scaled.safetensors": (
        lambda: st.sd35(large=False, prefix=CHECKPOINT, dtype="F16"),
        Family.SD35_MEDIUM,
    ),
    "sd3.5_large_fp8_scaled.safetensors": (
        lambda: st.sd35(large=True, prefix=CHECKPOINT, dtype="F16"),
        Family.SD35_LARGE,
    ),
    "sdxl_unet.safetensors": (lambda: st.sdxl(prefix=BARE), Family.SDXL),
    "sd15_unet.safetensors": (lambda: st.sd15(prefix=BARE), Family.SD15),
    "sdxl_lightning_4step_unet.safetensors": (st.sdxl_diffusers_unet, Family.SDXL_LIGHTNING),
}


def make(tmp_path: Path, name: str, tensors: Tensors, metadata: dict[str, str] | None = None) -> Path:
    path = tmp_path / name
    write_sparse(path, tensors, metadata)
    return path


@pytest.mark.parametrize("name", CASES)
def test_each_family_is_detected(tmp_path: Path, name: str) -> None:
    build, family = CASES[name]
    assert detect(make(tmp_path, name, build())) is family


@pytest.mark.parametrize(
    ("name", "metadata", "family"),
    [
        ("sdxl_lightning_4step.safetensors", None, Family.SDXL_LIGHTNING),
        ("juggernautXL_v9Rdphoto2Lightning.safetensors", None, Family.SDXL_LIGHTNING),
        ("Hyper-SDXL-8steps.safetensors", None, Family.SDXL_LIGHTNING),
        ("dreamshaperXL_v21TurboDPMSDE.safetensors", None, Family.SDXL_TURBO),
        ("model.safetensors", {"modelspec.title": "SDXL-Turbo"}, Family.SDXL_TURBO),
        ("model.safetensors", {"modelspec.description": "A Lightning distillation of SDXL"}, Family.SDXL_LIGHTNING),
        # metadata wins over the file name
        ("sdxl_turbo.safetensors", {"modelspec.title": "SDXL Lightning 8-step"}, Family.SDXL_LIGHTNING),
        # words about the training data or images are not about the model
        ("epicHyperrealism.safetensors", {"ss_tag_frequency": '{"turbo car": 3}'}, Family.SDXL),
        ("model.safetensors", {"modelspec.title": "HyperDetail XL", "format": "pt"}, Family.SDXL),
    ],
)
def test_sdxl_few_step_variants(tmp_path: Path, name: str, metadata: dict[str, str] | None, family: Family) -> None:
    assert detect(make(tmp_path, name, st.sdxl(), metadata)) is family


def test_few_step_words_only_refine_families_that_have_variants(tmp_path: Path) -> None:
    assert detect(make(tmp_path, "sd15_turbo.safetensors", st.sd15())) is Family.SD15
    assert detect(make(tmp_path, "flux1-turbo.safetensors", st.flux1(dev=True))) is Family.FLUX1_DEV
    meta = {"modelspec.title": "Stable Diffusion 3.5 Large Turbo"}
    assert detect(make(tmp_path, "large.safetensors", st.sd35(large=True), meta)) is Family.SD35_LARGE_TURBO


def test_files_are_gigabytes_on_paper_and_nothing_on_disk(tmp_path: Path) -> None:
    sizes = {}
    for name, (build, _) in CASES.items():
        stat = os.stat(make(tmp_path, name, build()))
        assert stat.st_blocks * 512 < MIB, name
        sizes[name] = stat.st_size
    assert sizes["flux1-dev.safetensors"] > 22 * GIB  # 11.9B parameters in bf16
    assert sizes["sd3.5_large.safetensors"] > 15 * GIB  # 8.1B
    assert sizes["sd_xl_base_1.0.safetensors"] > 5 * GIB  # a 2.6B UNet plus both CLIPs in fp16
    assert sizes["v1-5-pruned-emaonly.safetensors"] > 1.5 * GIB
    assert min(sizes.values()) > GIB


def test_sparse_files_are_valid_for_the_safetensors_library(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    path = make(tmp_path, "sd_xl_base_1.0.safetensors", st.sdxl(), {"modelspec.title": "SDXL 1.0"})
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"modelspec.title": "SDXL 1.0"}
        to_k = f.get_slice("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
        assert to_k.get_shape() == [640, 2048]
        assert len(f.keys()) == len(st.sdxl())


def test_detection_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make(tmp_path, "flux1-dev.safetensors", st.flux1(dev=True))
    read = counting_open(monkeypatch)
    started = time.perf_counter()
    assert detect(path) is Family.FLUX1_DEV
    assert time.perf_counter() - started < 1.0
    assert read == [st.header_size(path)]
    assert st.header_size(path) < MIB < os.stat(path).st_size


def counting_open(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make gpugate.families count the bytes it reads from each file it opens."""
    totals: list[int] = []

    class Counting:
        def __init__(self, path: str | os.PathLike[str], mode: str = "r") -> None:
            assert mode == "rb"
            self._f = open(path, mode)  # noqa: SIM115 - closed by __exit__
            totals.append(0)

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

        def fileno(self) -> int:
            return self._f.fileno()

        def read(self, n: int = -1) -> bytes:
            data: bytes = self._f.read(n)
            totals[-1] += len(data)
            return data

    monkeypatch.setattr(families, "open", Counting, raising=False)
    return totals


def test_bare_and_checkpoint_layouts_agree() -> None:
    for build in (st.sd15, st.sd2, st.sdxl, lambda p: st.flux1(True, p), lambda p: st.sd35(False, p)):
        bare = {name: {"shape": shape} for name, (_, shape) in build(BARE).items()}
        full = {name: {"shape": shape} for name, (_, shape) in build(CHECKPOINT).items()}
        assert classify_header(bare) is classify_header(full) is not None


def test_other_models_are_not_a_family(tmp_path: Path) -> None:
    others: dict[str, Tensors] = {
        "control_v11p_sd15_canny.safetensors": st.sd15_controlnet(),
        "sd_xl_refiner_1.0.safetensors": st.sdxl_refiner(),
        "sd-v1-5-inpainting.safetensors": st.sd15(in_channels=9),
        "pixel-art-xl.safetensors": st.sdxl_lora(),
        "RealESRGAN_x4plus.safetensors": st.esrgan_upscaler(),
        "sd3_medium.safetensors": {k: v for k, v in st.sd35(large=False).items() if ".attn2." not in k},
        "empty.safetensors": {},
    }
    for name, tensors in others.items():
        assert detect(make(tmp_path, name, tensors)) is None, name


def test_flux_fill_and_chroma_are_not_flux1(tmp_path: Path) -> None:
    fill = st.flux1(dev=True)
    fill["img_in.weight"] = ("BF16", [3072, 384])
    chroma = {k: v for k, v in st.flux1(dev=False).items() if not k.startswith("vector_in.")}
    assert detect(make(tmp_path, "flux1-fill-dev.safetensors", fill)) is None
    assert detect(make(tmp_path, "chroma.safetensors", chroma)) is None


def test_broken_and_foreign_files_are_none(tmp_path: Path) -> None:
    whole = make(tmp_path, "whole.safetensors", st.sdxl())
    with open(whole, "rb") as f:
        start = f.read(st.header_size(whole) + 4096)  # not the whole file: it is 5 GB of zeros
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(start)  # a download cut short
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(start[:1000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x02\x00")
    for path in (truncated, cut_header, garbage, tiny, tmp_path / "missing.safetensors", tmp_path):
        assert detect(path) is None, path
        with pytest.raises((ValueError, OSError)):
            read_header(path)


def test_other_suffixes_are_none_without_being_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = counting_open(monkeypatch)
    for name in ("model.pth", "v1-5-pruned.ckpt", "model.pt", "flux1-dev-Q8_0.gguf"):
        write_sparse(tmp_path / name, st.sd15())  # a valid header behind the wrong suffix
        assert detect(tmp_path / name) is None
    assert opened == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (b"\x01\x02\x03", "too short"),
        (struct.pack("<Q", 1) + b"{", "too small"),
        (struct.pack("<Q", 2**40) + b"{}", "exceeds limit"),
        (struct.pack("<Q", 64) + b"{}", "past the end"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8 JSON"),
        (struct.pack("<Q", 6) + b"{nope}", "not UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
        (struct.pack("<Q", 8) + b'{"a": 1}', "entry is not an object"),
        (struct.pack("<Q", 22) + b'{"__metadata__": "x"} ', "__metadata__ is not an object"),
    ],
)
def test_read_header_rejects_what_is_not_safetensors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_header(path)
    assert detect(path) is None


def test_read_header_rejects_bad_tensor_entries(tmp_path: Path) -> None:
    path = make(tmp_path, "ok.safetensors", {"w": ("F16", [2, 2])})
    assert read_header(path)["w"] == {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}
    with open(path, "r+b") as f:
        f.truncate(os.stat(path).st_size - 1)
    with pytest.raises(ValueError, match="truncated"):
        read_header(path)


def test_read_header_limit(tmp_path: Path) -> None:
    path = make(tmp_path, "sd15.safetensors", st.sd15(), {"modelspec.title": "x"})
    header = read_header(path)
    assert header["__metadata__"] == {"modelspec.title": "x"}
    assert header["model.diffusion_model.input_blocks.0.0.weight"]["shape"] == [320, 4, 3, 3]
    with pytest.raises(ValueError, match="exceeds limit"):
        read_header(path, limit=1024)


def test_the_tiny_real_checkpoint_is_sd15(fixture_models: Path) -> None:
    """The suite's tiny SD1.5 checkpoint, written by torch and safetensors, not by write_sparse."""
    assert detect(fixture_models / CHECKPOINT_FILE) is Family.SD15


def test_family_values() -> None:
    assert [f.value for f in Family] == [
        "sd15", "sd2", "sdxl", "sdxl-lightning", "sdxl-turbo", "flux1-schnell", "flux1-dev",
        "sd35-medium", "sd35-large", "sd35-large-turbo",
    ]  # fmt: skip
    assert Family("sdxl-turbo") is Family.SDXL_TURBO and f"{Family.FLUX1_DEV}" == "flux1-dev"


class CountingDetector:
    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> Family | None:
        self.calls.append(path)
        return detect(path)


def test_family_cache_remembers_until_the_file_changes(tmp_path: Path) -> None:
    detector = CountingDetector()
    cache = FamilyCache(detector)
    path = make(tmp_path, "model.safetensors", st.sd15())
    assert cache.family(path) is Family.SD15
    assert cache.family(path) is Family.SD15
    assert cache.family(str(path)) is Family.SD15  # type: ignore[arg-type]  # str paths share the entry
    assert detector.calls == [path]

    write_sparse(path, st.sdxl())  # replaced in place: new size and mtime
    assert cache.family(path) is Family.SDXL
    assert len(detector.calls) == 2

    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched, same size
    assert cache.family(path) is Family.SDXL
    assert len(detector.calls) == 3

    other = make(tmp_path, "flux.safetensors", st.flux1(dev=False))
    assert cache.family(other) is Family.FLUX1_SCHNELL
    assert len(cache) == 2
    cache.retain([other])
    assert len(cache) == 1

    other.unlink()
    assert cache.family(other) is None
    assert len(cache) == 0


def test_family_cache_default_detector(tmp_path: Path) -> None:
    cache = FamilyCache()
    assert cache.family(make(tmp_path, "sd3.5_large_turbo.safetensors", st.sd35(large=True))) is Family.SD35_LARGE_TURBO
    assert cache.family(tmp_path / "upscaler.pth") is None
