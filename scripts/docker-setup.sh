#!/usr/bin/env bash
# Idempotent: Debian's Docker engine and docker-compose, dockerd running, and the base image the
# Dockerfile starts from. No image registry is reachable here, so the base (debian:12-slim) is
# made with debootstrap from the Debian mirror apt already uses, once, and kept.
# Called by scripts/setup.sh; the compose test (tests/test_compose.py) needs all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "docker-setup.sh: run as root" >&2; exit 1; }

DOCKER=/usr/bin/docker              # Debian's client; another `docker` may come first on PATH
BASE_IMAGE=${XDPFW_BASE_IMAGE:-debian:12-slim}
LOG=/var/log/xdpfw-dockerd.log

source scripts/debian-packages.sh
install_missing docker-setup docker.io docker-compose debootstrap

# There is no systemd to start dockerd: start it detached, once, and wait until it answers.
if ! $DOCKER info >/dev/null 2>&1; then
    echo "docker-setup: dockerd is not running: starting it (log: $LOG)"
    # A dockerd that was killed leaves its pid file, and so does its containerd: a new
    # dockerd refuses to start if that pid now names another live process, and takes any
    # live process with containerd's pid for its containerd, waiting for a socket that never
    # comes ("timeout waiting for containerd to start").
    for stale in /var/run/docker.pid:dockerd /var/run/docker/containerd/containerd.pid:containerd; do
        pidfile=${stale%:*}
        if [ -f "$pidfile" ] && ! grep -qs "${stale#*:}" "/proc/$(cat "$pidfile")/comm"; then
            rm -f "$pidfile"
        fi
    done
    setsid -f dockerd >>"$LOG" 2>&1 </dev/null
    for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && break; sleep 0.5; done
    $DOCKER info >/dev/null 2>&1 || { echo "docker-setup: dockerd did not start; see $LOG" >&2; exit 1; }
fi

if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    # The mirror apt uses for the main archive (not the security one).
    mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 2>/dev/null \
             | grep -v -- '-security' | sort -u | head -1)
    [ -n "$mirror" ] || { apt-get update -q; mirror=$(apt-get indextargets --format '$(REPO_URI)' \
             'Created-By: Packages' | grep -v -- '-security' | sort -u | head -1); }
    echo "docker-setup: no $BASE_IMAGE image: building it with debootstrap from $mirror (~1 min)"
    root=$(mktemp -d /var/tmp/xdpfw-base.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 \
        || { echo "docker-setup: debootstrap failed; see $root.log" >&2; exit 1; }
    rm -f "$root.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | $DOCKER import --change 'LABEL org.xdpfw.base=debootstrap' - "$BASE_IMAGE" >/dev/null
    echo "docker-setup: made $BASE_IMAGE"
fi
# The image's Python dependencies, fetched by the host's pip (its index and certificates):
# the build installs from these with --no-index, so it needs neither PyPI nor the host's TLS
# set-up (an offline appliance builds the same way); setuptools and wheel build xdpfw itself.
# Incremental: pip keeps what it has.
if [ -x .venv/bin/pip ]; then
    mkdir -p build/wheels
    mapfile -t deps < <(python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))")
    .venv/bin/pip download -q --disable-pip-version-check --only-binary=:all: -d build/wheels "${deps[@]}" \
        "setuptools>=64" wheel 2>&1 \
        | grep -v "^WARNING: Location" || true
    echo "docker-setup: the image's Python dependencies are in build/wheels ($(ls build/wheels | wc -l) wheels)"
fi

# The compose file binds /run/netns with rslave propagation, so that namespaces made after the
# container started appear in it: that needs /run/netns to be a shared mount, as the first
# `ip netns add` makes it.
mkdir -p /run/netns
mountpoint -q /run/netns || mount --bind /run/netns /run/netns
mount --make-shared /run/netns
echo "docker-setup: dockerd running, $BASE_IMAGE present, /run/netns shared"
