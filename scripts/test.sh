#!/usr/bin/env bash
# Set up the host, then run every test: lint, unit, BPF_PROG_TEST_RUN and netns traffic tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check xdpfw tests netns_tests scripts
exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
