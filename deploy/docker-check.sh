#!/usr/bin/env bash
# Builds the image and runs the Compose stack for real, then checks it (README, "Running
# with Docker Compose"):
#   /readyz through nginx; every demo task answers what `piggy-serve --demo` answers outside
#   Docker; an upload through nginx that both replicas serve within a second; a replica
#   SIGKILLed (as a crash would; `docker kill` is a manual stop that no restart policy
#   undoes) and restarted by its restart policy while nginx keeps answering;
#   `down -v` leaving no container, network or volume; the GPU override file parsed.
#
#   bash deploy/docker-check.sh          (as root where it has to start dockerd)
#
# Docker: uses a running daemon, else starts dockerd (Debian's docker.io) and stops it at
# the end. Images: where the registry answers, the compose file's own; else local stand-ins
# (deploy/local-images: a debootstrap'ed Debian 12 with python3, Debian's redis and nginx),
# swapped in by deploy/docker-compose.local.yml. Those base images and the build cache stay
# in Docker between runs, so a second run rebuilds only what changed.
# Environment: PIGGY_CHECK_PYTHON (the project's venv python, default .venv/bin/python; runs
# piggy-serve --demo outside Docker and the probes), PIGGY_CHECK_WHEELS=0 (let the build
# download torch instead of copying it from this machine's pip into deploy/wheels),
# PIGGY_DEBIAN_MIRROR (debootstrap's mirror, default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=piggy-check
TAG=check
PY=${PIGGY_CHECK_PYTHON:-.venv/bin/python}
MIRROR=${PIGGY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCAL_BASE=piggy-local/debian:bookworm
WORK=$(mktemp -d /tmp/piggy-docker-check.XXXXXX)
DOCKERD_PID=""
HOST_PID=""
STACK_UP=""
T0=$(date +%s.%N)

log() { echo "[docker-check] $*"; }
fail() { log "FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# step NAME COMMAND...: runs it and says how long it took.
step() {
    local name=$1 start
    shift
    start=$(now)
    log "== $name"
    "$@" || fail "$name"
    log "   $name: $(secs "$start") s"
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "$HOST_PID" ]; then kill "$HOST_PID" 2>/dev/null; wait "$HOST_PID" 2>/dev/null; fi
    if [ -n "$STACK_UP" ]; then
        if [ "$rc" != 0 ]; then
            compose ps >&2
            compose logs --no-color --tail 15 >&2
        fi
        compose down -v --remove-orphans >/dev/null 2>&1
    fi
    if [ -n "$DOCKERD_PID" ]; then
        log "stopping the dockerd this check started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
    log "total $(secs "$T0") s, exit $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Docker ----------------------------------------------------------------------------

pick_clients() {
    # Docker >= 23 clients build through the buildx plugin; Debian's 20.10 client builds
    # with BuildKit itself (DOCKER_BUILDKIT=1). A newer client without buildx cannot.
    DOCKER=""
    for c in docker /usr/bin/docker; do
        if ! command -v "$c" >/dev/null; then continue; fi
        if "$c" buildx version >/dev/null 2>&1 || "$c" --version | grep -q 'version 20\.'; then
            DOCKER=$(command -v "$c"); break
        fi
    done
    [ -n "$DOCKER" ] || { log "no docker client that builds with BuildKit (apt-get install docker.io)"; return 1; }
    if "$DOCKER" compose version >/dev/null 2>&1; then
        COMPOSE=("$DOCKER" compose)
    elif command -v docker-compose >/dev/null; then
        COMPOSE=(docker-compose)
    else
        log "no Compose (apt-get install docker-compose)"; return 1
    fi
    export DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1
    log "   client $DOCKER ($("$DOCKER" --version)), compose: ${COMPOSE[*]}"
}

start_docker() {
    if "$DOCKER" info >/dev/null 2>&1; then
        log "   using the running Docker daemon"
        return 0
    fi
    command -v dockerd >/dev/null || { log "Docker is not running and there is no dockerd (apt-get install docker.io)"; return 1; }
    [ "$(id -u)" = 0 ] || { log "Docker is not running and starting dockerd needs root"; return 1; }
    dockerd --storage-driver=overlay2 >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        if "$DOCKER" info >/dev/null 2>&1; then
            log "   started dockerd (pid $DOCKERD_PID, $("$DOCKER" info --format '{{.ServerVersion}} {{.Driver}}'))"
            return 0
        fi
        if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then break; fi
        sleep 0.5
    done
    log "Docker could not start; the end of dockerd's log:"
    tail -n 20 "$WORK/dockerd.log" >&2
    return 1
}

# --- images ----------------------------------------------------------------------------

registry_reachable() {
    local image
    for image in python:3.11-slim redis:7.4-alpine nginx:1.28-alpine; do
        timeout 300 "$DOCKER" pull -q "$image" >/dev/null 2>&1 || return 1
    done
}

debian_base() {
    if "$DOCKER" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        log "   $LOCAL_BASE is already here"
        return 0
    fi
    command -v debootstrap >/dev/null || { log "no debootstrap (apt-get install debootstrap)"; return 1; }
    local root="$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; return 1; }
    # HTTPS from builds (pip) goes through whatever this machine trusts besides Debian's CAs.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "$DOCKER" import - "$LOCAL_BASE" >/dev/null
    rm -rf "$root"
}

local_images() {
    local target
    for target in python redis nginx; do
        "$DOCKER" build -q --target "$target" --build-arg "BASE=$LOCAL_BASE" \
            -t "piggy-local/$target:bookworm" deploy/local-images >/dev/null || return 1
    done
}

fill_wheels() {
    # torch and its CUDA libraries from this machine's pip (local disk here), not PyPI.
    local pins
    pins=$("$PY" -c 'import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["masks"]
print(" ".join(d for d in deps if re.match(r"torch(vision)?==", d)))')
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --disable-pip-version-check -d deploy/wheels $pins \
        >"$WORK/wheels.log" 2>&1 || { tail -n 20 "$WORK/wheels.log" >&2; return 1; }
    log "   deploy/wheels: $(du -sh deploy/wheels | cut -f1)"
}

build_image() {
    local args=()
    [ -n "$USE_REGISTRY" ] || args=(--build-arg BASE_IMAGE=piggy-local/python:bookworm)
    "$DOCKER" build "${args[@]}" -t "piggyback-serve:$TAG" . >"$WORK/build.log" 2>&1 \
        || { tail -n 30 "$WORK/build.log" >&2; return 1; }
    local size
    size=$("$DOCKER" image inspect -f '{{.Size}}' "piggyback-serve:$TAG")
    log "   image piggyback-serve:$TAG: $((size / 1000000)) MB"
}

# --- the stack -------------------------------------------------------------------------

compose() {
    local files=(-f docker-compose.yml)
    [ -n "$USE_REGISTRY" ] || files+=(-f deploy/docker-compose.local.yml)
    PIGGY_IMAGE_TAG=$TAG PIGGY_ADMIN_TOKEN=$TOKEN PIGGY_PUBLISH_PORT=127.0.0.1:$LB_PORT \
        "${COMPOSE[@]}" -p "$PROJECT" "${files[@]}" "$@"
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

up() {
    STACK_UP=1
    UP_START=$(now)
    compose up -d --no-build >"$WORK/up.log" 2>&1 || { tail -n 30 "$WORK/up.log" >&2; return 1; }
}

probe() { "$PY" deploy/docker_probe.py "$@"; }

first_answer() {
    probe ready --lb "$LB" --timeout 300 || return 1
    log "   from \`up\` to /readyz through nginx: $(secs "$UP_START") s"
    probe seeded --lb "$LB" --tasks "$DEMO_TASKS" --timeout 300 || return 1
    "$PY" - "$LB" <<'EOF' || return 1
import sys, httpx
from deploy.docker_probe import predict, test_image
r = predict(httpx.Client(base_url=sys.argv[1], timeout=60), "digits", test_image())
r.raise_for_status()
EOF
    log "   from \`up\` to the first prediction through nginx: $(secs "$UP_START") s"
}

host_server() {
    local port
    port=$(free_port)
    HOST_URL=http://127.0.0.1:$port
    PIGGY_HOME="$WORK/home" "$PY" -m piggyback_serve.server --demo --host 127.0.0.1 --port "$port" \
        >"$WORK/host.log" 2>&1 &
    HOST_PID=$!
    probe ready --lb "$HOST_URL" --timeout 180 >/dev/null || { tail -n 20 "$WORK/host.log" >&2; return 1; }
}

replicas() {
    "$DOCKER" ps -q --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=piggy"
}

upload() {
    probe upload --lb "$LB" --token "$TOKEN" --file "$WORK/home/demo/tasks/digits.safetensors" \
        --docker "$DOCKER" --containers "$(replicas | paste -sd, -)"
}

crash_replica() {
    local container
    container=$(replicas | head -n 1)
    [ -n "$container" ] || { log "no piggy replica running"; return 1; }
    probe crash --lb "$LB" --task digits --docker "$DOCKER" --container "$container"
}

down_clean() {
    compose down -v --remove-orphans >"$WORK/down.log" 2>&1 || { cat "$WORK/down.log" >&2; return 1; }
    STACK_UP=""
    local left
    left=$(
        "$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT"
        "$DOCKER" network ls -q --filter "label=com.docker.compose.project=$PROJECT"
        "$DOCKER" volume ls -q --filter "label=com.docker.compose.project=$PROJECT"
    )
    [ -z "$left" ] || { log "left behind after down: $left"; return 1; }
    log "   no container, network or volume of $PROJECT left"
}

gpu_file() {
    local out
    out=$(compose -f docker-compose.gpu.yml config) || return 1
    grep -q "driver: nvidia" <<<"$out" && grep -q "PIGGY_DEVICE: cuda" <<<"$out" \
        || { log "the GPU override did not reach the merged config"; return 1; }
    log "   docker-compose.gpu.yml merges: piggy reserves an nvidia GPU, PIGGY_DEVICE=cuda"
}

# --- the run ---------------------------------------------------------------------------

[ -x "$PY" ] || PY=$(command -v python3)
"$PY" -c 'import httpx, piggyback_serve.server' 2>/dev/null \
    || fail "$PY cannot import the project (set PIGGY_CHECK_PYTHON to its venv's python)"
TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')
LB_PORT=$(free_port)
LB=http://127.0.0.1:$LB_PORT
DEMO_TASKS=$(cd src/piggyback_serve/masks/demo_tasks && ls ./*.safetensors | sed 's|^\./||; s|\.safetensors$||' | paste -sd, -)
USE_REGISTRY=""

step "docker clients" pick_clients
step "docker daemon" start_docker
# A stack left by an interrupted run of this check would hold the names.
compose down -v --remove-orphans >/dev/null 2>&1 || true
if registry_reachable; then
    USE_REGISTRY=1
    log "   an image registry answers: the compose file's own images"
else
    log "   no image registry: local stand-in images (deploy/local-images)"
    step "debian base image" debian_base
    step "python, redis, nginx images" local_images
fi
if [ "${PIGGY_CHECK_WHEELS:-1}" = 1 ]; then step "torch wheels into deploy/wheels" fill_wheels; fi
step "build piggyback-serve:$TAG" build_image
step "compose up" up
step "first answer through nginx" first_answer
step "piggy-serve --demo outside Docker" host_server
step "same predictions inside and outside Docker" \
    probe same --lb "$LB" --host "$HOST_URL" --tasks "$DEMO_TASKS"
step "upload through nginx, served by both replicas" upload
step "a replica crashes (SIGKILL)" crash_replica
step "compose down" down_clean
step "GPU override file" gpu_file
log "PASSED"
