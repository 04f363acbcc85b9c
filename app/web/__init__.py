"""Web form for people: upload, choose a target, preview the estimate, watch jobs (see docs/WEB.md)."""

from app.web.routes import router

__all__ = ["router"]
