"""/api/v1/services: load-balanced virtual services and their backends; /api/v1/cpu-steer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.responses import JSONResponse

from xdpfw.api.deps import FleetDep
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


# On a fleet node ([fleet]) every write below is a guarded etcd transaction (fleet/lb_writer.py)
# answered once etcd has committed it and this node has applied it; the view is then this
# node's. If this node has not applied it in time, 202 says what etcd holds.
FLEET_PENDING = {202: {"description": "fleet node: committed to etcd, not applied here yet"}}


def _pending(service_id: int, **more) -> JSONResponse:
    return JSONResponse({"id": service_id, "applied_here": False, **more}, status_code=202)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ServicePublic,
             responses={**responses(409, 503, 507), **FLEET_PENDING})
def create_service(body: ServiceCreate, lb: LbDep, fleet: FleetDep,
                   response: Response) -> ServicePublic:
    """Backends' MACs are resolved now: an unresolvable backend fails the request (422); on
    a fleet node each node resolves them, and keeps a backend it cannot resolve unresolved.
    forward proxy resolves no MACs; it listens on VIP:port, which must be free (409) and an
    address of the appliance (422)."""
    if fleet is not None:
        sid, applied = fleet.create_service(body.spec())
        with lb.lock:
            if not applied or sid not in lb.services:
                return _pending(sid)
            view = ServicePublic.of(lb, lb.get_service(sid))
    else:
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


@router.delete("/{service_id}", response_model=ServicePublic,
               responses={**responses(409, 503), **FLEET_PENDING})
def delete_service(service_id: int, lb: LbDep, fleet: FleetDep) -> ServicePublic:
    with lb.lock:
        svc = lb.services.get(service_id) if fleet is not None else lb.get_service(service_id)
        view = ServicePublic.of(lb, svc) if svc is not None else None
        if fleet is None:
            lb.delete_service(service_id)
            return view
    applied = fleet.delete_service(service_id)  # this node may not have applied it
    return view if applied and view is not None else _pending(service_id, applied_here=applied)


@router.post(
    "/{service_id}/backends", status_code=status.HTTP_201_CREATED, response_model=BackendPublic,
    responses=responses(409, 503, 507),
)
def add_backend(service_id: int, body: BackendCreate, lb: LbDep, fleet: FleetDep,
                response: Response) -> BackendPublic:
    if fleet is not None:
        bid, applied = fleet.add_backend(service_id, body.spec())
        with lb.lock:
            svc = lb.services.get(service_id)
            if not applied or svc is None or bid not in svc.backends:
                return _pending(service_id, backend_id=bid)
            view = BackendPublic.of(lb, svc, svc.backends[bid])
    else:
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
              responses={**responses(409, 503), **FLEET_PENDING})
def update_backend(
    service_id: int, backend_id: int, body: BackendUpdate, lb: LbDep, fleet: FleetDep
) -> BackendPublic:
    """Change weight or state (`draining`: keeps established flows, takes no new ones)."""
    if fleet is not None:
        applied = fleet.update_backend(service_id, backend_id, body.weight, body.state)
        with lb.lock:
            svc = lb.services.get(service_id)
            if not applied or svc is None or backend_id not in svc.backends:
                return _pending(service_id, backend_id=backend_id)
            return BackendPublic.of(lb, svc, svc.backends[backend_id])
    with lb.lock:
        be = lb.update_backend(service_id, backend_id, body.weight, body.state)
        return BackendPublic.of(lb, lb.get_service(service_id), be)


@router.delete("/{service_id}/backends/{backend_id}", response_model=BackendPublic,
               responses={**responses(409, 503), **FLEET_PENDING})
def delete_backend(service_id: int, backend_id: int, lb: LbDep,
                   fleet: FleetDep) -> BackendPublic:
    """Its established flows are re-balanced to the remaining backends."""
    with lb.lock:
        if fleet is None:
            svc = lb.get_service(service_id)
            view = BackendPublic.of(lb, svc, lb.get_backend(svc, backend_id))
            lb.delete_backend(service_id, backend_id)
            return view
        svc = lb.services.get(service_id)
        be = svc.backends.get(backend_id) if svc is not None else None
        view = BackendPublic.of(lb, svc, be) if be is not None else None
    applied = fleet.delete_backend(service_id, backend_id)
    return view if applied and view is not None else _pending(
        service_id, backend_id=backend_id, applied_here=applied)


@steer_router.get("", response_model=CpuSteer)
def get_steer(lb: LbDep) -> CpuSteer:
    return CpuSteer(cpus=list(lb.steer))


@steer_router.put("", response_model=CpuSteer)
def set_steer(body: CpuSteer, lb: LbDep) -> CpuSteer:
    return CpuSteer(cpus=list(lb.set_steer(body.cpus)))
