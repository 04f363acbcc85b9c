"""Cost-savings estimate for a source and target, before spending any GPU time."""

from __future__ import annotations

from fastapi import APIRouter

from app import ligo_bridge, limits
from app.auth import CurrentTenant
from app.db import Checkpoint
from app.problems import field_problem, fields_of_ligo_errors
from app.schemas import EstimateIn
from app.services import Svc

router = APIRouter(prefix="/v1", tags=["estimate"])

# The estimate's parameters (an EstimateError's field) are this request's fields of the same name.
ESTIMATE_PARAMETERS = {name: name for name in ("fit_steps", "fit_batch", "seq_len", "tokens", "gpu",
                                               "price_per_gpu_hour", "utilisation", "strategy", "convention")}


@router.post("/estimate", responses={401: {"description": "No or wrong API key"},
                                     422: {"description": "A field is invalid; `errors[].field` names it"}})
def estimate(body: EstimateIn, tenant: CurrentTenant, svc: Svc):
    """FLOPs, GPU-hours and cost of fitting, training the grown model, and training from scratch."""
    if (body.source is None) == (body.checkpoint_id is None):
        raise field_problem("source", "give either `source` (a preset, fields or a config) or `checkpoint_id`")
    with fields_of_ligo_errors("target", ESTIMATE_PARAMETERS):
        if body.checkpoint_id is not None:
            with svc.db.read() as s:
                ckpt = s.get(Checkpoint, body.checkpoint_id)
            if ckpt is None or ckpt.tenant != tenant:
                raise field_problem("checkpoint_id", f"no checkpoint {body.checkpoint_id!r}")
            source = ligo_bridge.config_from_dict(ckpt.config)
        else:
            limits.check_spec(body.source, "source")
            with fields_of_ligo_errors("source"):
                source = ligo_bridge.resolve_source(body.source)
        limits.check_spec(body.target, "target")
        with fields_of_ligo_errors("target"):
            target = ligo_bridge.resolve_target(body.target, source.to_dict())
        limits.check_parameters(target, svc.settings.max_target_parameters)
        return ligo_bridge.estimate(
            source, target, strategy=body.strategy, fit_steps=body.fit_steps, fit_batch=body.fit_batch,
            seq_len=min(body.seq_len, ligo_bridge.max_positions(source)), tokens=body.tokens, gpu=body.gpu,
            price_per_gpu_hour=body.price_per_gpu_hour, utilisation=body.utilisation,
        )
