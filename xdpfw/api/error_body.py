"""The one shape of every error the API answers: `{"detail": str, "errors": [...]}`.

`detail` is always a string a person can act on (its first line says it all; a build's log may
follow). `errors` is there only when a request failed validation: one entry per field. Request
validation, HTTPException, the typed errors of ERROR_STATUS, body limits and the last-resort 500
all answer with it, and `responses(...)` documents it in OpenAPI.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: body, query or path, then the field")
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong, for a person; the first line says it all")
    errors: list[FieldError] | None = Field(
        None, description="request validation only: every field that failed")


DESCRIPTIONS = {
    401: "No valid bearer token (TCP only; the unix socket needs none)",
    403: "Not allowed to this client",
    404: "No such resource, or the feature is not enabled",
    409: "Conflicts with existing state",
    413: "The request body is over this endpoint's limit",
    415: "Unsupported content type",
    422: "The request is malformed, or asks for something impossible",
    500: "Internal error (the daemon's log has the details), or the installed program does "
         "not build",
    503: "Not available now (storage locked or failing, a part not running)",
    507: "No room left (a BPF map, the disk or the database)",
}


def responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses=` for these error statuses, all with ErrorBody."""
    return {code: {"model": ErrorBody, "description": DESCRIPTIONS[code]} for code in codes}


def body(detail: str, errors: list[dict] | None = None) -> dict:
    return {"detail": detail} if errors is None else {"detail": detail, "errors": errors}


def _where(loc) -> str:
    # "body" alone says nothing to a person; "query.limit" and "rules.3.prefix" do.
    parts = [str(p) for p in loc]
    if parts[:1] == ["body"]:
        parts = parts[1:]
    return ".".join(parts)


def validation_detail(errors: list[dict]) -> tuple[str, list[dict]]:
    """(detail, errors) from pydantic's errors, without the inputs: a 30 MB blocklist is not
    echoed back, nor is a token."""
    fields = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
               "type": str(e.get("type", ""))} for e in errors]
    if not fields:
        return "the request is not valid", []
    first = fields[0]
    where = _where(first["loc"])
    detail = f"{where}: {first['msg']}" if where else first["msg"]
    if len(fields) > 1:
        detail += f" (and {len(fields) - 1} more: see errors)"
    return detail, fields


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail, fields = validation_detail(list(exc.errors()))
    return JSONResponse(body(detail, fields), status_code=422)


async def on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(body(detail), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def install(app) -> None:
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_exception)
