"""The loaded data plane, and the one owner of every handle onto it.

- The build: compiled once by BCC (LoadedProgram) and loaded once per interface slot
  (instances.py), so interfaces with the same ifindex in different namespaces each run their
  own instance, with their own policy and counters.
- Where the instances run (`links`): interface, namespace, mode in use, and the program
  chained behind each one (README "Other XDP programs").
- The map handles (FirewallMaps, LbMaps), opened from the pins with fds of their own: they
  stay valid whichever build runs, so an upgrade never leaves a component writing through a
  closed (or reused) descriptor. The ring buffers (drop events, captured packets) belong
  to the build: their readers (read_ring) are bound to each new build.
- The sockhash proxy's programs and maps (SockProxyDataplane), loaded on first use and shared
  by every proxy service; when the kernel refuses them, xdpfw.proxy.fallback decides.
The firewall, the load balancer, events and metrics reach the kernel only through these
handles; none opens its own. Upgrades swap every attached instance under `lock`;
attaching, detaching and chaining take it too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from xdpfw.dataplane import abi
from xdpfw.dataplane.attach import Mode, attach, detach, link_info, replace, where
from xdpfw.dataplane.capture_maps import CaptureMaps
from xdpfw.dataplane.lb_maps import LbMaps
from xdpfw.dataplane.loader import LoadedProgram, ProgramConfig, load_program
from xdpfw.dataplane.maps import FirewallMaps
from xdpfw.dataplane.pins import move_aside
from xdpfw.dataplane.progs import ProgInfo, prog_fd_by_id, prog_info
from xdpfw.dataplane.ringbuf import RingReader
from xdpfw.dataplane.testrun import test_run
from xdpfw.errors import AttachError, ConflictError, NotFoundError, PinLayoutError, XdpfwError
from xdpfw.proxy.fallback import RequestedMode, load_or_fall_back
from xdpfw.proxy.loader import SockProxyDataplane

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swap:
    """One interface's instance replaced by an upgrade."""

    name: str
    netns: str | None
    old_id: int
    new_id: int


@dataclass(frozen=True)
class Upgrade:
    old: ProgInfo  # the builds' test instances
    new: ProgInfo
    swapped: list[Swap]


@dataclass
class Link:
    """An instance attached to an interface."""

    slot: int
    name: str
    netns: str | None
    mode: Mode  # in use


@dataclass(frozen=True)
class Build:
    """The running build: its test instance (attached instances have ids of their own), and
    the source it was built from."""

    info: ProgInfo
    source: Path


@dataclass(frozen=True)
class LinkState:
    """What the kernel runs on a slot's interface, beside what should run there."""

    mode: Mode | None  # None: no XDP program there, or the link is gone
    prog_id: int | None
    current: bool  # prog_id is the slot's instance of the running build
    chained: int | None  # the program run after xdpfw's pass verdicts


