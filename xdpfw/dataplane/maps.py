"""Writes compiled rules and interface settings into the firewall's maps; reads its counters.

Byte order is converted here, and only here. Bulk writes go through BPF_MAP_UPDATE_BATCH
with keys and values packed straight into ctypes buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np

from xdpfw.dataplane import abi
from xdpfw.dataplane.fw_config import FwConfig
from xdpfw.dataplane.pins import PinIdentity
from xdpfw.dataplane.progs import map_spec, obj_get
from xdpfw.dataplane.v4table import ParentOf, ParentsOf, V4Table, pack_verdict
from xdpfw.errors import MapFullError, XdpfwError
from xdpfw.rules.compile import STRICT, Changes, PortKey, PrefixValue
from xdpfw.rules.model import V4, Prefix
from xdpfw.rules.table import Prefixes

_V6_KEY = struct.Struct("<I16s")
_PORT_KEY = struct.Struct("<IBBH")
_PORT_VALUE = struct.Struct("<IB3x")
BATCH_CHUNK = 1 << 16
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

    @contextlib.contextmanager
    def mapped(self, dtype, lo: int = 0, hi: int | None = None) -> Iterator[np.ndarray]:
        """Elements [lo, hi) of a BPF_F_MMAPABLE array as a numpy array over the kernel's own
        memory, for the duration of the block. Writes are plain stores: an aligned 8-byte
        element is written whole (x86-64), and stores become visible in program order.
        Only the pages of [lo, hi) are mapped: the kernel fills the page tables of a whole
        mapping at mmap time, so mapping 128 MiB for one word cost ~10 ms, and the pages do
        not stay in the daemon's resident set. A struct value (v4_tbl8's 256 ids) is
        value_size / itemsize items in a row."""
        if self.value_size % 8:
            raise XdpfwError(f"{self.name}: an array's elements are 8-byte aligned, so a "
                             f"{self.value_size}-byte value would leave gaps in the mapping")
        hi = self.max_entries if hi is None else hi
        start, end = lo * self.value_size, hi * self.value_size
        offset = start // mmap.PAGESIZE * mmap.PAGESIZE
        length = (end - offset + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        mm = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=offset)
        item = np.dtype(dtype).itemsize
        view = np.frombuffer(mm, dtype=dtype, count=(end - start) // item,
                             offset=start - offset)
        try:
            yield view
        except BaseException:
            del view
            # The exception's traceback may hold the block's own reference to the view: the
            # mapping then goes with it, and the exception, not a BufferError, is what shows.
            with contextlib.suppress(BufferError):
                mm.close()
            raise
        del view  # no export may outlive the mapping
        mm.close()

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

    def read_array(self, start: int, count: int) -> bytes:
        """Values of array indexes [start, start + count), concatenated: an array map's batch
        token is the last index read (the kernel continues after it), so a batch lookup can
        start anywhere."""
        lib = _lib()
        out = []
        batch = min(count, 1 << 16)
        keys = ctypes.create_string_buffer(self.key_size * batch)
        values = ctypes.create_string_buffer(self.value_size * batch)
        in_batch, out_batch = ctypes.c_uint32(max(start - 1, 0)), ctypes.c_uint32(0)
        first = start == 0  # no token: from index 0
        left = count
        while left > 0:
            n = ctypes.c_uint32(min(batch, left))
            rc = lib.bpf_lookup_batch(self.fd, None if first else ctypes.byref(in_batch),
                                      ctypes.byref(out_batch), keys, values, ctypes.byref(n))
            first = False
            err = ctypes.get_errno() if rc != 0 else 0
            if rc != 0 and err != errno.ENOENT:
                raise OSError(err, f"reading map {self.name} from index {start} failed")
            out.append(values.raw[: n.value * self.value_size])
            left -= n.value
            if rc != 0 or n.value == 0:
                break
            in_batch.value = out_batch.value
        return b"".join(out)

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


@dataclass(frozen=True)
class RebuildReport:
    """What FirewallMaps.rebuild found and did."""

    v4_prefixes: int
    v4_words: int  # /24 entries written
    v4_changed: list[int]  # /24s whose verdict changed (when asked to explain)
    v6_removed: list[Prefix]  # entries no rule explains
    ports_removed: int

    def __str__(self) -> str:
        return (f"{self.v4_prefixes} IPv4 prefixes laid out, {self.v4_words} /24 entries "
                f"written; {len(self.v6_removed)} IPv6 and {self.ports_removed} port entries "
                "no rule explains removed")

    def removed(self) -> str:
        """What was enforced and no longer is, for the log; '' when nothing."""
        parts = []
        if self.v4_changed:
            shown = ", ".join(f"{s >> 16}.{(s >> 8) & 255}.{s & 255}.0/24"
                              for s in self.v4_changed[:20])
            more = " ..." if len(self.v4_changed) > 20 else ""
            parts.append(f"{len(self.v4_changed)} IPv4 /24s changed verdict: {shown}{more}")
        if self.v6_removed:
            shown = ", ".join(map(str, self.v6_removed[:20]))
            more = " ..." if len(self.v6_removed) > 20 else ""
            parts.append(f"removed {len(self.v6_removed)} IPv6 prefixes: {shown}{more}")
        if self.ports_removed:
            parts.append(f"removed {self.ports_removed} port entries")
        return "; ".join(parts)


class FirewallMaps:
    """The firewall's maps, opened from their pins (shared by every build and instance)."""

    def __init__(self, config) -> None:
        self._handles: list[MapHandle] = []

        def handle(name: str) -> MapHandle:
            h = open_map(config.pin_dir, name)
            self._handles.append(h)
            return h

        self.v4_tbl24 = handle("v4_tbl24")
        self.v4_tbl8 = handle("v4_tbl8")
        self.v4_verdicts = handle("v4_verdicts")
        self.rules_v6 = handle("rules_v6")
        self.hosts_v6 = handle("hosts_v6")
        self.port_rules = handle("port_rules")
        self.iface_policy = handle("iface_policy")
        self.chain_progs = handle("chain_progs")
        self.rule_counters = handle("rule_counters")
        self.reason_counters = handle("reason_counters")
        self.iface_counters = handle("iface_counters")
        self.fw_config = FwConfig(handle("fw_config"), self.hosts_v6, handle("hostless_v6"))
        self.identity = PinIdentity(handle("pin_identity"))
        self.v4 = V4Table(self.v4_tbl24, self.v4_tbl8, self.v4_verdicts,
                          self.identity.read().generation)
        self.ncpus = self.rule_counters.value_size // ctypes.sizeof(abi.Counter)
        self.max_ifaces = config.max_ifaces
        self.port_set_half = config.max_port_rules  # port set ids come in two halves

    def close(self) -> None:
        self.fw_config.close()
        for h in self._handles:
            h.close()

    # -- rules ----------------------------------------------------------------------------

    def apply(self, ch: Changes, parent_of: ParentOf) -> None:
        """Write a compiled change set. Order matters for packets in flight: new port entries
        exist before the prefixes that point at them; stale ones go after. parent_of: see
        V4Table.apply."""
        if ch.ports:
            self._write_ports(ch.ports.items())
        v4_sets = {(p.net, p.length): pack_verdict(slot, act, ps)
                   for p, (slot, act, ps) in ch.prefixes.items() if p.family == V4}
        v4_gone = [(p.net, p.length) for p in ch.deleted_prefixes if p.family == V4]
        if v4_sets or v4_gone:
            self.v4.apply(v4_sets, v4_gone, parent_of)
        self._write_v6([(p, v) for p, v in ch.prefixes.items() if p.family != V4])
        self._delete_v6([p for p in ch.deleted_prefixes if p.family != V4])
        for k in ch.deleted_ports:
            self.port_rules.delete(pack_port_key(k))

    def _delete_v6(self, prefixes: Sequence[Prefix]) -> None:
        emptied, hosts_gone = set(), False
        for p in prefixes:
            handle, key = self._where6(p)
            handle.delete(key)
            emptied.add(handle)
            hosts_gone |= p.length == 128
        if emptied:
            self.fw_config.refresh(emptied, deleted_hosts_v6=hosts_gone)

    def apply_plain(self, put: Prefixes, slots: np.ndarray, actions: np.ndarray,
                    gone: Prefixes, parents: ParentsOf) -> None:
        """Plain rules in (`put`: new entries laid out, existing ones changed in place) and
        prefixes out (`gone`), from columns, in the order that keeps covered every address
        covered before and after: every entry is written before any goes. Only for an index
        with no port rules (RuleIndex.plain_only), where each entry is its rule's own
        verdict. parents: the IPv4 prefixes that cover the gone ones afterwards."""
        self._write_plain(put, slots, actions, self.v4.put)
        g4 = gone.family == V4
        if g4.any():
            self.v4.remove(gone.lo[g4].astype(np.uint32), gone.plen[g4], parents)
        if not g4.all():
            self._delete_v6([gone.prefix(i) for i in np.nonzero(~g4)[0].tolist()])

    def reserve(self, v4_prefixes: int) -> None:
        """Room for this many more IPv4 entries, allocated once (before a bulk add)."""
        self.v4.vid.reserve(v4_prefixes)

    def add_plain(self, prefixes: Prefixes, slots: np.ndarray, actions: np.ndarray) -> None:
        """Plain rules (slot, action, no port set each), from their columns: IPv4 through
        numpy into the DIR-24-8 layout, no per-rule object built. Only for an index with no
        port rules (RuleIndex.plain_only), where that is exactly what compiling them
        yields."""
        self._write_plain(prefixes, slots, actions, self.v4.add)

    def _write_plain(self, prefixes: Prefixes, slots: np.ndarray, actions: np.ndarray,
                     write_v4: Callable[[np.ndarray, np.ndarray, np.ndarray], None]) -> None:
        """Plain rules' entries: IPv4 as packed verdicts through `write_v4` (V4Table.add for
        new prefixes, .put where some may exist), IPv6 one by one."""
        v4 = prefixes.family == V4
        slots = np.asarray(slots, dtype=np.uint64)
        actions = np.asarray(actions, dtype=np.uint64)
        if v4.any():
            packed = (slots[v4] & np.uint64(abi.PV_SLOT_MASK)) | (
                actions[v4] << np.uint64(abi.PV_ACT_SHIFT))
            write_v4(prefixes.lo[v4].astype(np.uint32), prefixes.plen[v4], packed)
        if not v4.all():
            self._write_v6([(prefixes.prefix(i), (int(slots[i]), int(actions[i]), 0))
                            for i in np.nonzero(~v4)[0].tolist()])

    def _where6(self, p: Prefix) -> tuple[MapHandle, bytes]:
        """The map and key of an IPv6 prefix: /128s go to the host hash."""
        if p.length == 128:
            return self.hosts_v6, p.net.to_bytes(16, "big")
        return self.rules_v6, _V6_KEY.pack(p.length, p.net.to_bytes(16, "big"))

    def _write_v6(self, items: list[tuple[Prefix, PrefixValue]]) -> None:
        if not items:
            return
        hosts = [(p, v) for p, v in items if p.length == 128]
        tries = [(p, v) for p, v in items if p.length < 128]
        host_keys = b"".join([p.net.to_bytes(16, "big") for p, _ in hosts])
        with self.fw_config.writing(
            [h for h, part in ((self.hosts_v6, hosts), (self.rules_v6, tries)) if part],
            host_keys_v6=host_keys,
        ):
            if hosts:
                self.hosts_v6.update_many(host_keys, _values(hosts), len(hosts))
            if tries:
                keys = b"".join([_V6_KEY.pack(p.length, p.net.to_bytes(16, "big"))
                                 for p, _ in tries])
                self.rules_v6.update_many(keys, _values(tries), len(tries))

    def source_maps(self) -> tuple[MapHandle, ...]:
        """The maps fw_config's skip bits stand for (IPv6: IPv4 has no empty-map cost)."""
        return (self.hosts_v6, self.rules_v6)

    def _write_ports(self, items: Iterable[tuple[PortKey, tuple[int, int]]]) -> None:
        keys, vals = [], []
        for key, (slot, action) in items:
            keys.append(pack_port_key(key))
            vals.append(_PORT_VALUE.pack(slot, action))
        self.port_rules.update_many(b"".join(keys), b"".join(vals), len(keys))

    def rebuild(self, index, store_id: int, state_dir: str,
                explain: bool = False) -> RebuildReport:
        """Make the kernel equal to `index`, as every start does: the IPv4 layout and the port
        sets are built in the half of their id spaces the running layout does not use, then
        switched to word by word, so filtering never stops and nothing of the previous
        process's numbering needs to be known; IPv6 entries are rewritten in place, and every
        entry the index does not explain is removed. `index` must have been compiled with its
        port sets in the new half (RuleIndex(port_set_base=...); see new_generation()).
        explain: report which IPv4 /24s changed verdict (pins another store left)."""
        wanted_ports = {(index.port_set_ids[p], *pm): v
                        for p, table in index.port_entries.items() for pm, v in table.items()}
        if wanted_ports:
            self._write_ports(wanted_ports.items())
        nets, plens, packed = index.entries_v4()
        words, changed = self.v4.build(nets, plens, packed, explain)
        v6 = index.entries_v6()
        self._write_v6(list(v6.items()))
        stale6 = [p for p in self._v6_keys() if p not in v6]
        for p in stale6:
            handle, key = self._where6(p)
            handle.delete(key)
        stale_ports = [k for k in self.port_keys() if k not in wanted_ports]
        for k in stale_ports:
            self.port_rules.delete(pack_port_key(k))
        self.fw_config.resync(self.source_maps())
        self.identity.write(store_id, state_dir, self.v4.generation)
        return RebuildReport(len(nets), words, changed, stale6, len(stale_ports))

    def prefix_keys(self) -> list[Prefix]:
        """Every prefix with an entry: IPv4 as laid out (V4Table's own account of the layout
        it wrote), IPv6 as the kernel's trie and hash hold them."""
        return [Prefix(V4, n, p) for n, p in self.v4.entries()] + self._v6_keys()

    def v4_verdict(self, addr: int) -> int:
        """The packed verdict the kernel's IPv4 layout gives `addr` (0: no rule), read from
        the maps the way the program reads them: for tests that check the kernel itself."""
        raw = self.v4_tbl24.lookup((addr >> 8).to_bytes(4, "little"))
        entry = int.from_bytes(raw, "little")
        vid, kind = entry & abi.V4_ID_MASK, entry >> abi.V4_KIND_SHIFT
        aux = (entry >> abi.V4_AUX_SHIFT) & abi.V4_ID_MASK
        if kind == abi.V4_ONE:
            extra = ((entry >> abi.V4_LEN_SHIFT) & 7) + 1
            mask = (0xFF << (8 - extra)) & 0xFF
            if (entry >> abi.V4_NET_SHIFT) & 0xFF == addr & mask:
                vid = aux
        elif kind == abi.V4_GROUP:
            raw = self.v4_tbl8.lookup(aux.to_bytes(4, "little"))
            lo = (addr & 0xFF) * 4
            vid = int.from_bytes(raw[lo:lo + 4], "little") or vid
        if not vid:
            return 0
        return int.from_bytes(self.v4_verdicts.lookup(vid.to_bytes(4, "little")), "little")

    def new_generation(self) -> int:
        """The half a rebuild lays out in: the one the kernel's layout does not use."""
        return 1 - self.v4.generation

    def _v6_keys(self) -> list[Prefix]:
        out = [Prefix(6, int.from_bytes(raw[4:20], "big"), int.from_bytes(raw[:4], "little"))
               for raw in self.rules_v6.all_keys()]
        out += [Prefix(6, int.from_bytes(raw, "big"), 128) for raw in self.hosts_v6.all_keys()]
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

    def reset_rule_counters(self, slots: Sequence[int] | np.ndarray) -> None:
        if not len(slots):
            return
        zero = bytes(self.rule_counters.value_size)
        keys = np.asarray(slots, dtype="<u4").tobytes()
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
