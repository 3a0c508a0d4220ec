"""llama.cpp's ``llama-server``, built once per machine from a pinned source.

The source is the llama.cpp that llama-cpp-python vendors in its sdist (PyPI, checked by
SHA-256): one pinned llama.cpp, fetched from a package registry. We run llama.cpp's own server
rather than llama-cpp-python's because only it serves several chats at once from one loaded model
(parallel slots, continuous batching); llama-cpp-python's server takes one request at a time.

The build (CMake, a few minutes to twenty on two cores) is kept in ``paths.cache_dir`` under a
key of the version, CUDA or not, and the CPU's features, so a reinstall, a fresh checkout or a CI
run on the same kind of machine copies it instead of compiling again. With CUDA (an NVIDIA driver
and ``nvcc``), every layer can be offloaded to the GPU; without, it runs on the CPU.

Dockerfile.cuda builds it in a CUDA devel stage with only the standard library and this module
(``python3 -m agent.chat.build --cuda --portable OUT``), for NVIDIA GPUs from Turing to Hopper and
x86-64 CPUs with AVX2, and points ``chat.server`` at it; provisioning then uses that binary as it is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gpugate.errors import ProvisionError  # the standard library only: the image's build stage runs this module

if TYPE_CHECKING:
    from gpugate.settings import Settings

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
BUILD_TIMEOUT_S = 3600.0
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",  # it never downloads anything
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no web page: the router has its own
)
NATIVE = ("-DGGML_NATIVE=ON",)  # built on the machine that runs it (the cache key has its CPU's features)
# an image: x86-64 CPUs with AVX2 (2013 on), NVIDIA GPUs from Turing to Hopper
PORTABLE = ("-DGGML_NATIVE=OFF", "-DCMAKE_CUDA_ARCHITECTURES=75;80;86;89;90")


def server_binary(settings: Settings) -> Path:
    """Where the agent runs llama-server from: ``chat.server``, else the provisioned one."""
    return settings.chat.server or settings.paths.vendor_dir / "llama.cpp" / "llama-server"


def wants_cuda() -> bool:
    return shutil.which("nvcc") is not None and shutil.which("nvidia-smi") is not None


def cache_key(cuda: bool) -> str:
    """What a native build depends on: the version, the CPU's features and, with CUDA, the GPUs'
    compute capabilities (a cache shared between machines never hands one the other's build)."""
    flags = ""
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as info:
        for line in info:
            if line.startswith("flags"):
                flags = line
                break
    if cuda:
        done = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        flags += "cuda " + ",".join(sorted(set(done.stdout.split())))
    machine = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{LLAMA_CPP_PYTHON}-{'cuda' if cuda else 'cpu'}-{os.uname().machine}-{machine}"


def provision(settings: Settings, *, cuda: bool | None = None) -> Path:
    """llama-server in place (vendor/llama.cpp/), from the cache or built now; its path. One given
    as ``chat.server`` (the image's) is used as it is."""
    if settings.chat.server is not None:
        if not settings.chat.server.exists():
            raise ProvisionError(f"chat.server is {settings.chat.server}, which does not exist")
        return settings.chat.server
    cuda = wants_cuda() if cuda is None else cuda
    key = cache_key(cuda)
    target = settings.paths.vendor_dir / "llama.cpp" / "llama-server"
    stamp = target.with_name("BUILD")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == key:
        return target
    cached = settings.paths.cache_dir / "llama.cpp" / key / "llama-server"
    if not cached.exists():
        _build(settings.paths.cache_dir, cached, cuda)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    shutil.copy2(cached, part)
    part.replace(target)
    stamp.write_text(key + "\n")
    return target


def _build(cache_dir: Path, out: Path, cuda: bool, portable: bool = False) -> None:
    log.info("building llama-server (once per machine; minutes)", extra={"version": LLAMA_CPP_PYTHON, "cuda": cuda})
    with tempfile.TemporaryDirectory(prefix="gpugate-llama-") as tmp:
        sdist = _sdist(cache_dir, Path(tmp))
        source = Path(tmp) / "src"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            archive.extractall(source, members=members, filter="data")
        build = Path(tmp) / "build"
        options = [*CMAKE_OPTIONS, *(PORTABLE if portable else NATIVE), f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"]
        jobs = str(os.cpu_count() or 2)
        _run(["cmake", "-S", str(source), "-B", str(build), *options])
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs])
        binary = build / "bin" / "llama-server"
        if not binary.exists():
            raise ProvisionError(f"the llama.cpp build made no {binary}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, out.with_suffix(".part"))
        out.with_suffix(".part").replace(out)
    log.info("llama-server built", extra={"path": str(out)})


def _sdist(cache_dir: Path, tmp: Path) -> Path:
    """llama-cpp-python's source archive from PyPI (kept in the cache), checked by SHA-256."""
    kept = cache_dir / "llama.cpp" / SDIST
    if not kept.exists():  # pip checks the hash before it runs anything of the package
        pinned = tmp / "requirements.txt"
        pinned.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              "--require-hashes", "-r", str(pinned), "-d", str(tmp)])
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp / SDIST, kept)
    digest = hashlib.sha256()
    with kept.open("rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        kept.unlink()
        raise ProvisionError(f"{SDIST} has SHA-256 {digest.hexdigest()}, expected {SDIST_SHA256}; removed it")
    return kept


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise ProvisionError(f"{command[0]} is needed to build llama-server: install it (apt-get install cmake g++)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ProvisionError(f"{' '.join(command[:3])} ran past {BUILD_TIMEOUT_S:.0f}s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise ProvisionError(f"{' '.join(command[:3])} failed ({done.returncode}):\n{tail}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="build llama-server from the pinned llama.cpp")
    parser.add_argument("out", type=Path, help="where to put the binary")
    parser.add_argument("--cuda", action="store_true", help="with CUDA (needs nvcc; no GPU needed to build)")
    parser.add_argument("--portable", action="store_true", help="for other machines (an image), not only this one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpugate-llama-cache-") as cache:
        _build(Path(cache), args.out, args.cuda, args.portable)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