class Dataplane:
    def __init__(self, config: ProgramConfig) -> None:
        self.lock = threading.RLock()
        self.config = config
        self.replaced_pins: str | None = None
        self.program = self._load_claimable(config)
        self.maps = FirewallMaps(config)
        self.lb = LbMaps(config)
        self.capture = CaptureMaps(config.pin_dir, self.maps.fw_config)
        self.links: dict[int, Link] = {}
        self._readers: list[RingReader] = []  # bound to each new build before the old closes
        self._proxy: SockProxyDataplane | None = None
        self._proxy_refused: str | None = None  # why the kernel refused it

    def _load_claimable(self, cfg: ProgramConfig) -> LoadedProgram:
        """Load on the pins, or on fresh pins when the old ones have another layout
        (pins.py): the old instances keep filtering on the old maps until the interfaces
        are attached again, and `drop_replaced_pins` then removes them."""
        try:
            return load_program(cfg)
        except PinLayoutError as e:
            self.replaced_pins = move_aside(cfg.pin_dir)
            log.warning("%s; moved them to %s, filling new maps from the store",
                        e, self.replaced_pins)
            return load_program(cfg)

    def drop_replaced_pins(self) -> None:
        if self.replaced_pins:
            shutil.rmtree(self.replaced_pins, ignore_errors=True)
            log.info("removed the replaced pins %s", self.replaced_pins)
            self.replaced_pins = None

    # -- interfaces -----------------------------------------------------------------------

    def attach(self, slot: int, name: str, netns: str | None, mode: Mode,
               chain_existing: bool = True, chain_prog_id: int | None = None) -> Link:
        """Run slot's instance on the interface. A program already there that is not ours
        is chained behind it (chain_existing) or refused; chain_prog_id names a loaded XDP
        program to chain instead. Nothing changes when this raises."""
        with self.lock:
            inst = self.program.instance(slot)
            _, current_mode, current_id, _ = link_info(name, netns)
            foreign = current_id is not None and not self._ours(current_id)
            if foreign and chain_prog_id is not None and chain_prog_id != current_id:
                raise ConflictError(
                    f"{where(name, netns)} runs XDP program {current_id} already: chain that "
                    f"one (chain_existing) or detach it, not program {chain_prog_id} as well"
                )
            if foreign and not chain_existing:
                raise ConflictError(
                    f"{where(name, netns)} runs another XDP program (id {current_id}): attach "
                    "with chain_existing to run it after xdpfw's pass verdicts, or remove it"
                )
            chained = chain_prog_id if chain_prog_id is not None else (
                current_id if foreign else None)
            before_chain = self.maps.chain_id(slot)
            if chained is not None:
                self._set_chain(slot, chained)
            try:
                if foreign:  # swap only if it is still that program (XDP_FLAGS_REPLACE)
                    in_use = current_mode if mode is Mode.AUTO else mode
                    expected = prog_fd_by_id(current_id)
                    try:
                        replace(name, netns, inst.fd, expected, in_use)
                    finally:
                        os.close(expected)
                else:
                    in_use = attach(name, netns, inst.fd, mode)
            except BaseException:
                if chained is not None:
                    self._restore_chain(slot, before_chain)
                raise
            link = self.links[slot] = Link(slot, name, netns, in_use)
            return link

    def detach(self, slot: int) -> None:
        """Take slot's instance off its interface (see `release`). A program chained behind
        it takes its place (atomically), so the other program keeps acting on the interface."""
        with self.lock:
            link = self.links.get(slot)
            if link is None:
                raise NotFoundError(f"no interface runs slot {slot}")
            chained = self.maps.chain_id(slot)
            if chained is not None:
                try:
                    fd = prog_fd_by_id(chained)
                except OSError:
                    fd = None  # unloaded meanwhile: nothing to hand over to
                if fd is not None:
                    try:
                        replace(link.name, link.netns, fd, self.program.instance(slot).fd,
                                link.mode)
                    finally:
                        os.close(fd)
                else:
                    detach(link.name, link.netns)
            else:
                detach(link.name, link.netns)
            self.maps.clear_chain(slot)
            del self.links[slot]

    def release(self, slot: int) -> None:
        """Unload a detached slot's instance (kept until then, so that a detach undone by a
        failed commit puts the very same program back)."""
        with self.lock:
            if slot not in self.links:
                self.program.release(slot)

    def chained(self, slot: int) -> int | None:
        return self.maps.chain_id(slot)

    def set_chain(self, slot: int, prog_id: int | None) -> None:
        with self.lock:
            if prog_id is None:
                self.maps.clear_chain(slot)
            else:
                self._set_chain(slot, prog_id)

    def _set_chain(self, slot: int, prog_id: int) -> None:
        try:
            fd = prog_fd_by_id(prog_id)
        except OSError as e:
            raise NotFoundError(f"no loaded BPF program with id {prog_id} ({e.strerror})") \
                from None
        try:
            self.maps.set_chain(slot, fd)
        except Exception as e:
            raise AttachError(f"program {prog_id} cannot run after xdpfw ({e}): it must be an "
                              "XDP program loaded without frags support") from None
        finally:
            os.close(fd)

    def _restore_chain(self, slot: int, prog_id: int | None) -> None:
        try:
            if prog_id is None:
                self.maps.clear_chain(slot)
            else:
                self._set_chain(slot, prog_id)
        except Exception as e:
            log.error("restoring the chain of slot %d failed: %s", slot, e)

    @staticmethod
    def _ours(prog_id: int) -> bool:
        """An xdpfw instance, of this process or of the one before a restart or upgrade
        (they are named xdpfw_*; see LoadedProgram.instance)."""
        try:
            fd = prog_fd_by_id(prog_id)
        except OSError:
            return False
        try:
            return prog_info(fd).name.startswith("xdpfw")
        finally:
            os.close(fd)

    def link_state(self, slot: int) -> LinkState:
        """Read from the kernel. A link that is gone (or its namespace) runs nothing."""
        with self.lock:
            link = self.links.get(slot)
            mode = prog_id = None
            if link is not None:
                try:
                    _, mode, prog_id, _ = link_info(link.name, link.netns)
                except (NotFoundError, NetlinkError, OSError) as e:
                    log.debug("%s: %s", where(link.name, link.netns), e)
            current = prog_id is not None and prog_id == self.instance_id(slot)
            return LinkState(mode, prog_id, current, self.maps.chain_id(slot))

    def explain(self, slot: int, frame: bytes) -> abi.ExplainResult:
        """What slot's instance decides for `frame`, from its explain instance (loaded on
        first use; LoadedProgram.explainer): nothing is counted or forwarded."""
        with self.lock:
            run = test_run(self.program.explainer(slot).fd, frame)
        out = abi.ExplainResult.from_buffer_copy(run.data.ljust(16, b"\0")[:16])
        if out.magic != abi.EXPLAIN_MAGIC:
            raise XdpfwError("the running build's xdpfw_explain wrote no answer")
        return out

    def instance_id(self, slot: int) -> int:
        return self.program.instance(slot).info().id

    # -- program --------------------------------------------------------------------------

    def program_info(self) -> ProgInfo:
        """The build's test instance (slot 0); attached instances have ids of their own."""
        return prog_info(self.program.fd)

    def build(self) -> Build:
        with self.lock:  # not a build an upgrade is closing
            return Build(prog_info(self.program.fd), self.program.config.source)

    def read_events(self, on_record: Callable[[bytes], None]) -> RingReader:
        """Call on_record, on a thread of its own, with each record the running build puts in
        its drop_events ring buffer, across upgrades, until stop_events."""
        return self.read_ring("drop_events", on_record)

    def read_ring(self, map_name: str, on_record: Callable[[bytes], None],
                  wakeups: bool = False) -> RingReader:
        """The same for any ring buffer of the build (RingReader says what wakeups means)."""
        reader = RingReader(map_name, on_record, wakeups)
        with self.lock:
            reader.bind(self.program)
            self._readers.append(reader)
        return reader

    def stop_events(self, reader: RingReader) -> None:
        with self.lock:
            if reader in self._readers:
                self._readers.remove(reader)
            reader.unbind()

    def set_sample_rate(self, rate: int) -> None:
        """1 drop in `rate` becomes a drop event (0: none)."""
        with self.lock:
            self.maps.fw_config.set_sample_rate(rate)

    def upgrade(self, source: Path | str | None = None) -> Upgrade:
        """Build again (from `source`, or the installed source) on the same pins, load an
        instance for every attached slot, and swap each in with an expected-program replace,
        so no packet meets "no program". A build that fails to compile or verify, or a swap
        that fails, puts everything back and raises."""
        with self.lock:
            cfg = self.config if source is None else dataclasses.replace(
                self.config, source=Path(source))
            new = load_program(cfg)
            old = self.program
            swapped: list[Link] = []
            try:
                for link in self.links.values():
                    self._swap(link, new.instance(link.slot).fd, old.instance(link.slot).fd)
                    swapped.append(link)
            except BaseException:
                for link in swapped:  # the old build back where the new one went in
                    try:
                        self._swap(link, old.instance(link.slot).fd,
                                   new.instance(link.slot).fd)
                    except Exception as e:
                        log.error("rollback on %s failed: %s", where(link.name, link.netns), e)
                new.close()
                raise
            result = Upgrade(prog_info(old.fd), prog_info(new.fd), [
                Swap(link.name, link.netns, old.instance(link.slot).info().id,
                     new.instance(link.slot).info().id) for link in swapped])
            self.program = new
            self.maps.fw_config.resync(self.maps.source_maps())  # a build before the bits
            for reader in self._readers:
                reader.bind(new)
            old.close()
            log.info("program upgraded: build %d -> %d on %d interfaces", result.old.id,
                     result.new.id, len(swapped))
            return result

    def _swap(self, link: Link, new_fd: int, old_fd: int) -> None:
        _, mode, prog_id, _ = link_info(link.name, link.netns)
        if prog_id is None or mode is None:  # someone detached it behind our back: re-guard
            log.warning("%s had no XDP program attached; attaching",
                        where(link.name, link.netns))
            attach(link.name, link.netns, new_fd, link.mode)
            return
        replace(link.name, link.netns, new_fd, old_fd, mode)

    # -- sockhash proxy ---------------------------------------------------------------------

    def proxy(self, mode: RequestedMode) -> tuple[SockProxyDataplane | None, str | None]:
        """The sockhash proxy's programs and maps, loaded on first use and shared by every
        proxy service; or (None, why) when proxy services relay in user space, as
        load_or_fall_back decides. A refusal is kept: the kernel is not asked again."""
        with self.lock:
            if self._proxy is None and self._proxy_refused is None:
                self._proxy, self._proxy_refused = load_or_fall_back(
                    mode, SockProxyDataplane, "proxy services")
            return self._proxy, self._proxy_refused

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        """Close every fd: attached instances, pinned maps and chains stay in the kernel."""
        with self.lock:
            if self._proxy is not None:
                self._proxy.close()
                self._proxy = None
            self.program.close()
            self.capture.close()
            self.maps.close()
            self.lb.close()
