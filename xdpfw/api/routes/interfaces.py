"""/api/v1/interfaces: where the firewall is attached, in which mode, with which policy."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from xdpfw.api.deps import FirewallDep
from xdpfw.api.schemas import InterfaceCreate, InterfacePublic

router = APIRouter(prefix="/api/v1/interfaces", tags=["interfaces"])


@router.get("", response_model=list[InterfacePublic])
def list_interfaces(fw: FirewallDep) -> list[InterfacePublic]:
    return [InterfacePublic.of(a, fw.chained(a)) for a in fw.interfaces()]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=InterfacePublic)
def attach_interface(body: InterfaceCreate, fw: FirewallDep, response: Response):
    """Attach (201), or change the mode/policy of an attached interface (200)."""
    att, created = fw.attach_interface(**body.model_dump())
    if not created:
        response.status_code = status.HTTP_200_OK
    return InterfacePublic.of(att, fw.chained(att))


@router.delete("/{name}", response_model=InterfacePublic)
def detach_interface(name: str, fw: FirewallDep, netns: str | None = None) -> InterfacePublic:
    return InterfacePublic.of(fw.detach_interface(name, netns))
