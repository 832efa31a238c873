"""/api/v1/interfaces: where the firewall is attached, in which mode, with which policy."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from fastapi import APIRouter, Response, status

from xdpfw.api.deps import FirewallDep
from xdpfw.api.error_body import responses
from xdpfw.api.schemas import InterfaceCreate, InterfacePublic
from xdpfw.dataplane.attach import Mode
from xdpfw.errors import NotFoundError
from xdpfw.service import Attachment, Firewall

router = APIRouter(prefix="/api/v1/interfaces", tags=["interfaces"])


def _find(fw: Firewall, name: str, netns: str | None) -> Attachment | None:
    return next((a for a in fw.interfaces()
                 if (a.record.name, a.record.netns) == (name, netns)), None)


def location(name: str, netns: str | None) -> str:
    query = f"?{urlencode({'netns': netns})}" if netns else ""
    return f"{router.prefix}/{quote(name, safe='')}{query}"


@router.get("", response_model=list[InterfacePublic])
def list_interfaces(fw: FirewallDep) -> list[InterfacePublic]:
    return [InterfacePublic.of(a, fw.chained(a)) for a in fw.interfaces()]


@router.get("/{name}", response_model=InterfacePublic, responses=responses(404))
def get_interface(name: str, fw: FirewallDep, netns: str | None = None) -> InterfacePublic:
    att = _find(fw, name, netns)
    if att is None:
        where = f"{name} in netns {netns}" if netns else name
        raise NotFoundError(f"{where} is not attached")
    return InterfacePublic.of(att, fw.chained(att))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=InterfacePublic,
             responses={200: {"model": InterfacePublic,
                              "description": "An attached interface changed"},
                        **responses(404, 409, 503, 507)})
def attach_interface(body: InterfaceCreate, fw: FirewallDep, response: Response):
    """Attach (201), or change an attached interface (200). On an attached interface, only
    the fields given change: the others keep their current values, not the defaults."""
    args = body.model_dump()
    current = _find(fw, body.name, body.netns)
    if current is not None:
        r = current.record
        args.update(mode=Mode(r.mode), policy=r.policy, unparsed_policy=r.unparsed_policy,
                    guard_l2=r.guard_l2)
        args.update(body.model_dump(exclude_unset=True))
    att, created = fw.attach_interface(**args)
    if created:
        response.headers["Location"] = location(att.record.name, att.record.netns)
    else:
        response.status_code = status.HTTP_200_OK
    return InterfacePublic.of(att, fw.chained(att))


@router.delete("/{name}", response_model=InterfacePublic, responses=responses(404, 503))
def detach_interface(name: str, fw: FirewallDep, netns: str | None = None) -> InterfacePublic:
    return InterfacePublic.of(fw.detach_interface(name, netns))
