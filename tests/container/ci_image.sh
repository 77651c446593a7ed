#!/usr/bin/env bash
# Build the container appliance from ./Dockerfile and train recipe `tiny` in it, on a CI machine with no Docker Hub
# and no Docker engine running: `make image-test` (as root). Steps, each timed:
#   1. Debian's docker.io, docker-compose and debootstrap, installed with apt-get when absent.
#   2. A private dockerd (own data root, exec root and unix socket; no bridge, no iptables), stopped by PID at exit.
#   3. The base image, offline: debootstrap --variant=minbase of this machine's Debian release from its own apt
#      mirror, with python3/venv/make/ca-certificates, this machine's CA bundle and pip configuration, and the local
#      CPU torch wheel (pip takes it from /opt/wheels, as on the host), imported as rwkv7-base:ci.
#   4. docker build (classic builder, --network host) with BASE_IMAGE=rwkv7-base:ci SKIP_KERNEL=1 and the CPU torch.
#   5. docker run --network none: train two mini-epochs of `tiny` to a passing check (exit 0), the SKIP_KERNEL
#      warning, a non-root uid.
#   6. docker-compose config on compose.yaml and compose.multigpu.yaml.
# Cache: the debootstrap folder and the docker data root live in $RWKV7_CI_IMAGE_CACHE (default .cache/ci-image,
# git- and docker-ignored) and are reused when present; a fresh clone runs cold. Remove that folder to start over.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${RWKV7_CI_IMAGE_CACHE:-$ROOT/.cache/ci-image}
IMAGE=${RWKV7_CI_IMAGE:-rwkv7:ci}
BASE=rwkv7-base:ci
TORCH_VERSION=${RWKV7_CI_TORCH_VERSION:-2.13.0}
T0=$SECONDS
log() { printf '[ci_image %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '[ci_image] FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages, starts dockerd and runs debootstrap)"
mkdir -p "$CACHE"

# --- 1. packages -------------------------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The client that ships with the daemon (another docker client may come first on PATH).
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker) || die "no docker client"
log "packages ready: $("$DOCKER" --version)"

# --- 2. a private dockerd ----------------------------------------------------------------------------------------
RUN_DIR=$(mktemp -d /tmp/r7ci.XXXXXX)   # short on purpose: unix socket paths are limited to 108 bytes
SOCK=$RUN_DIR/docker.sock
DOCKERD_PID=""
cleanup() {
    local rc=$? m
    set +e
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID" 2>/dev/null
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    if [ "$rc" != 0 ] && [ -f "$RUN_DIR/dockerd.log" ]; then
        echo "--- dockerd.log (last 30 lines) ---" >&2; tail -n 30 "$RUN_DIR/dockerd.log" >&2
    fi
    # dockerd leaves its network-namespace bind mount behind in the exec root
    for m in $(awk -v d="$RUN_DIR/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do umount "$m"; done
    rm -rf "$RUN_DIR"
    log "done (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'printf "[ci_image] FAILED at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

dockerd --data-root "$CACHE/docker" --exec-root "$RUN_DIR/x" --pidfile "$RUN_DIR/dockerd.pid" \
    --host "unix://$SOCK" --bridge=none --iptables=false --ip-masq=false >"$RUN_DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST="unix://$SOCK"
for _ in $(seq 1 120); do
    "$DOCKER" version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || die "dockerd exited"
    sleep 0.5
done
"$DOCKER" version >/dev/null 2>&1 || die "dockerd did not answer on $SOCK within 60 s"
log "dockerd $DOCKERD_PID up on $SOCK (data root $CACHE/docker)"

# --- 3. the offline base image -----------------------------------------------------------------------------------
# shellcheck disable=SC1091
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$SUITE" ] || die "no VERSION_CODENAME in /etc/os-release (not Debian?)"
mirror() {  # the Debian mirror this machine's apt uses (deb822 .sources or one-line sources.list)
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v s="$SUITE" 'BEGIN{RS=""} $0 ~ ("Suites:[^\n]*[ \t]" s "([ \t]|$|\n)") {
            if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { u = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", u); print u; exit } }' "$f"
    done
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } \
        | awk -v s="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++;
                                          if ($(i + 1) == s) print $i }'
}
MIRROR=${RWKV7_CI_MIRROR:-$(mirror | grep -v -- '-security' | head -n 1 || true)}
[ -n "$MIRROR" ] || die "found no Debian mirror for $SUITE in /etc/apt/sources.list*"

TORCH_WHEEL=""
for d in ${PIP_FIND_LINKS:-} /opt/wheels /opt/pypi/files /opt/pypi-more/files; do
    for w in "$d"/torch-"$TORCH_VERSION"+cpu-cp*.whl; do [ -f "$w" ] && TORCH_WHEEL=$w && break 2; done
done
[ -n "$TORCH_WHEEL" ] || die "no local CPU wheel torch-$TORCH_VERSION+cpu (looked in \$PIP_FIND_LINKS and /opt)"
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}

