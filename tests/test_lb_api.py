"""/api/v1/services against the real program: validation errors, and the load balancer's
series in /metrics changing with packets run through BPF_PROG_TEST_RUN.

The backend is a real neighbour: a veth pair between two namespaces the test creates."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests import packets as P
from tests.test_metrics import scrape, value
from xdpfw import netns as nsutil
from xdpfw.api.app import create_app
from xdpfw.config import ConfigError, check_config
from xdpfw.lb.service import LoadBalancer

pytestmark = pytest.mark.bpf

VIP, PORT, BACKEND = "10.97.100.1", 80, "10.97.0.2"


@pytest.fixture
def lb(fw, make_netns) -> Iterator[LoadBalancer]:
    """A LoadBalancer whose backends live in a namespace pair: lbns (10.97.0.1) -- bens."""
    lbns, bens = make_netns("lba"), make_netns("lbb")
    nsutil.veth_pair(lbns, "lb0", bens, "be0", [nsutil.Addr("10.97.0.1", 24)],
                     [nsutil.Addr(BACKEND, 24)])
    lb = LoadBalancer(fw.state_dir, fw.dp, lbns, resolve_timeout_s=3.0)
    try:
        yield lb
    finally:
        for svc in lb.list_services():
            lb.delete_service(svc.rec.id)
        lb.maps.clear_conntrack()
        lb.close()


@pytest.fixture
def api(fw, lb) -> TestClient:
    return TestClient(create_app(fw, lb=lb))


def create(api: TestClient, **body) -> dict:
    r = api.post("/api/v1/services", json={"vip": VIP, "port": PORT, **body})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize(("body", "field", "says"), [
    ({"vip": "10.97.100.300", "port": 80}, "vip", "is not an IP address"),
    ({"vip": VIP, "port": 0}, "port", "greater than or equal to 1"),
    ({"vip": VIP, "port": 80, "proto": "sctp"}, "proto", "'tcp' or 'udp'"),
    ({"vip": VIP, "port": 80, "backends": [{"address": "backend-1"}]}, "address",
     "is not an IP address"),
    ({"vip": VIP, "port": 80, "backends": [{"address": BACKEND, "weight": -1}]}, "weight",
     "greater than or equal to 0"),
    ({"vip": VIP, "port": 80, "cpu_steer": [4096]}, None, "cpu_steer: no CPU [4096]"),
    ({"vip": VIP, "port": 80, "health_check": {"kind": "http", "http_path": "status"}}, None,
     "http_path must start with '/'"),
])
def test_service_validation_errors_are_422(api, body, field, says):
    r = api.post("/api/v1/services", json=body)
    assert r.status_code == 422, f"{body}: {r.status_code} {r.text}"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and says in detail, detail
    if field is not None:  # refused by the schema: errors names the field
        where = [e for e in r.json()["errors"] if e["loc"][-1] == field]
        assert where and says in where[0]["msg"], f"{field}: {r.text}"
    assert api.get("/api/v1/services").json() == [], "a refused service was kept"


def test_unknown_ids_are_404_and_duplicates_409(api):
    svc = create(api)
    sid = svc["id"]
    for method, url in [("get", "/api/v1/services/999999"),
                        ("delete", "/api/v1/services/999999"),
                        ("get", f"/api/v1/services/{sid}/backends/999999"),
                        ("patch", f"/api/v1/services/{sid}/backends/999999")]:
        kw = {"json": {"weight": 2}} if method == "patch" else {}
        r = api.request(method.upper(), url, **kw)
        assert r.status_code == 404 and "999999" in r.json()["detail"], f"{method} {url}: {r.text}"
    r = api.post("/api/v1/services", json={"vip": VIP, "port": PORT})
    assert r.status_code == 409 and f"id {sid}" in r.json()["detail"], r.text
    r = api.post(f"/api/v1/services/{sid}/backends", json={"address": BACKEND})
    assert r.status_code == 201, r.text
    r = api.post(f"/api/v1/services/{sid}/backends", json={"address": BACKEND})
    assert r.status_code == 409 and BACKEND in r.json()["detail"], r.text


def test_proxy_service_on_a_foreign_or_busy_address_is_refused(api, lb):
    """The engine's own typed errors, mapped in ERROR_STATUS: 422 for a VIP the appliance does
    not hold (with the hint), 409 for a VIP:port something else listens on."""
    import socket

    from xdpfw.netns import thread_in_netns

    body = {"port": 8081, "forward": "proxy", "backends": [{"address": BACKEND}]}
    r = api.post("/api/v1/services", json={"vip": "10.97.0.77", **body})
    assert r.status_code == 422, r.text
    assert "must be an address of the appliance in netns" in r.json()["detail"], r.text
    with thread_in_netns(lb.registry.netns):
        busy = socket.create_server(("10.97.0.1", 8081))
    with busy:
        r = api.post("/api/v1/services", json={"vip": "10.97.0.1", **body})
        assert r.status_code == 409 and "Address already in use" in r.json()["detail"], r.text
    assert api.get("/api/v1/services").json() == [], "a refused service was kept"


def test_non_prime_table_size_in_config_names_the_line(tmp_path):
    cfg = tmp_path / "xdpfw.toml"
    cfg.write_text('[lb]\nmax_services = 8\ntable_size = 65536\n')
    with pytest.raises(ConfigError) as e:
        check_config(cfg, interfaces=False)
    assert f"{cfg}:3: lb.table_size" in str(e.value) and "must be a prime" in str(e.value), (
        str(e.value))


def test_metrics_per_service_and_backend_follow_traffic(api, lb, run):
    svc = create(api, name="web", backends=[{"address": BACKEND}])
    empty = create(api, name="void", port=PORT + 1)
    be = svc["backends"][0]
    labels = dict(service=str(svc["id"]), service_name="web", vip=VIP, port=str(PORT), proto="tcp")
    be_labels = dict(service=str(svc["id"]), backend=str(be["id"]), address=BACKEND)
    before = scrape(api)
    assert value(before, "xdpfw_backend_healthy", **be_labels) == 1
    assert value(before, "xdpfw_backend_table_share", **be_labels) == 1.0
    assert value(before, "xdpfw_services") == 2

    pkt = P.eth(P.ETH_IP, P.ipv4("10.97.1.7", VIP, P.TCP, P.l4(P.TCP, PORT)))
    for _ in range(4):
        assert run(pkt).verdict == "XDP_TX"
    miss = P.eth(P.ETH_IP, P.ipv4("10.97.1.7", VIP, P.TCP, P.l4(P.TCP, PORT + 1)))
    assert run(miss).verdict == "XDP_DROP"

    m = scrape(api)
    for name, want in [("xdpfw_service_packets_total", 4),
                       ("xdpfw_service_bytes_total", 4 * len(pkt))]:
        got = value(m, name, **labels, outcome="forwarded") - value(
            before, name, **labels, outcome="forwarded")
        assert got == want, f"{name}{labels} grew by {got}, want {want}"
    assert value(m, "xdpfw_backend_packets_total", **be_labels) == 4
    assert value(m, "xdpfw_backend_bytes_total", **be_labels) == 4 * len(pkt)
    assert value(m, "xdpfw_service_packets_total", service=str(empty["id"]), service_name="void",
                 vip=VIP, port=str(PORT + 1), proto="tcp", outcome="no_backend") == 1

    r = api.patch(f"/api/v1/services/{svc['id']}/backends/{be['id']}", json={"weight": 0})
    assert r.status_code == 200, r.text
    m = scrape(api)
    assert value(m, "xdpfw_backend_in_table", **be_labels) == 0
    assert value(m, "xdpfw_backend_table_share", **be_labels) == 0


def lb_snapshot(api: TestClient, lb: LoadBalancer) -> tuple:
    """What a refused change must leave as it was: the API's view, the store and the maps."""
    store = lb.registry.store
    with lb.lock:
        slots = {s.rec.slot: [b.rec.slot for b in s.backends.values()]
                 for s in lb.list_services()}
    return (
        api.get("/api/v1/services").json(),
        api.get("/api/v1/cpu-steer").json(),
        store.load_services(), store.load_backends(), store.get_setting("cpu_steer"),
        {k: bytes(v) for k, v in lb.maps.service_entries().items()},
        {s: lb.maps.read_row(s) for s in slots},
        {b: bytes(lb.maps.get_backend(b)) for bs in slots.values() for b in bs},
        bytes(lb.maps.get_config()),
    )


