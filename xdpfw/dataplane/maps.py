"""Writes compiled rules and interface settings into the firewall's maps; reads its counters.

Byte order is converted here, and only here. Bulk writes go through BPF_MAP_UPDATE_BATCH
with keys and values packed straight into ctypes buffers.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import os
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import compress, repeat
from operator import itemgetter, not_

from xdpfw.dataplane import abi
from xdpfw.dataplane.fw_config import FwConfig
from xdpfw.dataplane.pins import PinIdentity
from xdpfw.dataplane.progs import map_spec, obj_get
from xdpfw.errors import MapFullError, XdpfwError
from xdpfw.rules.compile import STRICT, Changes, PortKey, PrefixValue
from xdpfw.rules.model import V4, Prefix

_V4_KEY = struct.Struct("<I4s")
_V6_KEY = struct.Struct("<I16s")
_PREFIX_VALUE = struct.Struct("<IIB3x")
_PORT_KEY = struct.Struct("<IBBH")
_PORT_VALUE = struct.Struct("<IB3x")
BATCH_CHUNK = 1 << 16
PARALLEL_WRITES_FROM = 50_000  # entries in one change before maps are written in parallel
COUNTER_BATCH = 4096  # counter slots per BPF_MAP_LOOKUP_BATCH call
FULL_ERRNOS = (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)


def _lib():
    from bcc.libbcc import lib  # the C library BCC wraps; gives us errno

    return lib


def _check(rc: int, what: str, map_name: str) -> None:
    if rc == 0:
        return
    err = ctypes.get_errno() or -rc
    if err in FULL_ERRNOS:
        raise MapFullError(f"map {map_name} is full ({os.strerror(err)}) while {what}")
    raise XdpfwError(f"{what} in map {map_name} failed: {os.strerror(err)} (errno {err})")


def pack_port_key(key: PortKey) -> bytes:
    port_set, proto, dport = key
    if (proto, dport) == STRICT:
        return _PORT_KEY.pack(port_set, 0, abi.PORT_STRICT, 0)
    return _PORT_KEY.pack(port_set, proto, abi.PORT_MATCH, _htons(dport))  # dport travels be


def unpack_port_key(raw: bytes) -> PortKey:
    port_set, proto, kind, dport = _PORT_KEY.unpack(raw)
    if kind == abi.PORT_STRICT:
        return (port_set, *STRICT)
    return (port_set, proto, _htons(dport))


assert array("I").itemsize == 4, "the packing below assumes 32-bit unsigned ints"


def _be32(values: list[int]) -> bytes:
    """uint32s in network order, packed in C."""
    arr = array("I", values)
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tobytes()


def _values(entries: list[tuple[Prefix, PrefixValue]]) -> bytes:
    """struct prefix_verdict {u32 rule_slot; u32 port_set; u8 action; u8 pad[3]} per entry,
    as three little-endian u32 columns (action and its zero padding read as one u32)."""
    out = array("I", bytes(12 * len(entries)))
    out[0::3] = array("I", _column(entries, 1, 0))
    out[1::3] = array("I", _column(entries, 1, 2))
    out[2::3] = array("I", _column(entries, 1, 1))
    return out.tobytes()


def _column(entries: list, outer: int, inner: int) -> list:
    """[e[outer][inner] for e in entries], through itemgetter in C."""
    return list(map(itemgetter(inner), map(itemgetter(outer), entries)))


def _partition(items: list[tuple[Prefix, PrefixValue]]) -> tuple[list, list, list, list]:
    """(IPv4 hosts, IPv4 prefixes, IPv6 hosts, IPv6 prefixes), split in C when the change is
    IPv4 only (a blocklist usually is): compress() over masks made by map()."""
    prefixes = list(map(itemgetter(0), items))
    families = set(map(itemgetter(0), prefixes))
    if families <= {V4}:
        hosts = list(map((32).__eq__, map(itemgetter(2), prefixes)))
        return (
            list(compress(items, hosts)),
            list(compress(items, map(operator.not_, hosts))),
            [],
            [],
        )
    h4 = [(p, v) for p, v in items if p.family == V4 and p.length == 32]
    t4 = [(p, v) for p, v in items if p.family == V4 and p.length < 32]
    h6 = [(p, v) for p, v in items if p.family != V4 and p.length == 128]
    t6 = [(p, v) for p, v in items if p.family != V4 and p.length < 128]
    return h4, t4, h6, t6


def _htons(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


class MapHandle:
    """Raw access to one map: fd, key/value sizes, batch and single-element operations.

    Handles opened from the pins (`open_map`) own their fd, so they stay valid whichever
    build of the program is loaded: an upgrade swaps programs, never these."""

    def __init__(self, fd: int, name: str, key_size: int, value_size: int,
                 max_entries: int = 0, owned: bool = False) -> None:
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self._owned = owned

    @classmethod
    def of_table(cls, table, name: str, key_size: int, value_size: int) -> MapHandle:
        """A handle on a BCC table's fd (lives as long as the BCC object; benchmarks)."""
        return cls(table.map_fd, name, key_size, value_size, table.max_entries)

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def update_many(self, keys: bytes, values: bytes, count: int) -> None:
        if count == 0:
            return
        lib = _lib()
        for start in range(0, count, BATCH_CHUNK):
            n = min(BATCH_CHUNK, count - start)
            kb = ctypes.create_string_buffer(
                keys[start * self.key_size : (start + n) * self.key_size], n * self.key_size
            )
            vb = ctypes.create_string_buffer(
                values[start * self.value_size : (start + n) * self.value_size],
                n * self.value_size,
            )
            cnt = ctypes.c_uint32(n)
            rc = lib.bpf_update_batch(self.fd, kb, vb, ctypes.byref(cnt))
            _check(rc, f"writing {count} entries", self.name)

    def delete(self, key: bytes) -> bool:
        """Delete one key; False when it was not there."""
        kb = ctypes.create_string_buffer(key, len(key))
        rc = _lib().bpf_delete_elem(self.fd, kb)
        if rc != 0 and ctypes.get_errno() == errno.ENOENT:
            return False
        _check(rc, "deleting an entry", self.name)
        return True

    def update(self, key: bytes, value: bytes) -> None:
        kb = ctypes.create_string_buffer(key, len(key))
        vb = ctypes.create_string_buffer(value, len(value))
        _check(_lib().bpf_update_elem(self.fd, kb, vb, 0), "writing an entry", self.name)

    def lookup(self, key: bytes) -> bytes | None:
        kb = ctypes.create_string_buffer(key, len(key))
        vb = ctypes.create_string_buffer(self.value_size)
        if _lib().bpf_lookup_elem(self.fd, kb, vb) != 0:
            return None
        return vb.raw

    def has_keys(self) -> bool:
        buf = ctypes.create_string_buffer(self.key_size)
        return _lib().bpf_get_first_key(self.fd, buf, self.key_size) == 0

    def batches(self, batch: int = 8192) -> Iterator[tuple[bytes, bytes]]:
        """(keys, values) per BPF_MAP_LOOKUP_BATCH call, each side concatenated (hash
        and array maps; an array's keys come in index order). One syscall a batch, not one
        an entry."""
        lib = _lib()
        keys = ctypes.create_string_buffer(self.key_size * batch)
        values = ctypes.create_string_buffer(self.value_size * batch)
        in_batch, out_batch = ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            count = ctypes.c_uint32(batch)
            rc = lib.bpf_lookup_batch(
                self.fd, None if first else ctypes.byref(in_batch), ctypes.byref(out_batch),
                keys, values, ctypes.byref(count),
            )
            err = ctypes.get_errno() if rc != 0 else 0
            if rc != 0 and err != errno.ENOENT:
                raise OSError(err, f"reading map {self.name} in batches failed")
            n = count.value
            yield keys.raw[: n * self.key_size], values.raw[: n * self.value_size]
            if rc != 0 or n == 0:  # ENOENT: the last batch
                return
            first = False
            in_batch.value = out_batch.value

    def dump(self) -> tuple[bytes, bytes]:
        """Every key and every value, each concatenated."""
        parts = list(self.batches())
        return b"".join(k for k, _ in parts), b"".join(v for _, v in parts)

    def all_keys(self) -> list[bytes]:
        """Every key, by get_next_key (the LPM trie has no batch lookup)."""
        lib = _lib()
        out: list[bytes] = []
        cur = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        rc = lib.bpf_get_first_key(self.fd, nxt, self.key_size)
        while rc == 0:
            out.append(nxt.raw)
            ctypes.memmove(cur, nxt, self.key_size)
            rc = lib.bpf_get_next_key(self.fd, cur, nxt)
        return out


