"""Load-balancer services in etcd: a service's key and value, the writer's guarded
transactions (on an in-memory etcd), and the sync engine's part that applies them to a real
LoadBalancer, refusing what it cannot decode alone."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from xdpfw.errors import ConflictError, NotFoundError, ServiceValidationError
from xdpfw.fleet.etcd import KeyValue, b64, unb64
from xdpfw.fleet.layout import Keys
from xdpfw.fleet.lb_layout import FleetService, decode_service, service_id_of_key
from xdpfw.fleet.lb_sync import ServiceApplier
from xdpfw.fleet.lb_writer import ServiceWriter
from xdpfw.fleet.writer import FleetWriter
from xdpfw.lb.health import HealthCheckConfig
from xdpfw.lb.model import BackendSpec, ServiceSpec
from xdpfw.lb.registry import FleetIds
from xdpfw.lb.service import LoadBalancer
from xdpfw.lb.store import HealthSpec

KEYS = Keys.under("/xdpfw/")
SPEC = ServiceSpec("10.96.0.10", 80, backends=(BackendSpec("10.96.1.1"),
                                               BackendSpec("10.96.1.2", 3, "draining")))


def _value(**over) -> bytes:
    v = {"id": 7, "vip": "10.96.0.10", "port": 80,
         "backends": [{"id": 8, "address": "10.96.1.1"}]}
    v.update(over)
    return json.dumps(v).encode()


def test_a_service_round_trips_through_its_key_and_value():
    health = HealthSpec(HealthCheckConfig("http", 1.0, 0.5, 2, 3, "/up"), 8080)
    spec = ServiceSpec("2001:db8::10", 443, "tcp", "redirect", "web", (), health, SPEC.backends)
    fs = FleetService(FleetIds(7, (8, 9)), spec)
    key = KEYS.service(7)
    assert key == b"/xdpfw/data/services/7" and service_id_of_key(KEYS, key) == 7
    got = decode_service(KEYS, key, fs.encode())
    assert got == fs and got.backend_index(9) == 1 and got.backend_index(7) is None


@pytest.mark.parametrize("key, value, why", [
    ("7", b"{not json", "not JSON"),
    ("7", b"[1]", "not a JSON object"),
    ("7", _value(backends={"id": 8}), "backends: not a list"),
    ("7", _value(id=None), "id must be"),
    ("7", _value(id=1 << 32), "id must be"),
    ("7", _value(id=True), "id must be"),
    ("8", _value(), "does not name its service"),
    ("7", _value(backends=[{"address": "10.96.1.1"}]), r"backends.0.id must be"),
    ("7", _value(backends=[5]), "backends.0: not an object"),
    ("7", _value(backends=[{"id": 8, "address": "10.96.1.1"},
                           {"id": 8, "address": "10.96.1.2"}]), "an id appears twice"),
    ("7", _value(backends=[{"id": 8, "address": "10.96.1.1"},
                           {"id": 9, "address": "10.96.1.1"}]), "address appears twice"),
    ("7", _value(vip="10.96.0.300"), "vip"),
    ("7", _value(port=0), "port"),
    ("7", _value(forward="tunnel"), "forward"),
    ("7", _value(backends=[{"id": 8, "address": "10.96.1.1", "weight": 5000}]), "weight"),
    ("7", _value(extra=1), "extra"),
    ("7", b"x" * (600 * 1024), "more than a service can be"),
])
def test_a_value_that_is_not_its_service_is_refused(key, value, why):
    with pytest.raises(ServiceValidationError, match=why):
        decode_service(KEYS, KEYS.services + key.encode(), value)


@pytest.mark.parametrize("name", [b"x", b"07", b"0", b"-1", b"4294967296", b"7/8", b""])
def test_malformed_service_keys_name_no_service(name):
    assert service_id_of_key(KEYS, KEYS.services + name) is None


# -- the writer, on an in-memory etcd ---------------------------------------------------------


class MemEtcd:
    """etcd's kv as the fleet's writers use it: get, get_prefix and a txn of MOD/CREATE
    compares with put, delete and range requests. before_txn runs once, before the next txn
    (another writer's commit in the middle of a write)."""

    def __init__(self) -> None:
        self.kv: dict[bytes, KeyValue] = {}
        self.revision = 1
        self.before_txn: Callable[[], None] | None = None
        self.txns = 0

    def get(self, key: bytes) -> tuple[int, KeyValue | None]:
        return self.revision, self.kv.get(key)

    def get_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        return self.revision, [v for k, v in sorted(self.kv.items()) if k.startswith(prefix)]

    def txn(self, compare, success, failure=None):
        hook, self.before_txn = self.before_txn, None
        if hook is not None:
            hook()
        self.txns += 1
        ok = all(self._holds(c) for c in compare)
        out = []
        for op in success if ok else failure or []:
            if "request_put" in op:
                key, value = unb64(op["request_put"]["key"]), unb64(op["request_put"]["value"])
                old = self.kv.get(key)
                self.kv[key] = KeyValue(key, value, self.revision + 1,
                                        old.create_revision if old else self.revision + 1)
            elif "request_delete_range" in op:
                self.kv.pop(unb64(op["request_delete_range"]["key"]), None)
            else:
                kv = self.kv.get(unb64(op["request_range"]["key"]))
                out.append({"response_range": {"kvs": [
                    {"key": b64(kv.key), "value": b64(kv.value)}] if kv else []}})
        if ok and success:
            self.revision += 1
        return ok, self.revision, out

    def _holds(self, c: dict) -> bool:
        kv = self.kv.get(unb64(c["key"]))
        if c["target"] == "MOD":
            return (kv.mod_revision if kv else 0) == int(c["mod_revision"])
        return (kv.create_revision if kv else 0) == int(c["create_revision"])


@pytest.fixture
def etcd() -> MemEtcd:
    return MemEtcd()


def _writer(etcd: MemEtcd) -> ServiceWriter:
    return ServiceWriter(etcd, KEYS, FleetWriter(etcd, KEYS))


def _held(etcd: MemEtcd, sid: int) -> FleetService:
    return decode_service(KEYS, KEYS.service(sid), etcd.kv[KEYS.service(sid)].value)


def test_writes_keep_ids_fleet_wide_and_move_the_fleets_revision(etcd):
    w = _writer(etcd)
    svc, rev = w.create(SPEC)
    assert svc.ids == FleetIds(1, (2, 3)) and _held(etcd, 1) == svc
    assert etcd.kv[KEYS.ids].mod_revision == rev  # the fleet's last change (lag)
    other, _ = w.create(ServiceSpec("10.96.0.11", 80))
    assert other.ids == FleetIds(4, ())
    svc, _ = w.add_backend(1, BackendSpec("10.96.1.3", 2))
    assert svc.ids.backends == (2, 3, 5) and etcd.kv[KEYS.lb_ids].value == b"5"
    w.update_backend(1, 2, None, "draining")
    w.delete_backend(1, 3)
    held = _held(etcd, 1)
    assert held.ids.backends == (2, 5)
    assert [(b.address, b.weight, b.state) for b in held.spec.backends] == [
        ("10.96.1.1", 1, "draining"), ("10.96.1.3", 2, "active")]
    _, rev = w.delete(1)
    assert KEYS.service(1) not in etcd.kv and etcd.kv[KEYS.ids].mod_revision == rev


def test_what_a_single_appliance_refuses_is_refused_before_etcd_is_written(etcd):
    w = _writer(etcd)
    w.create(SPEC)
    n = etcd.txns
    with pytest.raises(ConflictError, match=r"exists already \(id 1"):
        w.create(ServiceSpec("10.96.0.10", 80))
    with pytest.raises(ConflictError, match="appears twice"):
        w.create(ServiceSpec("10.96.0.12", 80, backends=(BackendSpec("10.96.1.1"),
                                                         BackendSpec("10.96.1.1"))))
    with pytest.raises(ConflictError, match=r"has backend 10\.96\.1\.1 already"):
        w.add_backend(1, BackendSpec("10.96.1.1"))
    with pytest.raises(NotFoundError, match="no service with id 9"):
        w.delete(9)
    with pytest.raises(NotFoundError, match="no backend with id 9"):
        w.update_backend(1, 9, 2, None)
    with pytest.raises(ServiceValidationError, match="weight"):
        w.update_backend(1, 2, 5000, None)
    assert etcd.txns == n


def test_two_writers_of_one_service_lose_no_update(etcd):
    a, b = _writer(etcd), _writer(etcd)
    a.create(SPEC)
    # b commits between a's read and a's txn: a reads again and drains on top of b's add.
    etcd.before_txn = lambda: b.add_backend(1, BackendSpec("10.96.1.3"))
    a.update_backend(1, 2, None, "draining")
    held = _held(etcd, 1)
    assert [(b.address, b.state) for b in held.spec.backends] == [
        ("10.96.1.1", "draining"), ("10.96.1.2", "draining"), ("10.96.1.3", "active")]
    # Both add one address: one wins, the other gets the 409 a single appliance gives.
    etcd.before_txn = lambda: b.add_backend(1, BackendSpec("10.96.1.4"))
    with pytest.raises(ConflictError, match=r"has backend 10\.96\.1\.4 already"):
        a.add_backend(1, BackendSpec("10.96.1.4"))
    # One deletes the service while the other drains a backend of it: 404.
    etcd.before_txn = lambda: b.delete(1)
    with pytest.raises(NotFoundError, match="no service with id 1"):
        a.update_backend(1, 2, None, "active")


def test_a_hand_written_counter_is_not_overwritten(etcd):
    etcd.kv[KEYS.lb_ids] = KeyValue(KEYS.lb_ids, b"junk", 1, 1)
    with pytest.raises(Exception, match="not the last service id"):
        _writer(etcd).create(SPEC)


# -- applying etcd's services to a real load balancer ------------------------------------------


@pytest.fixture
def lb(unresolving_lb) -> LoadBalancer:
    return unresolving_lb


def _kv(fs: FleetService | None, key: bytes | None = None, value: bytes | None = None):
    key = key or KEYS.service(fs.id)
    return KeyValue(key, value if value is not None else fs.encode(), 5, 5)


def _local(lb: LoadBalancer) -> dict:
    return {s.rec.id: (s.rec.vip, s.rec.port, {b.rec.id: (b.rec.address, b.rec.weight,
                                                          b.rec.state)
                                               for b in s.backends.values()})
            for s in lb.list_services()}


@pytest.mark.bpf
def test_etcds_services_are_applied_with_their_ids_and_unresolved_backends_kept(lb):
    ap = ServiceApplier(lb, KEYS)
    fs = FleetService(FleetIds(40, (41, 42)), SPEC)
    why, unresolved = ap.apply(KEYS.service(40), _kv(fs))
    assert why is None and len(unresolved) == 2 and "10.96.1.1" in unresolved[0]
    assert _local(lb) == {40: ("10.96.0.10", 80, {41: ("10.96.1.1", 1, "active"),
                                                   42: ("10.96.1.2", 3, "draining")})}
    assert all(b.error and not b.usable for b in lb.get_service(40).backends.values())
    # A backend drained, one deleted, one added: the same service, changed in place.
    fs2 = FleetService(FleetIds(40, (41, 43)), ServiceSpec(
        "10.96.0.10", 80, backends=(BackendSpec("10.96.1.1", 1, "draining"),
                                    BackendSpec("10.96.1.4"))))
    slot = lb.get_service(40).rec.slot
    assert ap.apply(KEYS.service(40), _kv(fs2))[0] is None
    assert _local(lb) == {40: ("10.96.0.10", 80, {41: ("10.96.1.1", 1, "draining"),
                                                   43: ("10.96.1.4", 1, "active")})}
    assert lb.get_service(40).rec.slot == slot
    # Another port: the service is made again, under its id.
    fs3 = FleetService(fs2.ids, ServiceSpec("10.96.0.10", 81, backends=fs2.spec.backends))
    assert ap.apply(KEYS.service(40), _kv(fs3))[0] is None
    assert _local(lb)[40][1] == 81 and ap.local_keys() == [KEYS.service(40)]
    assert ap.apply(KEYS.service(40), None) == (None, [])
    assert _local(lb) == {}


@pytest.mark.bpf
def test_what_a_node_cannot_apply_is_refused_alone(lb):
    ap = ServiceApplier(lb, KEYS)
    lb.create_service(ServiceSpec("10.96.0.20", 80))  # this node's own, id 60 not in etcd
    before = _local(lb)
    assert "not JSON" in ap.apply(KEYS.service(50), _kv(None, KEYS.service(50), b"{"))[0]
    assert "not a service key" in ap.apply(KEYS.services + b"x", _kv(None, KEYS.services
                                                                     + b"x", b"{}"))[0]
    assert ap.apply(KEYS.services + b"x", None) == (None, [])
    cpus = FleetService(FleetIds(50, ()), ServiceSpec("10.96.0.21", 80, cpu_steer=(4095,)))
    assert "cpu_steer" in ap.apply(KEYS.service(50), _kv(cpus))[0]
    assert _local(lb) == before
    # etcd's id wins a VIP:port this node holds under another.
    fs = FleetService(FleetIds(50, ()), ServiceSpec("10.96.0.20", 80))
    assert ap.apply(KEYS.service(50), _kv(fs))[0] is None
    assert list(_local(lb)) == [50]


@pytest.mark.bpf
def test_a_resync_makes_this_nodes_services_etcds(fw, lb, etcd, tmp_path):
    from xdpfw.fleet.cache import FleetCache
    from xdpfw.fleet.sync import SyncEngine

    mine = lb.create_service(ServiceSpec("10.96.0.30", 80))  # this node's alone: goes
    fs = FleetService(FleetIds(50, (51, 53)), SPEC)
    for key, value in [(KEYS.service(50), fs.encode()), (KEYS.service(52), b"{")]:
        etcd.kv[key] = KeyValue(key, value, 3, 3)
    cache = FleetCache(tmp_path / "cache.db")
    try:
        engine = SyncEngine(fw, etcd, KEYS, cache, ServiceApplier(lb, KEYS))
        engine._resync()
        assert mine.rec.id not in lb.services and list(_local(lb)) == [50]
        assert engine.state.refused_count == 1 and engine.state.health == "degraded"
        assert "not JSON" in engine.state.refused[KEYS.service(52).decode()]
        assert engine.state.applied == 3
    finally:
        cache.close()
