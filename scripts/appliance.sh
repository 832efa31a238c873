#!/usr/bin/env bash
# Set up the host, then run the appliance: with /etc/xdpfw/config.toml when it exists, otherwise
# on a demo topology of namespaces (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CONFIG=${XDPFW_CONFIG:-/etc/xdpfw/config.toml}
if [ -f "$CONFIG" ]; then
    exec .venv/bin/xdpfw serve --config "$CONFIG" "$@"
fi
echo "appliance: no $CONFIG: starting on the demo topology"
exec .venv/bin/xdpfw serve --demo "$@"