def read_percpu_counters(
    handle: MapHandle, ncpus: int, upto: int
) -> Iterator[tuple[int, int, int]]:
    """(slot, packets, bytes) for slots [0, upto) of a per-CPU counter array, summed over CPUs,
    zeros skipped; in batches of COUNTER_BATCH slots (one syscall each, not one per slot)."""
    vsize = handle.value_size  # ncpus * sizeof(struct counter)
    unpack = struct.Struct(f"<{2 * ncpus}Q").unpack_from
    for keys, values in handle.batches(COUNTER_BATCH):
        for i, slot in enumerate(array("I", keys)):
            if slot >= upto:
                return
            vals = unpack(values, i * vsize)
            packets = sum(vals[0::2])
            if packets:
                yield slot, packets, sum(vals[1::2])


PERCPU_TYPES = (5, 6, 10)  # BPF_MAP_TYPE_PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH


def possible_cpus() -> int:
    """What the kernel sizes per-CPU values by (not the online count)."""
    with open("/sys/devices/system/cpu/possible") as f:
        return sum(int(b) - int(a) + 1 if "-" in r else 1
                   for r in f.read().strip().split(",") for a, _, b in [r.partition("-")])


def open_map(pin_dir: str, name: str) -> MapHandle:
    """A pinned map, with an fd of its own: the kernel's description sizes it (a per-CPU
    value is one 8-byte-aligned element per possible CPU), checked against abi.MAP_TYPES."""
    fd = obj_get(f"{pin_dir}/{name}")
    spec = map_spec(fd)
    key_t, _ = abi.MAP_TYPES[name]
    if spec.key_size != ctypes.sizeof(key_t):
        os.close(fd)
        raise XdpfwError(f"pinned map {name} has {spec.key_size}-byte keys, "
                         f"abi.py says {ctypes.sizeof(key_t)}")
    value_size = spec.value_size
    if spec.type in PERCPU_TYPES:
        value_size = (value_size + 7) // 8 * 8 * possible_cpus()
    return MapHandle(fd, name, spec.key_size, value_size, spec.max_entries, owned=True)


