"""create_app(): the FastAPI application, wired to a Firewall given by the caller."""

from __future__ import annotations

import hmac
import logging
import sqlite3
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from xdpfw.api import error_body, openapi
from xdpfw.api.audit import TOKEN_KEY, AuditTrail
from xdpfw.api.middleware import BodyLimit, BodyLimits, JsonErrors, internal_error
from xdpfw.api.peer import peer_of
from xdpfw.api.routes import audit as audit_routes
from xdpfw.api.routes import capture as capture_routes
from xdpfw.api.routes import config as config_routes
from xdpfw.api.routes import dashboard, explain, interfaces, rules, services, sets, stats
from xdpfw.api.routes import events as events_routes
from xdpfw.api.routes import metrics as metrics_routes
from xdpfw.api.routes import program as program_routes
from xdpfw.config import ConfigError
from xdpfw.db import storage_error
from xdpfw.errors import (
    AttachError,
    BackendUnresolvedError,
    BpffsError,
    CompileError,
    ConflictError,
    MapFullError,
    NotFoundError,
    RuleValidationError,
    ServiceValidationError,
    SourceRefusedError,
    StorageError,
    StorageFullError,
    VerifierError,
)
from xdpfw.lb.metrics import LbCollector
from xdpfw.metrics import RuleSeries, build_registry
from xdpfw.rulehits import RuleHits
from xdpfw.service import Firewall

log = logging.getLogger(__name__)

# The one table from error to HTTP status. An error gets the status of the first class of its
# MRO listed here, so a subclass listed overrides its bases. Unlisted errors are a 500 that
# names only the error's type (middleware.JsonErrors).
ERROR_STATUS: dict[type[Exception], int] = {
    RuleValidationError: 422,
    ConfigError: 422,  # a config file reloaded (POST /api/v1/config/reload) has a mistake
    # Also lb.maglev.MaglevError, lb.health.HealthConfigError, and proxy.engine.ListenError:
    # a proxy service's VIP:port cannot be listened on.
    ServiceValidationError: 422,
    BackendUnresolvedError: 422,  # the backend's MAC is unknown (lb.neigh.NeighbourUnresolved)
    AttachError: 422,  # the requested attachment is not possible
    SourceRefusedError: 422,
    NotFoundError: 404,
    # Also proxy.engine.AddressInUseError (a proxy VIP:port something listens on) and
    # proxy.fallback.ProxyUnavailableError (sockhash demanded, and refused).
    ConflictError: 409,
    MapFullError: 507,
    StorageFullError: 507,  # the disk, or the database's size limit
    StorageError: 503,  # I/O error, locked, read-only
    CompileError: 500,
    VerifierError: 500,
    BpffsError: 500,
}


def status_of(exc: BaseException) -> int | None:
    return next((ERROR_STATUS[c] for c in type(exc).__mro__ if c in ERROR_STATUS), None)


# Endpoints that take a whole set in one request: they get BodyLimits.sets, not .default
# (BodyLimits says how these read).
SET_PATHS = frozenset({"/api/v1/rules/bulk", "PUT /api/v1/rules", "PUT /api/v1/sets/"})


