"""Typed errors: each carries what an operator needs to act (errno, reason, verifier log).

Every error the control plane reports derives from XdpfwError, those of xdpfw.lb and
xdpfw.proxy included (they subclass the classes here); xdpfw/api/app.py's ERROR_STATUS maps
them to HTTP statuses, in one table."""

from __future__ import annotations


class XdpfwError(Exception):
    """Base of every error the control plane reports to a person."""


class RuleValidationError(XdpfwError, ValueError):
    """A rule (or a line of a blocklist) is malformed."""


class ConflictError(XdpfwError):
    """The request clashes with existing state (duplicate rule, interface already attached)."""


class NotFoundError(XdpfwError, LookupError):
    pass


class CompileError(XdpfwError):
    """BCC could not compile the C program; `log` holds clang's output."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}\n{log}".rstrip())
        self.log = log


class VerifierError(XdpfwError):
    """The kernel verifier rejected the program; `log` holds the verifier log."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}\n{log}".rstrip())
        self.log = log


class AttachError(XdpfwError):
    """Attaching or detaching XDP failed; nothing changed on the interface."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class MapFullError(XdpfwError):
    """A BPF map has no room left (E2BIG/ENOSPC/ENOMEM on update)."""


class BpffsError(XdpfwError):
    """bpffs is not mounted where the pins should go."""


class PinLayoutError(XdpfwError):
    """Maps pinned by another build (or other [limits]) differ from what this build declares."""

    def __init__(self, pin_dir: str, differences: list[str]) -> None:
        super().__init__(
            f"the maps pinned under {pin_dir} are not what this build declares: "
            + "; ".join(differences)
        )
        self.pin_dir = pin_dir
        self.differences = differences


class PinOwnerError(XdpfwError):
    """The pinned maps belong to another store (another state dir)."""


class ServiceValidationError(XdpfwError, ValueError):
    """A load-balancer service or backend is malformed (bad CPU, address family, ...)."""


class BackendUnresolvedError(XdpfwError):
    """A backend's MAC cannot be resolved through the neighbour table; nothing was changed."""


class StorageError(XdpfwError):
    """The store could not be read or written (I/O error, locked, read-only); the request
    changed nothing."""


class StorageFullError(StorageError):
    """The disk, or the database's size limit, is full."""


class StateDirLockedError(XdpfwError):
    """Another `xdpfw serve` holds the state directory."""


class SourceRefusedError(XdpfwError):
    """An uploaded program source does something the daemon will not compile (an include
    outside the package's headers, a directive that reads files)."""


class FleetUnavailableError(XdpfwError):
    """etcd cannot be reached (or has no leader): a fleet node refuses writes and keeps
    enforcing what it applied last."""


class FleetStoreError(XdpfwError):
    """etcd refused a request, or holds a value the fleet cannot use."""
