#!/usr/bin/env bash
# Idempotent set-up of an xdpfw host (Debian 12): system packages, kernel headers for BCC,
# bpffs, a venv at .venv that sees Debian's BCC bindings, `xdpfw` on PATH with bash
# completion, and Docker with the base image (scripts/docker-setup.sh). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (XDP and BPF need CAP_SYS_ADMIN/CAP_NET_ADMIN)" >&2; exit 1; }

pkgs=(python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64 iproute2 iputils-ping bpftool
      python3-venv xdp-tools netsniff-ng nftables iperf3 systemd ethtool tcpdump chromium
      python3-seccomp  # tests/unit_sandbox.py: the unit's system-call filter, without systemd
      etcd-server etcd-client)  # netns_tests/test_fleet.py: a real etcd cluster
source scripts/debian-packages.sh
install_missing setup "${pkgs[@]}"

# Debian's etcd-server enables a member of its own on localhost:2379; the tests run their own
# members on free ports, and an appliance's fleet names its etcd in [fleet]: keep it off.
if [ -d /run/systemd/system ] && systemctl is-enabled -q etcd 2>/dev/null; then
    systemctl disable --now etcd && echo "setup: disabled Debian's etcd.service (tests start their own)"
fi

# BCC compiles C at run time against /lib/modules/$(uname -r)/{build,source}. Link Debian's
# headers there only when this kernel has none of its own.
K=$(uname -r)
if [ ! -e "/lib/modules/$K/build/include" ]; then
    H=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1)
    mkdir -p "/lib/modules/$K"
    ln -sfn "$H" "/lib/modules/$K/build"
    ln -sfn "${H%-amd64}-common" "/lib/modules/$K/source"
    echo "setup: kernel $K ships no headers; linked $H for BCC"
fi

mountpoint -q /sys/fs/bpf || { mount -t bpf bpf /sys/fs/bpf && echo "setup: mounted bpffs at /sys/fs/bpf"; }

# Debian's python, so that the venv sees python3-bpfcc.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import bcc" 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -c "import bcc, pyroute2, fastapi" || { echo "setup: imports failed" >&2; exit 1; }

# The CLI on every shell's PATH (a fresh one has no .venv/bin), with bash completion.
ln -sfn "$PWD/.venv/bin/xdpfw" /usr/local/bin/xdpfw
mkdir -p /usr/share/bash-completion/completions
.venv/bin/xdpfw completion bash > /usr/share/bash-completion/completions/xdpfw

# Docker serves docker-compose (and its test) only: the appliance runs without it, so a Docker
# that cannot start is said loudly but does not stop the set-up (the compose test then fails
# under CI, naming the reason).
bash scripts/docker-setup.sh || echo "setup: WARNING: Docker is not ready (above); the appliance" \
    "does not need it, docker-compose and tests/test_compose.py do" >&2
echo "setup: ready: /usr/local/bin/xdpfw -> $PWD/.venv/bin/xdpfw (bash completion installed)"