def test_a_failed_commit_changes_no_service(api, lb, run):
    """COMMIT fails (disk full) after the maps were written: every change is undone, and a
    proxy service keeps the engine it had (its connections are not cut)."""
    from tests.test_api_limits import FailingCommit

    svc = create(api, backends=[{"address": BACKEND}])
    be = svc["backends"][0]
    proxied = create(api, vip="10.97.0.1", port=8080, forward="proxy",
                     backends=[{"address": BACKEND}])
    engine = lb.registry.proxies.engines[proxied["id"]]
    pkt = P.eth(P.ETH_IP, P.ipv4("10.97.1.7", VIP, P.TCP, P.l4(P.TCP, PORT)))
    assert run(pkt).verdict == "XDP_TX"
    before = lb_snapshot(api, lb)
    real = lb.registry.store._db
    lb.registry.store._db = FailingCommit(real)
    try:
        for method, url, body in [
            ("DELETE", f"/api/v1/services/{svc['id']}", None),
            ("PATCH", f"/api/v1/services/{svc['id']}/backends/{be['id']}", {"weight": 0}),
            ("DELETE", f"/api/v1/services/{svc['id']}/backends/{be['id']}", None),
            ("PUT", "/api/v1/cpu-steer", {"cpus": [0]}),
            ("DELETE", f"/api/v1/services/{proxied['id']}", None),
        ]:
            r = api.request(method, url, json=body)
            assert r.status_code == 507, f"{method} {url}: {r.status_code} {r.text}"
            assert lb_snapshot(api, lb) == before, f"{method} {url} changed state"
    finally:
        lb.registry.store._db = real
    assert not real.in_transaction
    assert lb.registry.proxies.engines[proxied["id"]] is engine, "the engine was restarted"
    assert run(pkt).verdict == "XDP_TX", "the service stopped forwarding"
