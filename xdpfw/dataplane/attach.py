"""Attach and detach XDP programs with pyroute2, in an explicit mode, in any network namespace.

Re-attaching in the mode already in use replaces the program atomically (the kernel swaps it;
no packet sees "no program"). Changing mode needs a detach first, so it is refused rather
than done with a gap. A failed attach changes nothing.
"""

from __future__ import annotations

import errno
import logging
from enum import StrEnum

from pyroute2.netlink.exceptions import NetlinkError

from xdpfw.errors import AttachError, ConflictError, NotFoundError
from xdpfw.netns import rtnl

log = logging.getLogger(__name__)

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4  # swap only if IFLA_XDP_EXPECTED_FD is the attached program


class Mode(StrEnum):
    AUTO = "auto"  # native, else generic (with a log line)
    NATIVE = "native"
    GENERIC = "generic"
    OFFLOAD = "offload"


MODE_FLAGS = {
    Mode.NATIVE: XDP_FLAGS_DRV_MODE,
    Mode.GENERIC: XDP_FLAGS_SKB_MODE,
    Mode.OFFLOAD: XDP_FLAGS_HW_MODE,
}
# IFLA_XDP_ATTACHED as pyroute2 names it.
ATTACHED_MODE = {"xdp": Mode.NATIVE, "xdpgeneric": Mode.GENERIC, "xdpoffload": Mode.OFFLOAD}


def where(ifname: str, netns: str | None) -> str:
    return f"{ifname} (netns {netns})" if netns else ifname


def _link(ip, ifname: str, netns: str | None):
    idx = ip.link_lookup(ifname=ifname)
    if not idx:
        raise NotFoundError(f"unknown interface {where(ifname, netns)}")
    return ip.get_links(idx[0])[0]


def link_info(ifname: str, netns: str | None) -> tuple[int, Mode | None, int | None, str]:
    """(ifindex, attached XDP mode or None, attached program id or None, link kind)."""
    with rtnl(netns) as ip:
        link = _link(ip, ifname, netns)
    xdp = link.get_attr("IFLA_XDP")
    mode = prog_id = None
    if xdp is not None:
        mode = ATTACHED_MODE.get(xdp.get_attr("IFLA_XDP_ATTACHED"))
        prog_id = xdp.get_attr("IFLA_XDP_PROG_ID")
    info = link.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or "device"
    return link["index"], mode, prog_id, kind


def _set_xdp(
    ifname: str, netns: str | None, fd: int, flags: int, expected_fd: int | None = None
) -> None:
    attrs = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    with rtnl(netns) as ip:
        link = _link(ip, ifname, netns)
        ip.link("set", index=link["index"], xdp={"attrs": attrs})


def attach(ifname: str, netns: str | None, prog_fd: int, mode: Mode) -> Mode:
    """Attach (or atomically replace) and return the mode actually in use."""
    _, current, _, kind = link_info(ifname, netns)
    if current is not None and mode is not Mode.AUTO and current is not mode:
        raise ConflictError(
            f"{where(ifname, netns)} has XDP attached in {current} mode; "
            f"detach it before attaching in {mode} mode"
        )
    if mode is Mode.AUTO:
        if current is not None:
            return attach(ifname, netns, prog_fd, current)
        try:
            return attach(ifname, netns, prog_fd, Mode.NATIVE)
        except AttachError as e:
            log.warning(
                "%s: native XDP failed (%s); falling back to generic mode",
                where(ifname, netns),
                e,
            )
            return attach(ifname, netns, prog_fd, Mode.GENERIC)
    try:
        _set_xdp(ifname, netns, prog_fd, MODE_FLAGS[mode])
    except NetlinkError as e:
        if mode is Mode.OFFLOAD and e.code in (errno.EINVAL, errno.EOPNOTSUPP):
            raise AttachError(
                f"{where(ifname, netns)} ({kind}) cannot offload XDP to hardware: its driver "
                f"has no XDP offload support ({e}); nothing was attached. Use mode native, "
                "generic or auto.",
                e.code,
            ) from None
        raise AttachError(
            f"attaching XDP to {where(ifname, netns)} in {mode} mode failed: {e}", e.code
        ) from None
    return mode


def replace(ifname: str, netns: str | None, new_fd: int, expected_fd: int, mode: Mode) -> None:
    """Swap the attached program atomically, only if it is still the one behind expected_fd
    (EEXIST otherwise: someone else replaced it; nothing changed)."""
    try:
        _set_xdp(ifname, netns, new_fd, MODE_FLAGS[mode] | XDP_FLAGS_REPLACE, expected_fd)
    except NetlinkError as e:
        hint = " (the attached program is not the expected one)" if e.code == errno.EEXIST else ""
        raise AttachError(
            f"replacing the XDP program on {where(ifname, netns)} failed: {e}{hint}", e.code
        ) from None


def detach(ifname: str, netns: str | None) -> bool:
    """Detach whatever XDP program is attached; False if none was (idempotent)."""
    try:
        _, current, _, _ = link_info(ifname, netns)
    except NotFoundError:
        return False
    if current is None:
        return False
    try:
        _set_xdp(ifname, netns, -1, MODE_FLAGS[current])
    except NetlinkError as e:
        msg = f"detaching XDP from {where(ifname, netns)} failed: {e}"
        raise AttachError(msg, e.code) from None
    return True
