"""The OpenAPI document and /docs.

- Every operation documents the errors it can answer, all as ErrorBody: those its route
  declares (`responses=error_body.responses(...)`), and those every operation can give: 401
  (TCP without the token), 500, 422 where it takes parameters or a body, 413 where it takes a
  body. FastAPI's own list-shaped 422 schema is replaced.
- The bearer scheme is declared: required over TCP, not on the unix socket.
- A 201 says that `Location` names what was created (not a bulk load's: no one resource).
- /docs is Swagger UI from assets installed with the package (fastapi-offline's), never a CDN:
  an appliance is often offline. /docs, its assets and /openapi.json need no token, so a
  browser can load them and then "Authorize" with the token.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema

from xdpfw.api.error_body import DESCRIPTIONS, ErrorBody

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
REF_TEMPLATE = "#/components/schemas/{model}"
BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "api.token (or XDPFW_API_TOKEN): required over TCP ([api] listen); the "
                   "daemon's unix socket needs none",
}
METHODS = ("get", "put", "post", "delete", "patch")


def is_public(path: str) -> bool:
    """Readable without the token (see the module docstring)."""
    return path == "/openapi.json" or path == DOCS_URL or path.startswith(ASSETS_URL + "/")


def body_schema_ref(*models) -> dict:
    """A request body schema for `openapi_extra` (routes that read their body themselves):
    a oneOf of refs into components, which install() fills in."""
    _EXTRA_MODELS.update(models)
    return {"oneOf": [{"$ref": REF_TEMPLATE.format(model=m.__name__)} for m in models]}


_EXTRA_MODELS: set = set()


def install(app: FastAPI) -> None:
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    app.openapi = openapi


def _document(app: FastAPI) -> dict:
    spec = get_openapi(title=app.title, version=app.version, description=app.description,
                       routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema([(m, "validation") for m in (ErrorBody, *_EXTRA_MODELS)],
                                 ref_template=REF_TEMPLATE)
    schemas.update(defs.get("$defs", {}))
    for gone in ("HTTPValidationError", "ValidationError"):
        schemas.pop(gone, None)
    spec["components"]["securitySchemes"] = {"bearer": BEARER}
    spec["security"] = [{"bearer": []}, {}]  # {}: none, on the unix socket

    error = {"$ref": REF_TEMPLATE.format(model="ErrorBody")}
    for path, item in spec.get("paths", {}).items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            codes = {401, 500}
            if op.get("parameters") or op.get("requestBody"):
                codes.add(422)
            if op.get("requestBody"):
                codes.add(413)
            out = op.setdefault("responses", {})
            for code in sorted(codes):
                out[str(code)] = {"description": DESCRIPTIONS[code],
                                  "content": {"application/json": {"schema": error}}}
            if "201" in out and not path.endswith("/bulk"):  # a set has no one Location
                out["201"].setdefault("headers", {})["Location"] = {
                    "description": "the path of what was created",
                    "schema": {"type": "string"}}
    return spec
