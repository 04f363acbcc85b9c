"""RFC 9457 problem details: every error answer of the API is ``application/problem+json``.

A problem has ``type`` (a URN naming the kind, ``about:blank`` for a bare HTTP status),
``title``, ``status``, ``detail``, and for field errors ``errors: [{"field", "message"}]``
where ``field`` is a dotted path into the request (``target``, ``fit.steps``, ``filename``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.limits import OutOfBounds
from app.responses import JSONResponse

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:ligo:problem:"


class Problem(Exception):
    def __init__(self, status: int, slug: str, detail: str, *, title: str | None = None,
                 errors: list[dict] | None = None, headers: dict | None = None, extra: dict | None = None):
        super().__init__(detail)
        self.status, self.slug, self.detail = status, slug, detail
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors
        self.headers = headers
        self.extra = extra or {}  # RFC 9457 extension members (numbers a client can act on)

    def body(self, instance: str | None = None) -> dict:
        out = {**self.extra, "type": TYPE_PREFIX + self.slug, "title": self.title, "status": self.status,
               "detail": self.detail}
        if self.errors:
            out["errors"] = self.errors
        if instance:
            out["instance"] = instance
        return out


def field_problem(field: str, message: str, slug: str = "validation", status: int = 422) -> Problem:
    return Problem(status, slug, message, title="Invalid request", errors=[{"field": field, "message": message}])


@contextmanager
def fields_of_ligo_errors(field: str, fields: Mapping[str, str] | None = None) -> Iterator[None]:
    """Answer a ``ligo_core`` error raised inside as a 422 field problem: ``fields`` maps the
    error's own ``field`` (an estimate's parameter) to the request's name for it; any other error
    concerns ``field``. Other exceptions pass through."""
    try:
        yield
    except Exception as exc:
        # A LigoError comes from a loaded ligo_core: looked up here, it costs this module no import.
        errors = sys.modules.get("ligo_core.errors")
        if errors is None or not isinstance(exc, errors.LigoError):
            raise
        raise field_problem((fields or {}).get(exc.field, field), str(exc)) from None


def not_found(what: str, ident: str) -> Problem:
    return Problem(404, "not-found", f"no {what} {ident!r}")


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    return JSONResponse(problem.body(request.url.path if request else None), status_code=problem.status,
                        media_type=MEDIA_TYPE, headers=problem.headers)


def _union_member(part) -> bool:
    """A pydantic label for the member of a union that failed (``constrained-str``,
    ``function-after[renderable(), dict[str,any]]``): not a field of the request."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "constrained-str", "url"))


def _field_of(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header") and not _union_member(p)]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return problem_response(exc, request)

    @app.exception_handler(OutOfBounds)
    async def _out_of_bounds(request: Request, exc: OutOfBounds):
        return problem_response(field_problem(exc.field, exc.message), request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"field": _field_of(e.get("loc", ())), "message": e.get("msg", "invalid")} for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return problem_response(Problem(422, "validation", detail, title="Invalid request", errors=errors), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Logged by Starlette's error middleware; the client gets a problem, not a traceback.
        return problem_response(Problem(500, "internal", "the service failed to handle this request"), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        body = {"type": "about:blank", "title": HTTPStatus(exc.status_code).phrase, "status": exc.status_code,
                "detail": exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description}
        return JSONResponse(body, status_code=exc.status_code, media_type=MEDIA_TYPE,
                            headers=getattr(exc, "headers", None))
