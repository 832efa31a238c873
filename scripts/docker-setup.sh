#!/usr/bin/env bash
# Idempotent: Debian's Docker engine and docker-compose, dockerd running, and the base image the
# Dockerfile starts from. No image registry is reachable here, so the base (debian:12-slim) is
# made with debootstrap from the Debian mirror apt already uses, once, and kept.
# Called by scripts/setup.sh; the compose test (tests/test_compose.py) needs all of it.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "docker-setup.sh: run as root" >&2; exit 1; }

DOCKER=/usr/bin/docker              # Debian's client; another `docker` may come first on PATH
BASE_IMAGE=${XDPFW_BASE_IMAGE:-debian:12-slim}
LOG=/var/log/xdpfw-dockerd.log

pkgs=(docker.io docker-compose debootstrap)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "docker-setup: installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# There is no systemd to start dockerd: start it detached, once, and wait until it answers.
if ! $DOCKER info >/dev/null 2>&1; then
    echo "docker-setup: dockerd is not running: starting it (log: $LOG)"
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
echo "docker-setup: dockerd running, $BASE_IMAGE present"