def create_app(
    firewall: Firewall,
    token: str | Mapping[str, str] | None = None,
    events=None,
    lb=None,
    body_limits: BodyLimits | None = None,
    capture=None,
    rule_series: RuleSeries | None = None,
    config_path: str | None = None,
) -> FastAPI:
    """token: required from every client but the daemon's unix socket (local, by permission);
    several, by name ({name: token}), tell clients apart in the audit trail (a lone token is
    named "default").
    events: the daemon's xdpfw.events.EventHub (None: /api/v1/events answers 503).
    lb: the xdpfw.lb.service.LoadBalancer (None: /api/v1/services answers 404).
    body_limits: request body limits (default: 1 MiB, 64 MiB for SET_PATHS).
    capture: the daemon's xdpfw.capture.CaptureHub (None: /api/v1/capture answers 503).
    rule_series: how many per-rule and per-set series /metrics holds.
    config_path: the daemon's config file, which `POST /api/v1/config/reload` reads again."""
    app = FastAPI(
        title="xdpfw",
        version="0.1.0",
        description="XDP firewall appliance: source-prefix rules enforced in XDP.",
        docs_url=None,  # openapi.install serves /docs from the package's assets
        redoc_url=None,
    )
    app.state.firewall = firewall
    app.state.events = events
    app.state.lb = lb
    app.state.capture = capture
    app.state.rule_hits = RuleHits(firewall)
    # The Dataplane the firewall runs on: metrics read counters from its maps.
    app.state.metrics = build_registry(firewall, firewall.dp, events, rule_series,
                                       capture)  # others register too
    if lb is not None:
        app.state.metrics.register(LbCollector(lb))
    app.state.shutdown = None  # set by `xdpfw serve`: POST /api/v1/shutdown calls it
    app.state.config_path = config_path
    for router in (rules.router, sets.router, explain.router, audit_routes.router,
                   config_routes.router, interfaces.router, stats.router):
        app.include_router(router)
    for router in (metrics_routes.router, program_routes.router, events_routes.router,
                   capture_routes.router):
        app.include_router(router)
    for router in (services.router, services.steer_router):
        app.include_router(router)
    app.include_router(dashboard.router)
    app.mount(dashboard.UI_PATH, dashboard.ui_files(), name="ui")

    error_body.install(app)  # one error shape: {"detail": str, "errors": [...]?}
    openapi.install(app)
    for exc_type, code in ERROR_STATUS.items():
        app.add_exception_handler(exc_type, _handler(code))
    for exc_type in (sqlite3.Error, OSError):  # storage, or else a plain 500
        app.add_exception_handler(exc_type, _storage_handler)

    # Middleware added later wraps what was added before: JsonErrors(token(BodyLimit(app))),
    # so a client without the token is turned away before any of its body is read.
    limits = body_limits or BodyLimits()
    app.add_middleware(BodyLimit, limits=BodyLimits(limits.default, limits.sets, SET_PATHS))

    tokens = {"default": token} if isinstance(token, str) else dict(token or {})

    @app.middleware("http")
    async def bearer_token_off_the_unix_socket(request: Request, call_next):
        # Only the daemon's unix socket reports the peer's credentials (xdpfw.api.peer).
        # The dashboard's files and the API docs hold no data (the page asks for the token;
        # a browser opening the docs has none), so they are served without one.
        public = openapi.is_public(request.url.path) or _ui_file(request)
        if peer_of(request.scope) is None and tokens and not public:
            name = _token_name(request.headers.get("authorization", ""), tokens)
            request.scope.setdefault("state", {})[TOKEN_KEY] = name
            if name is None:
                return JSONResponse(
                    {"detail": "a bearer token is required over TCP"},
                    status_code=401,
                    # No second request on a connection that has not shown the token.
                    headers={"WWW-Authenticate": "Bearer", "Connection": "close"},
                )
        return await call_next(request)

    app.add_middleware(JsonErrors)
    app.state.audit_log = firewall.audit
    app.add_middleware(AuditTrail, log=firewall.audit)  # outermost: it sees every answer
    return app


def _token_name(header: str, tokens: Mapping[str, str]) -> str | None:
    """The name of the token `header` shows; every one compared, in constant time each."""
    found = None
    for name, value in tokens.items():
        if hmac.compare_digest(header.encode(), f"Bearer {value}".encode()):
            found = name
    return found


def _ui_file(request: Request) -> bool:
    path = request.url.path
    return request.method in ("GET", "HEAD") and (
        path == dashboard.UI_PATH or path.startswith(dashboard.UI_PATH + "/"))


def _handler(code: int):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if code >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=code)

    return handle


async def _storage_handler(request: Request, exc: Exception) -> JSONResponse:
    """A failing disk or database file is a StorageError (503/507); any other OSError or
    SQLite error is a 500 that names only its type (its message may hold paths)."""
    typed = storage_error(exc)
    if typed is None:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": internal_error(exc)}, status_code=500)
    log.error("%s %s: %s", request.method, request.url.path, typed)
    return JSONResponse({"detail": str(typed)}, status_code=status_of(typed))
