"""IPv4 source prefixes as DIR-24-8 (xdpfw_abi.h: XDPFW_V4_*), kept in the kernel's maps.

The compiler (xdpfw/rules/compile.py) resolves every prefix to a verdict; this module lays
those verdicts out so that a packet's lookup costs the same whatever the rules are:
  v4_tbl24[a >> 8]   one u64 per /24: the verdict id of the longest prefix of length <= 24
                     covering it (its *fallback*), and either nothing more (PLAIN), the one
                     prefix longer than /24 inside it (ONE), or a 256-entry group in v4_tbl8
                     for more (GROUP);
  v4_tbl8[g*256+b]   the verdict id of the longest prefix longer than /24 covering the
                     address (0: none, the /24's fallback applies);
  v4_verdicts[id]    the verdict, packed in 64 bits (XDPFW_PV_*).

The invariant that makes updates safe for packets in flight: every value a packet reads is
one aligned word, and a word is only ever written whole, in this order:
  - a verdict id is written before anything points at it, and changed in place (a port-set
    change) in one write;
  - a group's 256 entries are written before the /24's entry points at the group;
  - an id or a group that nothing points at any more is reused only after QUARANTINE_S, so
    a packet that read the old entry never meets the id's next owner.
So a packet meets either the old or the new verdict of its address, never a mix
(tests/test_v4table.py runs packets while a /8 comes and goes).

The kernel's tbl24 is the truth for each /24's entry (read back in ranges where a change
needs it); this module keeps what the kernel cannot say cheaply: each prefix's id, and the
prefixes longer than /24 of every /24 that has a group.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from xdpfw.dataplane import abi
from xdpfw.errors import MapFullError, XdpfwError
from xdpfw.rules.u64map import U64Map

QUARANTINE_S = 1.0  # packets take microseconds; a freed id waits a second before reuse
TBL24, TBL8, VERDICTS = 0, 1, 2  # the mapped arrays
MAP_BYTES = 2 << 20  # mapped at once at most (the kernel fills a mapping's page tables)
BUILD_CHUNK = 1 << 18  # /24s laid out at a time by build (2 MiB of words)
ID_MASK = np.uint64(abi.V4_ID_MASK)
FREE = 255  # vid_plen of an id no prefix holds

Prefix4 = tuple[int, int]  # (network as int, length)
ParentOf = Callable[[int, int], Prefix4 | None]
# (nets, lengths) -> (their parents' nets, lengths, and whether each has one), as columns
ParentsOf = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def pack_verdict(slot: int, action: int, port_set: int) -> int:
    """struct prefix_verdict's fields in 64 bits (XDPFW_PV_*)."""
    return ((slot & abi.PV_SLOT_MASK) | ((port_set & abi.PV_SET_MASK) << abi.PV_SET_SHIFT)
            | (action << abi.PV_ACT_SHIFT))


def key_of(net: int, plen: int) -> int:
    return (net << 6) | plen


def keys_of(nets: np.ndarray, plens: np.ndarray) -> np.ndarray:
    return (nets.astype(np.uint64) << np.uint64(6)) | plens.astype(np.uint64)


def parents_by_call(parent_of: ParentOf) -> ParentsOf:
    """A ParentsOf that asks parent_of once per prefix (for the few of an incremental
    change)."""
    def parents(nets: np.ndarray, plens: np.ndarray):
        found = [parent_of(n, p) for n, p in zip(nets.tolist(), plens.tolist(), strict=True)]
        return (np.array([f[0] if f else 0 for f in found], dtype=np.uint32),
                np.array([f[1] if f else 0 for f in found], dtype=np.uint8),
                np.array([f is not None for f in found], dtype=bool))
    return parents


def one_entry(net: int, plen: int, vid: int) -> int:
    """The kind and aux bits of a /24 whose only longer prefix is net/plen (/25 .. /32)."""
    return ((abi.V4_ONE << abi.V4_KIND_SHIFT) | ((plen - 25) << abi.V4_LEN_SHIFT)
            | ((net & 0xFF) << abi.V4_NET_SHIFT) | (vid << abi.V4_AUX_SHIFT))


