"""The internal web form: static pages served by the API itself, and one small JSON endpoint.

The pages are plain HTML, CSS and JavaScript modules under ``static/`` (no build step, no CDN). They
talk to the public ``/v1`` API from the browser with the user's API key, so this router holds
no state, needs no key, and reads nothing but ligo_core's preset, family and strategy tables.

Routes (all outside the OpenAPI document):

- ``GET /`` and ``GET /ui`` redirect to ``/ui/``.
- ``GET /ui/`` and ``GET /ui/jobs/{id}``: the single page (the script picks the view by path).
- ``GET /ui/meta``: presets grouped by family, strategies with a one-line explanation, GPUs.
- ``GET /ui/static/{name}``: the page's assets: ``app.css`` and the script modules (``app.js``,
  the entry point, and the modules it imports, all beside it).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from ligo_core import catalog
from ligo_core.families import FAMILIES, family_for_model_type
from ligo_core.targets import PRESETS  # loaded with the app: the form's first /ui/meta answers at once

STATIC_DIR = Path(__file__).parent / "static"

# What the form starts with: the engine's strategy and fitting defaults (ligo_core/catalog.py),
# and the estimator's GPU, utilisation and token budget (empty tokens and price: the estimator's
# defaults apply).
FORM_DEFAULTS = {
    "strategy": catalog.DEFAULT_STRATEGY,
    "fit_steps": catalog.DEFAULT_FIT_STEPS,
    "fit_batch": catalog.DEFAULT_BATCH_SIZE,
    "seq_len": catalog.DEFAULT_SEQ_LEN,
    "seed": catalog.DEFAULT_SEED,
    "gpu": "H100",
    "utilisation": 0.4,
    "tokens": None,
    "tokens_per_parameter": 20,
    "price_per_gpu_hour": None,
}

# Pages hold an API key: allow scripts, styles and requests from this origin only.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

# Browsers run a module script only when it is served as JavaScript: say so rather than rely on
# the platform's MIME table (some map .js to text/plain).
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css"}

router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=1)
def _index_html() -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


def _page(request: Request) -> HTMLResponse:
    # The API root (non-empty behind a path-prefixing proxy) tells the script where /v1 is.
    root = request.scope.get("root_path", "").rstrip("/")
    html = _index_html().replace("{{ROOT}}", root)
    return HTMLResponse(html, headers=PAGE_HEADERS)


@router.get("/")
def home(request: Request) -> RedirectResponse:
    return RedirectResponse(request.scope.get("root_path", "").rstrip("/") + "/ui/")


@router.get("/ui")
def ui_no_slash(request: Request) -> RedirectResponse:
    return RedirectResponse(request.scope.get("root_path", "").rstrip("/") + "/ui/")


@router.api_route("/ui/", methods=["GET", "HEAD"], response_class=HTMLResponse)
def ui_page(request: Request) -> HTMLResponse:
    return _page(request)


@router.api_route("/ui/jobs/{job_id}", methods=["GET", "HEAD"], response_class=HTMLResponse)
def ui_job_page(job_id: str, request: Request) -> HTMLResponse:
    return _page(request)


@router.get("/ui/meta")
def ui_meta() -> JSONResponse:
    return JSONResponse(meta(), headers={"Cache-Control": "no-cache"})


@router.get("/ui/static/{name}")
def ui_static(name: str) -> FileResponse:
    if name not in _static_names():
        raise HTTPException(status_code=404, detail=f"no such asset: {name}")
    return FileResponse(STATIC_DIR / name, media_type=MEDIA_TYPES.get(Path(name).suffix),
                        headers={"Cache-Control": "no-cache"})


@lru_cache(maxsize=1)
def _static_names() -> frozenset[str]:
    # A fixed list read once: a request can never name a path outside the folder.
    return frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file() and p.name != "index.html")


@lru_cache(maxsize=1)
def meta() -> dict:
    """What the form needs to know without hardcoding it: families, presets, strategies, GPUs."""
    families: dict[str, dict] = {}
    for family in FAMILIES:
        families[family.name] = {
            "name": family.name,
            "objective": family.objective,
            "model_types": list(family.model_types),
            # our size field -> the HF config attribute, so the page can read a checkpoint's sizes
            "config_keys": dict(family.config_keys),
            "fields": [f for f in ("layers", "hidden", "heads", "kv_heads", "ffn") if f in family.config_keys],
            "presets": [],
        }
    for preset in PRESETS.values():
        family = family_for_model_type(preset.model_type)
        if family is None:
            continue
        families[family.name]["presets"].append({
            "name": preset.name,
            "model_type": preset.model_type,
            "layers": preset.layers,
            "hidden": preset.hidden,
            "heads": preset.heads,
            "kv_heads": preset.kv_heads or preset.heads,
            "ffn": preset.ffn,
            "vocab": preset.vocab,
            "note": preset.note,
        })
    strategies = [{"name": s.name, "summary": s.summary, "fitted": s.fitted} for s in catalog.STRATEGIES]
    return {
        "families": families,
        "strategies": strategies,
        "spread": {"low": catalog.SPREAD.low, "high": catalog.SPREAD.high,
                   "defaults": catalog.spread_defaults_text()},
        "gpus": _gpus(),
        "defaults": _defaults(),
    }


def _gpus() -> list[dict]:
    """Accelerators the estimator knows (ligo_core.cost), with its assumed list price."""
    try:
        from ligo_core import cost
    except ImportError:
        return []
    return [
        {"name": a.name, "peak_tflops": a.peak_tflops, "price": a.price, "source": a.source}
        for a in getattr(cost, "ACCELERATORS", {}).values()
    ]


def _defaults() -> dict:
    defaults = dict(FORM_DEFAULTS)
    try:
        from ligo_core import cost
    except ImportError:
        return defaults
    defaults["utilisation"] = getattr(cost, "DEFAULT_UTILISATION", defaults["utilisation"])
    defaults["tokens_per_parameter"] = getattr(cost, "TOKENS_PER_PARAMETER", defaults["tokens_per_parameter"])
    if defaults["gpu"] not in getattr(cost, "ACCELERATORS", {defaults["gpu"]: None}):
        defaults["gpu"] = next(iter(cost.ACCELERATORS), None)
    return defaults
