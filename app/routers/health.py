"""Liveness, readiness (database, broker, storage) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.problems import MEDIA_TYPE
from app.services import Svc

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


def _check(fn) -> str | None:
    try:
        fn()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]


@router.get("/readyz", responses={503: {"description": "A dependency is not reachable"}})
def readyz(svc: Svc):
    """Ready when the database, the broker and the storage all answer."""

    def database():
        with svc.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    checks = {"database": _check(database), "broker": _check(svc.dispatcher.check),
              "storage": _check(svc.storage.check)}
    body = {name: ("ok" if err is None else err) for name, err in checks.items()}
    if any(checks.values()):
        failed = ", ".join(n for n, e in checks.items() if e)
        return JSONResponse({"type": "urn:ligo:problem:not-ready", "title": "Service Unavailable", "status": 503,
                             "detail": f"not reachable: {failed}", "checks": body},
                            status_code=503, media_type=MEDIA_TYPE)
    return {"status": "ok", "checks": body}


@router.get("/metrics", response_class=Response)
def metrics(request: Request):
    """Prometheus text format: jobs by state, job durations, queue depth, HTTP requests."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