class _Ids:
    """Free numbers with quarantine: released ones come back after QUARANTINE_S. Kept as
    arrays (a set replace frees half a million ids at once)."""

    def __init__(self, first: int, limit: int, what: str) -> None:
        self.next, self.limit, self.what = first, limit, what
        self.free = np.zeros(0, dtype=np.uint32)
        self.waiting: deque[tuple[float, np.ndarray]] = deque()

    def _release_due(self) -> None:
        now = time.monotonic()
        due = []
        while self.waiting and now - self.waiting[0][0] >= QUARANTINE_S:
            due.append(self.waiting.popleft()[1])
        if due:
            self.free = np.concatenate([self.free, *due])

    def _pop(self, n: int) -> np.ndarray:
        k = min(n, len(self.free))
        out = self.free[len(self.free) - k:]
        self.free = self.free[: len(self.free) - k]
        return out

    def take_many(self, n: int) -> np.ndarray:
        self._release_due()
        reused = [self._pop(n)]
        fresh = min(n - len(reused[0]), self.limit - self.next)
        new = np.arange(self.next, self.next + fresh, dtype=np.uint32)
        self.next += fresh
        got = len(reused[0]) + fresh
        while got < n:
            if not self.waiting:
                self.free = np.concatenate([self.free, *reused])
                self.next -= fresh
                raise MapFullError(f"no room for {n} more {self.what} (capacity "
                                   f"{self.limit}); raise limits in the config")
            time.sleep(max(0.0, QUARANTINE_S - (time.monotonic() - self.waiting[0][0])))
            self._release_due()
            reused.append(self._pop(n - got))
            got += len(reused[-1])
        return np.concatenate([reused[0], new, *reused[1:]])

    def take(self) -> int:
        return int(self.take_many(1)[0])

    def give(self, ids: Iterable[int] | np.ndarray) -> None:
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.uint32)
        if len(ids):
            self.waiting.append((time.monotonic(), ids.copy()))


