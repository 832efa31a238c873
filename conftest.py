"""Shared fixtures for tests/ and netns_tests/.

Under CI=true a test that needs BPF or namespaces must run: a missing capability fails the
test loudly instead of skipping it. Outside CI it skips, with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from xdpfw import netns as nsutil

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "needs root (bpf(), XDP attach, network namespaces)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "BCC bindings missing: install python3-bpfcc and use the venv from scripts/setup.sh"
    release = os.uname().release
    if not os.path.exists(f"/lib/modules/{release}/build/include"):
        return f"no kernel headers at /lib/modules/{release}/build: run scripts/setup.sh"
    if not os.path.ismount("/sys/fs/bpf"):
        return "bpffs is not mounted at /sys/fs/bpf: run scripts/setup.sh"
    return None


def require_kernel() -> None:
    reason = _missing_capability()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true and a kernel capability is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "netns_tests" in str(item.fspath):
            item.add_marker(pytest.mark.netns)


def pytest_runtest_setup(item):
    if item.get_closest_marker("bpf") or item.get_closest_marker("netns"):
        require_kernel()


def unique(prefix: str) -> str:
    """A short unique name (interface names are limited to 15 bytes)."""
    return f"{prefix}{uuid.uuid4().hex[:6]}"


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], str]]:
    """Factory: make_netns("cli") creates a uniquely named namespace, removed at teardown."""
    created: list[str] = []

    def make(prefix: str = "xt") -> str:
        name = unique(f"xdpfw-{prefix}-")
        nsutil.create_netns(name)
        created.append(name)
        return name

    yield make
    for name in reversed(created):
        nsutil.remove_netns(name)