ROOTFS=$CACHE/rootfs
PACKAGES=python3,python3-venv,make,ca-certificates
STAMP="$SUITE $MIRROR $PACKAGES $(basename "$TORCH_WHEEL") $(sha256sum "$HOST_CA" | cut -c1-16)"
if [ "$(cat "$ROOTFS/.ci-stamp" 2>/dev/null)" != "$STAMP" ]; then
    log "debootstrap --variant=minbase $SUITE from $MIRROR"
    rm -rf "$ROOTFS" "$ROOTFS.tmp"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    R=$ROOTFS.tmp
    # This machine's trust store and pip configuration, as on the host: pip reaches PyPI through the same CA bundle
    # and takes the CPU torch from /opt/wheels instead of a multi-GB CUDA build.
    if [ -d /usr/local/share/ca-certificates ]; then cp -a /usr/local/share/ca-certificates/. "$R/usr/local/share/ca-certificates/"; fi
    cp "$HOST_CA" "$R/etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$R/opt/wheels"
    cp "$TORCH_WHEEL" "$R/opt/wheels/"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\nfind-links = /opt/wheels\ndisable-pip-version-check = 1\ndefault-timeout = 180\n' \
        >"$R/etc/pip.conf"
    rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/usr/share/doc/* "$R"/usr/share/man/*
    echo "$STAMP" >"$R/.ci-stamp"
    mv "$R" "$ROOTFS"
    "$DOCKER" rmi -f "$BASE" >/dev/null 2>&1 || true
else
    log "reusing $ROOTFS"
fi
if [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "ci-stamp"}}' "$BASE" 2>/dev/null)" != "$STAMP" ]; then
    log "docker import $BASE"
    tar -C "$ROOTFS" --exclude=./.ci-stamp -c . | "$DOCKER" import \
        --change "LABEL ci-stamp=\"$STAMP\"" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
fi
log "base image $BASE ready ($("$DOCKER" image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%d MB", $1 / 1e6}'))"

# --- 4. build ----------------------------------------------------------------------------------------------------
log "docker build $IMAGE (SKIP_KERNEL=1, torch==$TORCH_VERSION+cpu)"
DOCKER_BUILDKIT=0 "$DOCKER" build --network host -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE" --build-arg SKIP_KERNEL=1 \
    --build-arg TORCH_SPEC="torch==$TORCH_VERSION+cpu" --build-arg TORCH_INDEX_URL= \
    "$ROOT" >"$CACHE/build.log" 2>&1 \
    || { tail -n 40 "$CACHE/build.log" >&2; die "docker build failed (log: $CACHE/build.log)"; }
"$DOCKER" image prune -f >/dev/null   # earlier builds' layers: keeps a reused data root from growing
log "built $IMAGE ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1 / 1e6}'))"

# --- 5. run ------------------------------------------------------------------------------------------------------
uid=$("$DOCKER" run --rm --network none --entrypoint id "$IMAGE" -u)
[ "$uid" != 0 ] || die "the image runs as root"
log "runs as uid $uid"

# Two of tiny's eight mini-epochs: the image generates the data, initialises, trains and checks the loss against
# recipes/expected/tiny.log (the check compares the mini-epochs a run has). The whole trajectory is `make test`'s
# regression test (tests/test_regression.py), on the same code.
log "docker run --network none $IMAGE train --recipe tiny --set train.epoch_count=2"
rc=0
# OPENBLAS_*: set on some hosts of this kind for correctness (docs of the machine); passed through only when set
"$DOCKER" run --rm --network none -e WANDB_MODE=disabled -e OPENBLAS_CORETYPE -e OPENBLAS_L2_SIZE "$IMAGE" train --recipe tiny --no-progress \
    --set train.epoch_count=2 >"$CACHE/run.log" 2>&1 || rc=$?
tail -n 15 "$CACHE/run.log"
[ "$rc" = 0 ] || die "train --recipe tiny exited $rc in the container (log: $CACHE/run.log)"
grep -q "SKIP_KERNEL=1" "$CACHE/run.log" || die "the SKIP_KERNEL=1 image did not warn at start"
grep -q "^PASS: 2/2 mini-epochs" "$CACHE/run.log" || die "the check did not compare both mini-epochs (log: $CACHE/run.log)"
log "tiny trained and passed its check in the container"

# --- 6. compose --------------------------------------------------------------------------------------------------
(cd "$ROOT" && docker-compose -f compose.yaml config -q \
    && DEVICES=2 docker-compose -f compose.yaml -f compose.multigpu.yaml config -q) || die "docker-compose config"
log "compose files valid"
log "PASSED in $((SECONDS - T0)) s"