def _spans(starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Every index of the ranges [starts, ends) that lies in [lo, hi), relative to lo. The
    ranges must not overlap each other (prefixes of one length never do)."""
    s_, e_ = np.maximum(starts, lo) - lo, np.minimum(ends, hi) - lo
    counts = np.maximum(e_ - s_, 0)
    return np.repeat(s_, counts) + (
        np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))


class _Overlaps:
    """Which ranges [starts, ends) overlap a window, without a pass over all of them per
    window: ranges shorter than a window are found by their sorted starts, the few longer
    ones are checked each time."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray) -> None:
        self.starts, self.ends = starts, ends
        big = (ends - starts) >= BUILD_CHUNK
        self.big = np.nonzero(big)[0]
        small = np.nonzero(~big)[0]
        self.small = small[np.argsort(starts[small], kind="stable")]
        self.small_starts = starts[self.small]

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        a, b = np.searchsorted(self.small_starts, [lo - BUILD_CHUNK + 1, hi])
        cand = self.small[a:b]
        cand = cand[self.ends[cand] > lo]
        big = self.big[(self.starts[self.big] < hi) & (self.ends[self.big] > lo)]
        return np.concatenate([big, cand])

    def windows(self) -> list[tuple[int, int, np.ndarray]]:
        """(lo, hi, ranges) for each BUILD_CHUNK-aligned window the ranges touch, narrowed
        to the part they cover (a single /24 reads one word, not a chunk)."""
        first = self.starts // BUILD_CHUNK
        last = (self.ends - 1) // BUILD_CHUNK
        spans = [np.arange(f, t + 1) for f, t in zip(first[self.big].tolist(),
                                                      last[self.big].tolist(), strict=True)]
        out = []
        for c in np.flatnonzero(np.bincount(np.concatenate([first, last, *spans]))).tolist():
            lo, hi = c * BUILD_CHUNK, (c + 1) * BUILD_CHUNK
            sel = self(lo, hi)
            out.append((max(int(self.starts[sel].min()), lo),
                        min(int(self.ends[sel].max()), hi), sel))
        return out


def _distinct(a: np.ndarray) -> np.ndarray:
    """np.unique by sorting (its hashing path cost more, on a few hundred thousand ints)."""
    a = np.sort(a)
    keep = np.ones(len(a), dtype=bool)
    keep[1:] = a[1:] != a[:-1]
    return a[keep]


def _by_length(sel: np.ndarray, plens: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The ranges of `sel` grouped by prefix length, shortest first."""
    lens = plens[sel]
    order = np.argsort(lens, kind="stable")
    sel, lens = sel[order], lens[order]
    cuts = np.nonzero(np.diff(lens))[0] + 1
    return [(int(g_lens[0]), g) for g, g_lens in zip(np.split(sel, cuts),
                                                      np.split(lens, cuts), strict=True)
            if len(g)]


@dataclass
class _Writes:
    """What a batch of /24 layouts writes, in the order _flush writes it."""

    groups: list[int] = field(default_factory=list)
    tables: list[np.ndarray] = field(default_factory=list)  # each group's 256 ids
    words: dict[int, int] = field(default_factory=dict)
    freed_groups: list[int] = field(default_factory=list)


class V4Table:
    def __init__(self, tbl24, tbl8, verdicts, generation: int) -> None:
        """tbl24, tbl8, verdicts: MapHandles of v4_tbl24, v4_tbl8, v4_verdicts. Ids and groups
        come in two halves; `generation` (0 or 1) is the half the kernel's layout uses now.
        Nothing is known of that layout until `build` lays one out (every start does)."""
        self.tbl24, self.tbl8, self.verdicts = tbl24, tbl8, verdicts
        n = verdicts.max_entries
        self.half_ids = (n - 1) // 2
        self.half_groups = tbl8.max_entries // 2
        self.generation = generation
        self.vid_net = np.zeros(n, dtype=np.uint32)
        self.vid_plen = np.full(n, FREE, dtype=np.uint8)
        self._arrays = ((tbl24, np.uint64, 1), (tbl8, np.uint32, 256), (verdicts, np.uint64, 1))
        self._forget()

    def _forget(self) -> None:
        g = self.generation
        self.ids = _Ids(1 + g * self.half_ids, 1 + (g + 1) * self.half_ids, "IPv4 verdict ids")
        self.groups = _Ids(g * self.half_groups, (g + 1) * self.half_groups,
                           "IPv4 tbl8 groups (limits.max_tbl8_groups)")
        self.vid = U64Map(values=np.int32)  # key_of(net, plen) -> verdict id
        self.vid_plen[:] = FREE
        self.longs: dict[int, dict[int, int]] = {}  # grouped /24 -> {key: vid} beyond /24
        self.group_of: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.vid)

    # -- the kernel's words ---------------------------------------------------------------

    def _io(self, which: int, keys: np.ndarray, values: np.ndarray | None = None):
        """Read (values None: returns them) or store items `keys` of tbl24 (0), tbl8 (1, a
        group's 256 ids in a row) or verdicts (2) through the array's memory, mapping a span
        of at most MAP_BYTES at a time: only the pages touched are mapped. Stores
        are one aligned store per item; calls happen in the order the module doc says."""
        handle, dtype, per = self._arrays[which]
        keys = np.asarray(keys, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        out = np.empty(len(keys), dtype=dtype) if values is None else None
        if values is not None:
            values = np.asarray(values)[order]
        elems = keys // per
        span = max(1, MAP_BYTES // handle.value_size)
        start = 0
        while start < len(keys):
            end = int(np.searchsorted(elems, elems[start] + span))
            lo, hi = int(elems[start]), int(elems[end - 1]) + 1
            with handle.mapped(dtype, lo, hi) as view:
                rel = keys[start:end] - lo * per
                if values is None:
                    out[start:end] = view[rel]
                else:
                    view[rel] = values[start:end]
                del view  # the mapping closes at the end of the block: no reference may stay
            start = end
        if out is not None:
            unsorted = np.empty_like(out)
            unsorted[order] = out
            return unsorted
        return None

    def _write_groups(self, groups: np.ndarray, tables: np.ndarray) -> None:
        """Whole groups: row i of `tables` (256 ids) into group groups[i], a window of
        groups at a time (one index per group, not per id)."""
        order = np.argsort(groups, kind="stable")
        groups, tables = groups[order].astype(np.int64), tables[order]
        span = max(1, MAP_BYTES // self.tbl8.value_size)
        start = 0
        while start < len(groups):
            end = int(np.searchsorted(groups, groups[start] + span))
            lo, hi = int(groups[start]), int(groups[end - 1]) + 1
            with self.tbl8.mapped(np.uint32, lo, hi) as view:
                view.reshape(-1, 256)[groups[start:end] - lo] = tables[start:end]
                del view
            start = end

    def _window(self, lo: int, hi: int) -> np.ndarray:
        """A copy of tbl24[lo:hi]."""
        with self.tbl24.mapped(np.uint64, lo, hi) as view:
            out = view.copy()
            del view
        return out

    def _read24(self, idx: np.ndarray) -> np.ndarray:
        return self._io(TBL24, idx)

    def _write(self, which: int, keys: np.ndarray, values: np.ndarray) -> None:
        self._io(which, keys, values)

    def _depth(self, vids: np.ndarray) -> np.ndarray:
        """plen + 1 of the prefix holding each id (0 for id 0: no prefix)."""
        depth = self.vid_plen[vids].astype(np.int16) + 1
        depth[vids == 0] = 0
        return depth

    # -- changes --------------------------------------------------------------------------

    def apply(self, sets: dict[Prefix4, int], deletes: Iterable[Prefix4],
              parent_of: ParentOf) -> None:
        """sets: (net, plen) -> packed verdict, new or changed; deletes: (net, plen) gone.
        parent_of(net, plen): the longest prefix shorter than it that covers it and still has
        an entry (after this change), or None. Writes in the order the module doc says."""
        if sets:
            self.put(np.array([p[0] for p in sets], dtype=np.uint32),
                     np.array([p[1] for p in sets], dtype=np.uint8),
                     np.array(list(sets.values()), dtype=np.uint64))
        deletes = list(deletes)
        if deletes:
            self.remove(np.array([p[0] for p in deletes], dtype=np.uint32),
                        np.array([p[1] for p in deletes], dtype=np.uint8),
                        parents_by_call(parent_of))

    def put(self, nets: np.ndarray, plens: np.ndarray, verdicts: np.ndarray) -> None:
        """Prefixes new or changed, as columns: a prefix that has an entry keeps it and its
        verdict changes in place (one word); the others are laid out (add)."""
        vids = self.vid.get_many(keys_of(nets, plens))
        there = vids >= 0
        if there.any():
            self._write(VERDICTS, vids[there], verdicts[there].astype(np.uint64))
        if not there.all():
            new = ~there
            self.add(nets[new], plens[new], verdicts[new])

    def add(self, nets: np.ndarray, plens: np.ndarray, verdicts: np.ndarray) -> None:
        """New prefixes (none may have an entry yet), as columns: a blocklist of a million
        goes through numpy, not a Python loop."""
        vids = self.ids.take_many(len(nets))
        self._write(VERDICTS, vids, verdicts.astype(np.uint64))
        self.vid_net[vids], self.vid_plen[vids] = nets, plens
        keys = (nets.astype(np.uint64) << np.uint64(6)) | plens
        self.vid.put_many(keys, vids)
        short = plens <= 24
        if short.any():
            self._paint(nets[short], plens[short], vids[short])
        if not short.all():
            self._add_longs(nets[~short], plens[~short], vids[~short])

    def _paint(self, nets: np.ndarray, plens: np.ndarray, vids: np.ndarray) -> None:
        """Point each /24 of these prefixes (<= /24) at the longest of them covering it,
        unless a longer prefix already does: a window of /24s at a time, one prefix length
        at a time, shortest first (prefixes of one length never overlap). Only the /24s
        touched are read and compared."""
        starts = (nets >> 8).astype(np.int64)
        ends = starts + (1 << (24 - plens.astype(np.int64)))
        for lo, hi, sel in _Overlaps(starts, ends).windows():
            groups = [(length, _spans(starts[mine], ends[mine], lo, hi) + lo,
                       np.repeat(vids[mine], np.minimum(ends[mine], hi) - np.maximum(
                           starts[mine], lo)))
                      for length, mine in _by_length(sel, plens)]
            # The /24s touched, in order, by a mask over the window (np.unique's hashing
            # cost ~1.5 s a 2M load), and each one's position among them.
            mask = np.zeros(hi - lo, dtype=bool)
            for _, idx, _ in groups:
                mask[idx - lo] = True
            rel = np.flatnonzero(mask)
            with self.tbl24.mapped(np.uint64, lo, hi) as view:
                current = view[rel]
                fb = (current & ID_MASK).astype(np.uint32)
                depth = self._depth(fb)
                new_fb = fb.copy()
                for length, idx, vid in groups:
                    pos = np.searchsorted(rel, idx - lo)
                    wins = depth[pos] < length + 1
                    new_fb[pos[wins]], depth[pos[wins]] = vid[wins], length + 1
                moved = np.nonzero(new_fb != fb)[0]
                # One aligned store per word (see the module doc), the window mapped once.
                view[rel[moved]] = (current[moved] & ~ID_MASK) | new_fb[moved].astype(np.uint64)
                del view

    def _add_longs(self, nets: np.ndarray, plens: np.ndarray, vids: np.ndarray) -> None:
        """Prefixes longer than /24 into their /24s: those without a group are laid out
        afresh in numpy (a blocklist's hosts and their neighbours: _lay_out_longs, the
        ONE's own prefix included); those with a group merge into it, /24 by /24."""
        s24 = (nets >> 8).astype(np.int64)
        uniq = _distinct(s24)
        current = self._read24(uniq)
        kind = current >> np.uint64(abi.V4_KIND_SHIFT)
        has_group = kind == abi.V4_GROUP
        at = np.searchsorted(uniq, s24)
        fresh = ~has_group
        if fresh.any():
            mine = fresh[at]
            one = (kind == abi.V4_ONE) & fresh
            old = ((current[one] >> np.uint64(abi.V4_AUX_SHIFT)) & ID_MASK).astype(np.uint32)
            slash24s, bits = self._lay_out_longs(
                np.concatenate([nets[mine], self.vid_net[old]]),
                np.concatenate([plens[mine], self.vid_plen[old]]),
                np.concatenate([vids[mine], old]))
            pos = np.searchsorted(uniq, slash24s)
            self._write(TBL24, slash24s, (current[pos] & ID_MASK) | bits)  # after the groups
        if has_group.any():
            by24: dict[int, dict[int, int]] = {}
            mine = has_group[at]
            for net, plen, vid in zip(nets[mine].tolist(), plens[mine].tolist(),
                                      vids[mine].tolist(), strict=True):
                by24.setdefault(net >> 8, {})[key_of(net, plen)] = vid
            out = _Writes()
            for s, entry in zip(uniq[has_group].tolist(), current[has_group].tolist(),
                                strict=True):
                longs = self._longs(s, entry)
                longs.update(by24[s])
                self._lay_out(s, entry, longs, out)
            self._flush(out)

    def _longs(self, s: int, entry: int) -> dict[int, int]:
        """A copy of /24 s's prefixes longer than /24: a group's are kept here, a ONE's
        is in its entry."""
        if s in self.longs:
            return dict(self.longs[s])
        if entry >> abi.V4_KIND_SHIFT == abi.V4_ONE:
            vid = (entry >> abi.V4_AUX_SHIFT) & abi.V4_ID_MASK
            return {key_of(int(self.vid_net[vid]), int(self.vid_plen[vid])): vid}
        return {}

    def _lay_out(self, s: int, entry: int, longs: dict[int, int], out: _Writes) -> None:
        """/24 s's new word for its prefixes longer than /24 (keeping its fallback), and its
        group's entries, into `out` (written by _flush: groups before the words)."""
        fb = entry & abi.V4_ID_MASK
        old_group = self.group_of.get(s)
        if not longs:
            new_entry = fb
        elif len(longs) == 1:
            key, vid = next(iter(longs.items()))
            new_entry = one_entry(key >> 6, key & 63, vid) | fb
        else:
            group = old_group if old_group is not None else self.groups.take()
            table = np.zeros(256, dtype=np.uint32)
            for key, vid in sorted(longs.items(), key=lambda kv: kv[0] & 63):
                lo, plen = (key >> 6) & 0xFF, key & 63
                table[lo:lo + (1 << (32 - plen))] = vid  # longer prefixes come later
            out.groups.append(group)
            out.tables.append(table)
            self.group_of[s] = group
            new_entry = (abi.V4_GROUP << abi.V4_KIND_SHIFT) | (group << abi.V4_AUX_SHIFT) | fb
        if new_entry != entry:
            out.words[s] = new_entry
        if new_entry >> abi.V4_KIND_SHIFT == abi.V4_GROUP:
            self.longs[s] = longs
        else:
            self.longs.pop(s, None)
            if old_group is not None:  # nothing will point at it; reused after quarantine
                del self.group_of[s]
                out.freed_groups.append(old_group)

    def _flush(self, out: _Writes) -> None:
        """Groups first, then the words that point at them, then the groups nothing points
        at any more go to quarantine."""
        if out.groups:
            self._write_groups(np.array(out.groups, dtype=np.int64), np.stack(out.tables))
        if out.words:
            self._write(TBL24, np.fromiter(out.words, dtype=np.int64, count=len(out.words)),
                        np.fromiter(out.words.values(), dtype=np.uint64, count=len(out.words)))
        self.groups.give(out.freed_groups)

    def remove(self, nets: np.ndarray, plens: np.ndarray, parents: ParentsOf) -> None:
        """Prefixes gone, as columns: the /24s that fell back to each one fall back to its
        parent (what covers it after this change, found by `parents`), the /24s holding the
        longer ones are laid out again, then their ids go. A prefix without an entry is
        skipped (a rollback of a change whose writes never ran)."""
        keys, first = np.unique(keys_of(np.asarray(nets, dtype=np.uint32),
                                        np.asarray(plens, dtype=np.uint8)), return_index=True)
        nets = np.asarray(nets, dtype=np.uint32)[first]  # each prefix once: its id goes once
        plens = np.asarray(plens, dtype=np.uint8)[first]
        vids = self.vid.get_many(keys)
        there = vids >= 0
        if not there.any():
            return
        nets, plens, keys = nets[there], plens[there], keys[there]
        vids = vids[there].astype(np.uint32)
        short = plens <= 24
        if short.any():
            p_nets, p_lens, found = parents(nets[short], plens[short])
            to = np.zeros(int(short.sum()), dtype=np.uint32)
            if found.any():
                parent = self.vid.get_many(keys_of(p_nets[found], p_lens[found]))
                if (parent < 0).any():  # the caller broke the order: entries before removals
                    raise XdpfwError("internal error: a removed IPv4 prefix's parent has no "
                                     "entry yet; nothing of the removal was written")
                to[found] = parent
            self._fall_back(nets[short], plens[short], vids[short], to)
        if not short.all():
            self._remove_longs(nets[~short], plens[~short], vids[~short])
        self.vid.pop_many(keys)
        self.vid_plen[vids] = FREE
        self.ids.give(vids)

    def _remove_longs(self, nets: np.ndarray, plens: np.ndarray, vids: np.ndarray) -> None:
        """Prefixes longer than /24 out of their /24s: a /24 whose one such prefix goes
        (ONE) keeps only its fallback, in one word, through numpy; a /24 with a group is
        laid out again."""
        s24 = (nets >> 8).astype(np.int64)
        uniq = _distinct(s24)
        current = self._read24(uniq)
        kind = current >> np.uint64(abi.V4_KIND_SHIFT)
        aux = ((current >> np.uint64(abi.V4_AUX_SHIFT)) & ID_MASK).astype(np.uint32)
        one = (kind == abi.V4_ONE) & np.isin(aux, vids)
        if one.any():
            self._write(TBL24, uniq[one], current[one] & ID_MASK)
        grouped = kind == abi.V4_GROUP
        if grouped.any():
            mine = grouped[np.searchsorted(uniq, s24)]
            by24: dict[int, list[int]] = {}
            for s, k in zip(s24[mine].tolist(), keys_of(nets[mine], plens[mine]).tolist(),
                            strict=True):
                by24.setdefault(s, []).append(k)
            out = _Writes()
            for s, entry in zip(uniq[grouped].tolist(), current[grouped].tolist(),
                                strict=True):
                longs = self._longs(s, entry)
                for k in by24[s]:
                    longs.pop(k, None)
                self._lay_out(s, entry, longs, out)
            self._flush(out)

    def _fall_back(self, nets: np.ndarray, plens: np.ndarray, old: np.ndarray,
                   new: np.ndarray) -> None:
        """The /24s whose fallback is a deleted prefix (its id in `old`) get that prefix's
        parent's id (`new`, 0: none) instead."""
        order = np.argsort(old)
        old, new = old[order], new[order]
        starts = (nets >> 8).astype(np.int64)
        ends = starts + (1 << (24 - plens.astype(np.int64)))
        for lo, hi, _ in _Overlaps(starts, ends).windows():
            current = self._window(lo, hi)
            fb = (current & ID_MASK).astype(np.uint32)
            pos = np.minimum(np.searchsorted(old, fb), len(old) - 1)
            hit = np.nonzero(old[pos] == fb)[0]
            if len(hit):
                entries = (current[hit] & ~ID_MASK) | new[pos[hit]].astype(np.uint64)
                self._write(TBL24, hit + lo, entries)

    # -- start-up -------------------------------------------------------------------------

    def build(self, nets: np.ndarray, plens: np.ndarray, verdicts: np.ndarray,
              explain: bool = False) -> tuple[int, list[int]]:
        """Lay out these prefixes (every IPv4 prefix entry there is) from scratch in the other
        half of the ids and groups, then point every /24 at the new layout, one word at a
        time, writing only the words that change: a packet meets the old layout or the new
        one. The old half is free afterwards. Every start does this, so no id of a previous
        process needs to be known, and the kernel ends equal to the store.

        Returns (/24 words written, /24s whose verdict changed): the second only with
        `explain`, for pins another store left (comparing old and new verdicts, not ids)."""
        old_values = self._half_values(self.generation) if explain else None
        self.generation = 1 - self.generation
        self._forget()
        vids = self.ids.take_many(len(nets))
        self._write(VERDICTS, vids, verdicts.astype(np.uint64))
        self.vid_net[vids], self.vid_plen[vids] = nets, plens
        keys = (nets.astype(np.uint64) << np.uint64(6)) | plens.astype(np.uint64)
        self.vid = U64Map(len(keys), np.int32)
        self.vid.put_many(keys, vids)
        long = plens > 24
        aux = self._lay_out_longs(nets[long], plens[long], vids[long])  # groups written
        short = plens <= 24
        new_values = np.zeros(len(self.vid_plen), dtype=np.uint64)
        new_values[vids] = verdicts
        return self._build_tbl24(nets[short], plens[short], vids[short], aux,
                                 (old_values, new_values) if explain else None)

    def _half_values(self, generation: int) -> np.ndarray:
        """The verdicts of a half as the kernel has them, indexed by id."""
        out = np.zeros(len(self.vid_plen), dtype=np.uint64)
        lo = 1 + generation * self.half_ids
        with self.verdicts.mapped(np.uint64, lo, lo + self.half_ids) as view:
            out[lo:lo + self.half_ids] = view
            del view
        return out

    def _lay_out_longs(self, nets: np.ndarray, plens: np.ndarray,
                       vids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prefixes longer than /24, all those of their /24s (none of which has a group
        now), laid out in numpy: a /24 with one gets a ONE entry, one with more a new group,
        written here (before any entry points at it). Returns (/24s, their entries' kind
        and aux bits), the /24s ascending."""
        s24 = (nets >> 8).astype(np.int64)
        order = np.lexsort((plens, s24))
        nets, plens, vids, s24 = nets[order], plens[order], vids[order], s24[order]
        uniq, first, counts = np.unique(s24, return_index=True, return_counts=True)
        bits = np.zeros(len(uniq), dtype=np.uint64)
        ones = counts == 1
        i = first[ones]
        bits[ones] = ((np.uint64(abi.V4_ONE) << np.uint64(abi.V4_KIND_SHIFT))
                      | ((plens[i].astype(np.uint64) - np.uint64(25))
                         << np.uint64(abi.V4_LEN_SHIFT))
                      | ((nets[i].astype(np.uint64) & np.uint64(0xFF))
                         << np.uint64(abi.V4_NET_SHIFT))
                      | (vids[i].astype(np.uint64) << np.uint64(abi.V4_AUX_SHIFT)))
        grouped = ~ones
        if grouped.any():
            g_slash24 = uniq[grouped]
            groups = self.groups.take_many(len(g_slash24))
            member = np.repeat(grouped, counts)  # the prefixes of grouped /24s
            gid = np.repeat(groups.astype(np.int64), counts[grouped])
            gn, gp, gv = nets[member], plens[member], vids[member]
            size = 1 << (32 - gp.astype(np.int64))
            base = gid * 256 + (gn & 0xFF).astype(np.int64)
            idx = np.repeat(base, size) + (
                np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size))
            depth = np.repeat(gp, size)
            vid = np.repeat(gv, size)
            order = np.lexsort((depth, idx))  # per address, the longest prefix last
            idx, vid = idx[order], vid[order]
            last = np.ones(len(idx), dtype=bool)
            last[:-1] = idx[1:] != idx[:-1]
            # One row of 256 per group (zero: no longer prefix), written whole.
            table = np.zeros(len(groups) * 256, dtype=np.uint32)
            by_id = np.argsort(groups)
            g_of = idx[last] // 256
            rows = by_id[np.searchsorted(groups[by_id], g_of)]
            table[rows * 256 + idx[last] % 256] = vid[last]
            self._write_groups(groups, table.reshape(-1, 256))
            bits[grouped] = ((np.uint64(abi.V4_GROUP) << np.uint64(abi.V4_KIND_SHIFT))
                             | (groups.astype(np.uint64) << np.uint64(abi.V4_AUX_SHIFT)))
            keys = (nets.astype(np.int64) << 6) | plens
            g_first, g_count = first[grouped].tolist(), counts[grouped].tolist()
            for s, g, lo, k in zip(g_slash24.tolist(), groups.tolist(), g_first, g_count,
                                   strict=True):
                self.group_of[s] = g
                self.longs[s] = dict(zip(keys[lo:lo + k].tolist(), vids[lo:lo + k].tolist(),
                                         strict=True))
        return uniq, bits

    def _build_tbl24(self, nets, plens, vids, aux: tuple[np.ndarray, np.ndarray],
                     values: tuple[np.ndarray, np.ndarray] | None) -> tuple[int, list[int]]:
        """Every /24's new word, a chunk of BUILD_CHUNK /24s at a time, written where it
        differs from the kernel's. values: (old, new) verdicts by id, to report the /24s
        whose fallback verdict or kind changed."""
        written, changed = 0, []
        starts = (nets >> 8).astype(np.int64)
        ends = starts + (1 << (24 - plens.astype(np.int64)))
        aux_idx, aux_val = aux  # /24s ascending, their kind and aux bits
        overlaps = _Overlaps(starts, ends)
        for lo in range(0, abi.V4_TBL24, BUILD_CHUNK):
            hi = lo + BUILD_CHUNK
            words = np.zeros(BUILD_CHUNK, dtype=np.uint64)
            for _, mine in _by_length(overlaps(lo, hi), plens):  # longer ones overwrite
                idx = _spans(starts[mine], ends[mine], lo, hi)
                words[idx] = np.repeat(vids[mine], np.minimum(ends[mine], hi) - np.maximum(
                    starts[mine], lo)).astype(np.uint64)
            a, b = np.searchsorted(aux_idx, [lo, hi])
            words[aux_idx[a:b] - lo] |= aux_val[a:b]
            current = self._window(lo, hi)
            diff = np.nonzero(words != current)[0]
            if len(diff):
                self._write(TBL24, diff + lo, words[diff])
                written += len(diff)
                if values is not None:
                    old_v, new_v = values
                    was, now = current[diff], words[diff]
                    differs = (old_v[(was & ID_MASK).astype(np.int64)]
                               != new_v[(now & ID_MASK).astype(np.int64)]) | (
                        (was >> np.uint64(abi.V4_KIND_SHIFT)) != (now >> np.uint64(
                            abi.V4_KIND_SHIFT)))
                    changed.extend((diff[differs] + lo).tolist())
        return written, changed

    def entries(self) -> list[Prefix4]:
        """Every prefix with an entry (for tests)."""
        return [(k >> 6, k & 63) for k in self.vid.items()[0].tolist()]
