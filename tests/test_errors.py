"""The one error hierarchy: errors raised outside xdpfw/errors.py get their HTTP status from
ERROR_STATUS through the classes they derive from (no hand translation in between)."""

from __future__ import annotations

import pytest

from xdpfw.api.app import status_of
from xdpfw.errors import XdpfwError
from xdpfw.lb.health import HealthConfigError
from xdpfw.lb.maglev import MaglevError
from xdpfw.lb.neigh import NeighbourUnresolved
from xdpfw.proxy.engine import AddressInUseError, EngineError, ListenError
from xdpfw.proxy.fallback import ProxyUnavailableError
from xdpfw.proxy.loader import CompileError, MapCreateError, SpliceError, VerifierError


@pytest.mark.parametrize(("error", "status"), [
    (MaglevError("table size 10 is not a prime"), 422),
    (HealthConfigError("http_path must start with '/'"), 422),
    (NeighbourUnresolved("10.0.0.9", "eth1", "no reply to ARP/ND (FAILED)", "edge"), 422),
    (ListenError("cannot listen on 10.0.0.1:80"), 422),
    (AddressInUseError("cannot listen on 10.0.0.1:80: address in use"), 409),
    (ProxyUnavailableError("sockhash demanded, but refused"), 409),
    (CompileError("cannot compile sockproxy.c", log="error: x"), 500),
    (VerifierError("kernel refused sp_verdict", err=13, log="R1 invalid mem access"), 500),
])
def test_each_error_has_its_status(error: XdpfwError, status: int) -> None:
    assert isinstance(error, XdpfwError)
    assert status_of(error) == status, f"{type(error).__name__}: {status_of(error)}"


@pytest.mark.parametrize("error", [EngineError("engine not started"),
                                   MapCreateError("no sockhash", err=7),
                                   SpliceError("sockhash is full", err=28)])
def test_errors_no_request_should_meet_are_unlisted(error: XdpfwError) -> None:
    """They reach the last-resort 500, which names only their type."""
    assert isinstance(error, XdpfwError) and status_of(error) is None


def test_the_netns_is_named_when_a_backend_cannot_be_resolved() -> None:
    e = NeighbourUnresolved("10.0.0.9", "eth1", "no reply to ARP/ND (FAILED)", "edge")
    assert str(e) == "cannot resolve 10.0.0.9 on eth1 in netns edge: no reply to ARP/ND (FAILED)"
