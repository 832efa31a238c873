"""Fixtures for tests that load the real XDP program (BPF_PROG_TEST_RUN)."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from conftest import require_kernel
from xdpfw.dataplane import abi
from xdpfw.dataplane.loader import ProgramConfig
from xdpfw.dataplane.testrun import test_run

TEST_SLOT = 0  # the interface slot of the test instance, which BPF_PROG_TEST_RUN runs
TEST_CAPACITY = dict(
    max_rules=65_536, max_port_rules=4096, max_tbl8_groups=1024, max_ifaces=16,
    # Load balancer: a small prime table keeps tests fast (production uses 65537).
    max_services=8, max_backends=64, lb_table_size=251, lb_ct_size=4096, max_cpus=8,
)


def isolated_program_config(tmp_name: str | None = None) -> ProgramConfig:
    return ProgramConfig(pin_dir=f"/sys/fs/bpf/xdpfw-test-{tmp_name or uuid.uuid4().hex[:8]}",
                         **TEST_CAPACITY)


def remove_pins(pin_dir: str) -> None:
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir)


@pytest.fixture(scope="session")
def firewall(tmp_path_factory):
    """One compiled firewall for the session; `fw` hands it out clean to each test."""
    require_kernel()
    from xdpfw.service import Firewall

    cfg = isolated_program_config()
    fw = Firewall(tmp_path_factory.mktemp("state"), cfg)
    yield fw
    fw.close()
    remove_pins(cfg.pin_dir)


@pytest.fixture
def fw(firewall):
    firewall.maps.set_policy(TEST_SLOT, abi.POLICY_PASS, abi.POLICY_PASS, 0)
    yield firewall
    ids = [int(i) for i in firewall.table.column("id")]
    if ids:  # in one change (Firewall.delete_where): 40,000 deletes one by one took 25 s
        firewall.delete_where(ids=ids)
    firewall.maps.clear_policy(TEST_SLOT)


class Runner:
    def __init__(self, fw) -> None:
        self.fw = fw

    def __call__(self, packet: bytes, repeat: int = 1):
        return test_run(self.fw.program.fd, packet, repeat=repeat)


@pytest.fixture
def run(fw):
    return Runner(fw)


@pytest.fixture
def unresolving_lb(fw, make_netns):
    """A LoadBalancer whose backends are reached from an empty namespace: none resolves
    (quickly). Its services are deleted after the test."""
    from xdpfw.lb.service import LoadBalancer

    lb = LoadBalancer(fw.state_dir, fw.dp, make_netns("fsv"), resolve_timeout_s=0.1)
    try:
        yield lb
    finally:
        for svc in lb.list_services():
            lb.delete_service(svc.rec.id)
        lb.close()
