"""The [metrics] listener's application: GET /metrics and nothing else.

No token and no write: Prometheus scrapes it without the API's credentials. Any other path
is a 404, any other method on /metrics a 405, so the listener can be opened to a monitoring
network without opening the API.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def create_metrics_app(registry: CollectorRegistry) -> Starlette:
    """registry: the API's own (app.state.metrics), so both serve the same series."""

    def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET", "HEAD"])])
