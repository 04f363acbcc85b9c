"""The FastAPI application factory: ``uvicorn --factory app.main:create_app``."""

from __future__ import annotations

import contextlib
import logging
import re

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app import problems, web
from app.metrics import Metrics, MetricsMiddleware
from app.responses import JSONResponse
from app.routers import checkpoints, estimate, files, health, jobs
from app.services import Services
from app.settings import Settings, get_settings
from app.storage import S3Storage

DESCRIPTION = """Grow a small pretrained transformer checkpoint into a larger one with a learned
linear growth operator (LiGO) or a baseline, on GPU workers, and download the result.

Authenticate with `Authorization: Bearer <key>` (keys come from `ligo keys create`). Errors are
RFC 9457 `application/problem+json` documents; field errors list `errors[].field`."""


FILE_LINK = re.compile(r"/v1/files/[^\s?\"]+")


class RedactFileLinks(logging.Filter):
    """Signed download links are credentials until they expire: the access log shows
    ``/v1/files/[redacted]`` instead of the token."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(FILE_LINK.sub("/v1/files/[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str):
            record.msg = FILE_LINK.sub("/v1/files/[redacted]", record.msg)
        return True


DOCS_ASSETS = "/v1/docs/static"


def create_app(settings: Settings | None = None, *, maintenance: bool = True) -> FastAPI:
    settings = settings or get_settings()
    logging.getLogger("ligo").setLevel(settings.log_level.upper())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactFileLinks) for f in access.filters):
        access.addFilter(RedactFileLinks())
    svc = Services.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if maintenance:
            svc.start()
        try:
            yield
        finally:
            await svc.stop()

    # Swagger UI's script and style come from the fastapi-offline package, served here: the docs
    # page works on a cluster with no way out (FastAPI's own page loads them from a CDN).
    app = FastAPIOffline(title="LiGO growth service", version="1", description=DESCRIPTION, lifespan=lifespan,
                         openapi_url="/v1/openapi.json", docs_url="/v1/docs", redoc_url=None,
                         static_url=DOCS_ASSETS, swagger_ui_oauth2_redirect_url="/v1/docs/oauth2-redirect",
                         default_response_class=JSONResponse)
    app.state.services = svc
    app.state.metrics = Metrics(svc)
    problems.install(app)
    for module in (checkpoints, jobs, estimate, files, health):
        app.include_router(module.router)
    app.include_router(web.router)  # the web form: /, /ui/... (app/web, docs/WEB.md)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """The generated document, plus the bearer scheme on every /v1 operation that needs a key."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if not isinstance(app.state.services.storage, S3Storage):  # they answer 404 here
            for route in checkpoints.router.routes:
                if getattr(route, "endpoint", None) in checkpoints.S3_ONLY:
                    schema["paths"].pop(route.path, None)
        schema.setdefault("components", {})["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key from `ligo keys create`."}}
        for path, ops in schema["paths"].items():
            if path.startswith("/v1/") and not path.startswith("/v1/files/"):
                for op in ops.values():
                    op["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema
