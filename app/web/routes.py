"""The internal web form: static pages served by the API itself, and one small JSON endpoint.

The pages are plain HTML, CSS and JavaScript under ``static/`` (no build step, no CDN). They
talk to the public ``/v1`` API from the browser with the user's API key, so this router holds
no state, needs no key, and reads nothing but ligo_core's preset, family and strategy tables.

Routes (all outside the OpenAPI document):

- ``GET /`` and ``GET /ui`` redirect to ``/ui/``.
- ``GET /ui/`` and ``GET /ui/jobs/{id}``: the single page (the script picks the view by path).
- ``GET /ui/meta``: presets grouped by family, strategies with a one-line explanation, GPUs.
- ``GET /ui/static/{name}``: the page's assets.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

import ligo_core
from ligo_core.families import FAMILIES, family_for_model_type

STATIC_DIR = Path(__file__).parent / "static"

# One line each, shown next to the strategy's radio button. ligo_core may ship its own
# descriptions (STRATEGY_NOTES); these are the fallback.
STRATEGY_NOTES = {
    "ligo": "LiGO: a learned linear growth operator (depth blends and width expanders), "
            "fitted for a few steps on the model's own loss.",
    "stack": "Stacking (G_stack / StackBERT): the larger model repeats the whole layer stack.",
    "interpolate": "Interpolation: each layer is repeated in place (1, 1, 2, 2, ...).",
    "net2net": "Net2Net / bert2BERT: widths grown by copying units, depth by stacking.",
    "preserve": "Function-preserving: exact width expansion and zero-output new layers, "
                "so the grown model starts with the small model's outputs.",
}

# Defaults the form starts with: fitting as in the paper (100 steps), a small training plan.
FORM_DEFAULTS = {
    "strategy": "ligo",
    "fit_steps": 100,
    "fit_batch": 8,
    "seq_len": 128,
    "tokens": 10_000_000_000,
    "price_per_gpu_hour": 2.0,
    "utilisation": 0.4,
    "seed": 0,
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
    return FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})


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
    for preset in ligo_core.PRESETS.values():
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
    notes = {**STRATEGY_NOTES, **getattr(ligo_core, "STRATEGY_NOTES", {})}
    strategies = [{"name": s, "summary": notes.get(s, ""), "fitted": s == "ligo"} for s in ligo_core.STRATEGIES]
    return {
        "families": families,
        "strategies": strategies,
        "gpus": _gpus(),
        "defaults": FORM_DEFAULTS,
    }


def _gpus() -> list[dict]:
    """GPU types the estimator knows, from ligo_core.cost when it is there."""
    try:
        from ligo_core import cost
    except ImportError:
        return []
    table = getattr(cost, "GPUS", None)
    if not isinstance(table, dict):
        return []
    gpus = []
    for name, spec in table.items():
        entry = {"name": name}
        for key in ("peak_flops", "price_per_hour", "note"):
            value = getattr(spec, key, None) if not isinstance(spec, dict) else spec.get(key)
            if value is not None:
                entry[key] = value
        gpus.append(entry)
    return gpus
