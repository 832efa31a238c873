"""Run a command under the restrictions of a systemd unit's [Service] section that decide
whether xdpfw can still load and attach XDP, where no systemd runs (CI, containers):

    python tests/unit_sandbox.py UNIT -- COMMAND...

- CapabilityBoundingSet=: every other capability is dropped from the bounding set, so root's
  permitted set after exec is exactly these;
- NoNewPrivileges=;
- SystemCallFilter= (groups expanded by `systemd-analyze syscall-filter`, `~` lines removing),
  with SystemCallErrorNumber= for the rest; RestrictAddressFamilies= on socket();
  RestrictNamespaces= on setns(), unshare() and clone() (clone3 answers ENOSYS, as systemd
  makes it, so libc falls back to clone).

The file-system options (ProtectSystem= and the like) are not reproduced: the unit's comments
say which paths the daemon writes, and tests/test_systemd_unit.py checks them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import seccomp  # Debian's python3-seccomp (scripts/setup.sh installs it)

PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
CLONE_NS = {"cgroup": 0x02000000, "ipc": 0x08000000, "mnt": 0x00020000, "net": 0x40000000,
            "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000}
CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
        "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
        "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
        "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
        "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"]


def service_section(path: str) -> dict[str, list[str]]:
    """Each key of [Service] with all its values, in order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def expand(names: list[str], seen: set[str] | None = None) -> set[str]:
    """Syscall names, with @groups expanded (recursively) by systemd-analyze."""
    seen = set() if seen is None else seen
    calls: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            calls.add(name)
            continue
        if name in seen:
            continue
        seen.add(name)
        listing = subprocess.run(["systemd-analyze", "syscall-filter", name], check=True,
                                 capture_output=True, text=True).stdout.splitlines()[1:]
        members = [m.strip() for m in listing if m.strip() and not m.strip().startswith("#")]
        calls |= expand(members, seen)
    return calls


def allowed_syscalls(filters: list[str]) -> set[str]:
    allowed: set[str] = set()
    for value in filters:
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split())
        allowed = allowed - names if deny else allowed | names
    # Always allowed by systemd, whatever the filter says.
    return allowed | expand(["@default"]) | {"execve", "exit", "exit_group", "rt_sigreturn"}


def build_filter(svc: dict[str, list[str]]) -> seccomp.SyscallFilter:
    err = getattr(errno, svc.get("SystemCallErrorNumber", ["EPERM"])[-1])
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(err))
    allowed = allowed_syscalls(svc.get("SystemCallFilter", ["@known"]))  # absent: all
    special = {"socket", "setns", "unshare", "clone", "clone3"}
    for name in sorted(allowed - special):
        with contextlib.suppress(RuntimeError, ValueError):  # not a syscall of this arch
            f.add_rule(seccomp.ALLOW, name)
    families = " ".join(svc.get("RestrictAddressFamilies", [])).split()
    if "socket" in allowed:
        for fam in families or ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"]:
            f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, getattr(socket, fam)))
    kept = " ".join(svc.get("RestrictNamespaces", ["yes"])).split()
    kept_flags = sum(CLONE_NS[n] for n in kept if n in CLONE_NS)
    refused = sum(CLONE_NS.values()) & ~kept_flags
    for name in ("unshare", "clone"):
        if name in allowed:
            f.add_rule(seccomp.ALLOW, name, seccomp.Arg(0, seccomp.MASKED_EQ, refused, 0))
    if "setns" in allowed:
        for flag in (CLONE_NS[n] for n in kept if n in CLONE_NS):
            f.add_rule(seccomp.ALLOW, "setns", seccomp.Arg(1, seccomp.EQ, flag))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    return f


def main() -> None:
    unit, sep, *argv = sys.argv[1:]
    assert sep == "--" and argv, __doc__
    svc = service_section(unit)
    libc = ctypes.CDLL(None, use_errno=True)
    # Each option absent: what systemd does without it (all capabilities, no filter).
    keep = set(" ".join(svc.get("CapabilityBoundingSet", CAPS)).split())
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        name = CAPS[cap] if cap < len(CAPS) else f"cap_{cap}"
        if name not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"dropping {name} from the bounding set")
    if svc.get("NoNewPrivileges", ["no"])[-1] in ("yes", "true", "1"):
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if {"SystemCallFilter", "RestrictAddressFamilies", "RestrictNamespaces"} & svc.keys():
        build_filter(svc).load()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