PackedWrites = list[tuple[MapHandle, bytes, bytes, int]]  # (map, keys, values, count)


class FirewallMaps:
    """The firewall's maps, opened from their pins (shared by every build and instance)."""

    def __init__(self, config) -> None:
        self._handles: list[MapHandle] = []

        def handle(name: str) -> MapHandle:
            h = open_map(config.pin_dir, name)
            self._handles.append(h)
            return h

        self.rules_v4 = handle("rules_v4")
        self.rules_v6 = handle("rules_v6")
        self.hosts_v4 = handle("hosts_v4")
        self.hosts_v6 = handle("hosts_v6")
        self.port_rules = handle("port_rules")
        self.iface_policy = handle("iface_policy")
        self.chain_progs = handle("chain_progs")
        self.rule_counters = handle("rule_counters")
        self.reason_counters = handle("reason_counters")
        self.iface_counters = handle("iface_counters")
        self.fw_config = FwConfig(handle("fw_config"), self.hosts_v4, handle("hostless_v4"))
        self.identity = PinIdentity(handle("pin_identity"))
        self.ncpus = self.rule_counters.value_size // ctypes.sizeof(abi.Counter)
        self.max_ifaces = config.max_ifaces

    def close(self) -> None:
        for h in self._handles:
            h.close()

    # -- rules ----------------------------------------------------------------------------

    def apply(self, ch: Changes) -> None:
        """Write a compiled change set. Order matters for packets in flight: new port entries
        exist before the prefixes that point at them; stale ones go after."""
        if ch.ports:
            self._write_ports(ch.ports.items())
        self._write_prefixes(ch.prefixes.items())
        emptied = set()
        for p in ch.deleted_prefixes:
            handle, key = self._where(p)
            handle.delete(key)
            emptied.add(handle)
        hosts = [p.net for p in ch.deleted_prefixes if p.family == V4 and p.length == 32]
        self.fw_config.refresh(emptied, deleted_hosts_v4=hosts)
        for k in ch.deleted_ports:
            self.port_rules.delete(pack_port_key(k))

    def _where(self, p: Prefix) -> tuple[MapHandle, bytes]:
        """The map and key of a prefix: full-length ones go to the host hashes."""
        if p.family == V4:
            if p.length == 32:
                return self.hosts_v4, p.net.to_bytes(4, "big")
            return self.rules_v4, _V4_KEY.pack(p.length, p.net.to_bytes(4, "big"))
        if p.length == 128:
            return self.hosts_v6, p.net.to_bytes(16, "big")
        return self.rules_v6, _V6_KEY.pack(p.length, p.net.to_bytes(16, "big"))

    def _write_prefixes(self, items: Iterable[tuple[Prefix, PrefixValue]]) -> None:
        self.write_packed(self.pack_prefixes(items))

    def pack_prefixes(self, items: Iterable[tuple[Prefix, PrefixValue]]) -> PackedWrites:
        """Keys and values for each map, packed column-wise with array slices (in C), not one
        struct.pack per entry: a million-entry load is otherwise a second of Python. Packing is
        Python (it holds the GIL); write_packed is syscalls (it does not)."""
        h4, t4, h6, t6 = _partition(list(items))
        writes: PackedWrites = []
        if h4:
            writes.append((self.hosts_v4, _be32(_column(h4, 0, 1)), _values(h4), len(h4)))
        if t4:
            keys = array("I", bytes(8 * len(t4)))
            keys[0::2] = array("I", _column(t4, 0, 2))
            keys[1::2] = array("I", _be32(_column(t4, 0, 1)))
            writes.append((self.rules_v4, keys.tobytes(), _values(t4), len(t4)))
        if h6:
            keys6 = b"".join([p.net.to_bytes(16, "big") for p, _ in h6])
            writes.append((self.hosts_v6, keys6, _values(h6), len(h6)))
        if t6:
            keys6 = b"".join([_V6_KEY.pack(p.length, p.net.to_bytes(16, "big")) for p, _ in t6])
            writes.append((self.rules_v6, keys6, _values(t6), len(t6)))
        return writes

    def pack_plain(self, prefixes: list[Prefix], slots: list[int], action: int) -> PackedWrites:
        """pack_prefixes for plain rules of one action, from their columns: each entry is
        (slot, action, no port set), so no per-entry verdict tuple is built or taken apart.
        Only for an index with no port rules (RuleIndex.plain_only), where that is exactly
        what compiling them yields."""
        if not set(map(itemgetter(0), prefixes)) <= {V4}:
            entries = list(zip(prefixes, zip(slots, repeat(action), repeat(0)), strict=False))
            return self.pack_prefixes(entries)
        hosts = list(map((32).__eq__, map(itemgetter(2), prefixes)))
        nets = list(map(itemgetter(1), prefixes))
        writes: PackedWrites = []
        for handle, mask in ((self.hosts_v4, hosts), (self.rules_v4, list(map(not_, hosts)))):
            n = sum(mask)
            if not n:
                continue
            group_nets = list(compress(nets, mask))
            if handle is self.hosts_v4:
                keys = _be32(group_nets)
            else:
                arr = array("I", bytes(8 * n))
                arr[0::2] = array("I", compress(map(itemgetter(2), prefixes), mask))
                arr[1::2] = array("I", _be32(group_nets))
                keys = arr.tobytes()
            values = array("I", bytes(12 * n))
            values[0::3] = array("I", compress(slots, mask))
            values[2::3] = array("I", repeat(action, n))
            writes.append((handle, keys, values.tobytes(), n))
        return writes

    def write_packed(self, writes: PackedWrites) -> None:
        hosts = b"".join(k for h, k, _, n in writes if h is self.hosts_v4 and n)
        with self.fw_config.writing([h for h, _, _, n in writes if n], host_keys_v4=hosts):
            if sum(n for *_, n in writes) < PARALLEL_WRITES_FROM or len(writes) < 2:
                for handle, keys, values, n in writes:
                    handle.update_many(keys, values, n)
                return
            # Large loads: the inserts are kernel time (the GIL is released in the syscall),
            # and each map has its own lock, so the maps are written side by side.
            with ThreadPoolExecutor(len(writes), thread_name_prefix="xdpfw-map") as pool:
                for f in [pool.submit(h.update_many, k, v, n) for h, k, v, n in writes]:
                    f.result()

    def source_maps(self) -> tuple[MapHandle, ...]:
        return (self.hosts_v4, self.rules_v4, self.hosts_v6, self.rules_v6)

    def _write_ports(self, items: Iterable[tuple[PortKey, tuple[int, int]]]) -> None:
        keys, vals = [], []
        for key, (slot, action) in items:
            keys.append(pack_port_key(key))
            vals.append(_PORT_VALUE.pack(slot, action))
        self.port_rules.update_many(b"".join(keys), b"".join(vals), len(keys))

    def rules_empty(self) -> bool:
        return not any(h.has_keys() for h in self.source_maps())

    def prefix_keys(self) -> list[Prefix]:
        """What the tries and host hashes hold now (to remove entries no rule explains)."""
        out = []
        for handle, family, size in ((self.rules_v4, V4, 4), (self.rules_v6, 6, 16)):
            for raw in handle.all_keys():
                length = int.from_bytes(raw[:4], "little")
                out.append(Prefix(family, int.from_bytes(raw[4 : 4 + size], "big"), length))
        for handle, family, bits in ((self.hosts_v4, V4, 32), (self.hosts_v6, 6, 128)):
            out.extend(
                Prefix(family, int.from_bytes(raw, "big"), bits) for raw in handle.all_keys()
            )
        return out

    def port_keys(self) -> list[PortKey]:
        return [unpack_port_key(raw) for raw in self.port_rules.all_keys()]

    # -- interfaces -----------------------------------------------------------------------

    def set_policy(self, slot: int, policy: int, unparsed: int, flags: int) -> None:
        """The policy of the interface whose instance serves `slot` (0: the test instance)."""
        cfg = abi.IfacePolicy(policy=policy, unparsed_policy=unparsed, flags=flags)
        self.iface_policy.update(struct.pack("<I", slot), bytes(cfg))

    def clear_policy(self, slot: int) -> None:
        """All zero: pass everything (array entries cannot be deleted)."""
        self.iface_policy.update(struct.pack("<I", slot), bytes(abi.IfacePolicy()))

    def policy(self, slot: int) -> abi.IfacePolicy:
        raw = self.iface_policy.lookup(struct.pack("<I", slot))
        return abi.IfacePolicy.from_buffer_copy(raw) if raw else abi.IfacePolicy()

    def set_chain(self, slot: int, prog_fd: int) -> None:
        """Run prog_fd after this interface's pass verdicts (the map holds its own reference)."""
        self.chain_progs.update(struct.pack("<I", slot), struct.pack("<i", prog_fd))

    def clear_chain(self, slot: int) -> None:
        self.chain_progs.delete(struct.pack("<I", slot))

    def chain_id(self, slot: int) -> int | None:
        """Id of the program chained behind `slot` (a prog array reads back ids, not fds)."""
        raw = self.chain_progs.lookup(struct.pack("<I", slot))
        return struct.unpack("<I", raw)[0] if raw else None

    # -- counters -------------------------------------------------------------------------

    def _sum(self, raw: bytes | None) -> tuple[int, int]:
        if raw is None:
            return (0, 0)
        vals = struct.unpack(f"<{2 * self.ncpus}Q", raw[: 16 * self.ncpus])
        return (sum(vals[0::2]), sum(vals[1::2]))

    def counter(self, handle: MapHandle, index: int) -> tuple[int, int]:
        return self._sum(handle.lookup(struct.pack("<I", index)))

    def rule_counter(self, slot: int) -> tuple[int, int]:
        return self.counter(self.rule_counters, slot)

    def matched_rule_counters(self, upto: int) -> Iterator[tuple[int, int, int]]:
        """(slot, packets, bytes) of every slot below `upto` that counted anything."""
        return read_percpu_counters(self.rule_counters, self.ncpus, upto)

    def reset_rule_counter(self, slot: int) -> None:
        """A reused slot starts from zero: it belongs to a new rule."""
        self.rule_counters.update(struct.pack("<I", slot), bytes(self.rule_counters.value_size))

    def reset_rule_counters(self, slots: Sequence[int]) -> None:
        if not slots:
            return
        zero = bytes(self.rule_counters.value_size)
        keys = array("I", slots).tobytes()
        for start in range(0, len(slots), BATCH_CHUNK):  # bounds the zero buffer
            n = min(BATCH_CHUNK, len(slots) - start)
            self.rule_counters.update_many(keys[4 * start : 4 * (start + n)], zero * n, n)

    def reason_totals(self) -> dict[str, tuple[int, int]]:
        return {
            name: self.counter(self.reason_counters, idx)
            for idx, name in abi.REASON_NAMES.items()
        }

    def iface_totals(self, slot: int) -> dict[str, tuple[int, int]]:
        base = slot * abi.IFACE_COUNTERS
        return {
            "passed": self.counter(self.iface_counters, base + abi.IFACE_PASSED),
            "dropped": self.counter(self.iface_counters, base + abi.IFACE_DROPPED),
            "forwarded": self.counter(self.iface_counters, base + abi.IFACE_FORWARDED),
        }

    def reset_iface_counters(self, slot: int) -> None:
        zero = bytes(self.iface_counters.value_size)
        for i in range(abi.IFACE_COUNTERS):
            self.iface_counters.update(struct.pack("<I", slot * abi.IFACE_COUNTERS + i), zero)
