"""/api/v1/services: load-balanced virtual services and their backends; /api/v1/cpu-steer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from xdpfw.api.error_body import responses
from xdpfw.api.lb_schemas import (
    BackendCreate,
    BackendPublic,
    BackendUpdate,
    CpuSteer,
    ServiceCreate,
    ServicePublic,
)
from xdpfw.errors import NotFoundError
from xdpfw.lb.service import LoadBalancer


def get_lb(request: Request) -> LoadBalancer:
    lb = getattr(request.app.state, "lb", None)
    if lb is None:
        raise NotFoundError("the load balancer is not enabled on this appliance")
    return lb


LbDep = Annotated[LoadBalancer, Depends(get_lb)]

# Every route: 404 also when the load balancer is not enabled.
router = APIRouter(prefix="/api/v1/services", tags=["services"], responses=responses(404))
steer_router = APIRouter(prefix="/api/v1/cpu-steer", tags=["services"],
                         responses=responses(404))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ServicePublic,
             responses=responses(409, 503, 507))
def create_service(body: ServiceCreate, lb: LbDep, response: Response) -> ServicePublic:
    """Backends' MACs are resolved now: an unresolvable backend fails the request (422).
    forward proxy resolves no MACs; it listens on VIP:port, which must be free (409) and an
    address of the appliance (422)."""
    view = ServicePublic.of(lb, lb.create_service(body.spec()))
    response.headers["Location"] = f"{router.prefix}/{view.id}"
    return view


@router.get("", response_model=list[ServicePublic])
def list_services(lb: LbDep) -> list[ServicePublic]:
    with lb.lock:
        return [ServicePublic.of(lb, s) for s in lb.list_services()]


@router.get("/{service_id}", response_model=ServicePublic)
def get_service(service_id: int, lb: LbDep) -> ServicePublic:
    with lb.lock:
        return ServicePublic.of(lb, lb.get_service(service_id))


@router.delete("/{service_id}", response_model=ServicePublic, responses=responses(503))
def delete_service(service_id: int, lb: LbDep) -> ServicePublic:
    with lb.lock:
        view = ServicePublic.of(lb, lb.get_service(service_id))
        lb.delete_service(service_id)
    return view


@router.post(
    "/{service_id}/backends", status_code=status.HTTP_201_CREATED, response_model=BackendPublic,
    responses=responses(409, 503, 507),
)
def add_backend(service_id: int, body: BackendCreate, lb: LbDep,
                response: Response) -> BackendPublic:
    be = lb.add_backend(service_id, body.spec())
    with lb.lock:
        view = BackendPublic.of(lb, lb.get_service(service_id), be)
    response.headers["Location"] = f"{router.prefix}/{service_id}/backends/{view.id}"
    return view


@router.get("/{service_id}/backends", response_model=list[BackendPublic])
def list_backends(service_id: int, lb: LbDep) -> list[BackendPublic]:
    with lb.lock:
        svc = lb.get_service(service_id)
        return [BackendPublic.of(lb, svc, b) for b in svc.backends.values()]


@router.get("/{service_id}/backends/{backend_id}", response_model=BackendPublic)
def get_backend(service_id: int, backend_id: int, lb: LbDep) -> BackendPublic:
    with lb.lock:
        svc = lb.get_service(service_id)
        return BackendPublic.of(lb, svc, lb.get_backend(svc, backend_id))


@router.patch("/{service_id}/backends/{backend_id}", response_model=BackendPublic,
              responses=responses(503))
def update_backend(
    service_id: int, backend_id: int, body: BackendUpdate, lb: LbDep
) -> BackendPublic:
    """Change weight or state (`draining`: keeps established flows, takes no new ones)."""
    with lb.lock:
        be = lb.update_backend(service_id, backend_id, body.weight, body.state)
        return BackendPublic.of(lb, lb.get_service(service_id), be)


@router.delete("/{service_id}/backends/{backend_id}", response_model=BackendPublic,
               responses=responses(503))
def delete_backend(service_id: int, backend_id: int, lb: LbDep) -> BackendPublic:
    """Its established flows are re-balanced to the remaining backends."""
    with lb.lock:
        svc = lb.get_service(service_id)
        view = BackendPublic.of(lb, svc, lb.get_backend(svc, backend_id))
        lb.delete_backend(service_id, backend_id)
    return view


@steer_router.get("", response_model=CpuSteer)
def get_steer(lb: LbDep) -> CpuSteer:
    return CpuSteer(cpus=list(lb.steer))


@steer_router.put("", response_model=CpuSteer)
def set_steer(body: CpuSteer, lb: LbDep) -> CpuSteer:
    return CpuSteer(cpus=list(lb.set_steer(body.cpus)))
