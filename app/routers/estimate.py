"""Cost-savings estimate for a source and target, before spending any GPU time."""

from __future__ import annotations

from fastapi import APIRouter

from app import ligo_bridge, limits
from app.auth import CurrentTenant
from app.db import Checkpoint
from app.problems import Problem, field_problem
from app.responses import JSONResponse
from app.schemas import EstimateIn
from app.services import Svc

router = APIRouter(prefix="/v1", tags=["estimate"])


@router.post("/estimate", responses={401: {"description": "No or wrong API key"},
                                     422: {"description": "A field is invalid; `errors[].field` names it"}})
def estimate(body: EstimateIn, tenant: CurrentTenant, svc: Svc):
    """FLOPs, GPU-hours and cost of fitting, training the grown model, and training from scratch."""
    if (body.source is None) == (body.checkpoint_id is None):
        raise field_problem("source", "give either `source` (a preset, fields or a config) or `checkpoint_id`")
    try:
        if body.checkpoint_id is not None:
            with svc.db.read() as s:
                ckpt = s.get(Checkpoint, body.checkpoint_id)
            if ckpt is None or ckpt.tenant != tenant:
                raise field_problem("checkpoint_id", f"no checkpoint {body.checkpoint_id!r}")
            source = ligo_bridge.config_from_dict(ckpt.config)
        else:
            limits.check_spec(body.source, "source")
            source = _field("source", ligo_bridge.resolve_source, body.source)
        limits.check_spec(body.target, "target")
        target = _field("target", ligo_bridge.resolve_target, body.target, source.to_dict())
        limits.check_parameters(target, svc.settings.max_target_parameters)
        result = ligo_bridge.estimate(
            source, target, strategy=body.strategy, fit_steps=body.fit_steps, fit_batch=body.fit_batch,
            seq_len=min(body.seq_len, ligo_bridge.max_positions(source)), tokens=body.tokens, gpu=body.gpu, price_per_gpu_hour=body.price_per_gpu_hour,
            utilisation=body.utilisation,
        )
    except Problem:
        raise
    except Exception as exc:
        if ligo_bridge.is_ligo_error(exc):
            raise field_problem(ligo_bridge.estimate_field(str(exc)) or "target", str(exc)) from None
        raise
    return JSONResponse(result)


def _field(name: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        if ligo_bridge.is_ligo_error(exc):
            raise field_problem(name, str(exc)) from None
        raise
