"""Jobs: submit (validated against the checkpoint at once), read, list, cancel, fetch the result."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy import select

from app import lifecycle, ligo_bridge, limits
from app.auth import CurrentTenant
from app.db import TERMINAL_STATES, Checkpoint, Job, utcnow
from app.problems import Problem, field_problem, fields_of_ligo_errors, not_found
from app.routers.checkpoints import check_external_uri
from app.schemas import JobCreate, JobList, JobOut, JobResult, ResultFile, iso, job_json
from app.services import Services, Svc
from ligo_core import catalog

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

DATA_SUFFIXES = (".txt", ".jsonl")
# The cost estimate's parameters (an EstimateError's field) -> where a job request sets them.
ESTIMATE_PARAMETERS_IN_JOB = {
    "fit_steps": "fit.steps", "fit_batch": "fit.batch_size", "seq_len": "fit.seq_len", "tokens": "plan.tokens",
    "gpu": "plan.gpu", "price_per_gpu_hour": "plan.price_per_gpu_hour", "utilisation": "plan.utilisation",
    "strategy": "strategy",
}


def _read_job(svc: Services, job_id: str):
    return svc.db.jobs.get(job_id)


def _job_of(svc: Services, tenant: str, job_id: str, job: Job | None = None) -> Job:
    job = job or _read_job(svc, job_id)
    if job is None or job.tenant != tenant:
        raise not_found("job", job_id)
    return job


def job_estimate(source, target_config, body: JobCreate, batch_size: int, seq_len: int) -> dict:
    """The cost estimate for a job, with the fitting settings the engine will use."""
    plan = body.plan
    return ligo_bridge.estimate(
        source, target_config, strategy=body.strategy, fit_steps=body.fit.steps if body.strategy == "ligo" else 0,
        fit_batch=batch_size, seq_len=seq_len, tokens=plan.tokens, gpu=plan.gpu,
        price_per_gpu_hour=plan.price_per_gpu_hour, utilisation=plan.utilisation,
    )


def _check_growth(body: JobCreate) -> None:
    growth = body.growth
    if growth.ligo_init is not None and body.strategy != "ligo":
        raise field_problem("growth.ligo_init", f"ligo_init sets where LiGO's fit starts; strategy "
                                                f"{body.strategy!r} has no fit")
    if body.strategy == "net2net":
        for name in ("spread", "noise"):
            if getattr(growth, name):
                raise field_problem(f"growth.{name}", f"net2net keeps exact copies of units (bert2BERT as "
                                                      f"published), so {name} does not apply; 'preserve' grows "
                                                      f"function-preservingly and moves copies apart")


def _validate(svc: Services, tenant: str, body: JobCreate) -> tuple[Checkpoint, dict]:
    with svc.db.read() as s:
        ckpt = s.get(Checkpoint, body.checkpoint_id)
    if ckpt is None or ckpt.tenant != tenant:
        raise field_problem("checkpoint_id", f"no checkpoint {body.checkpoint_id!r}")
    limits.check_spec(body.target, "target")
    with fields_of_ligo_errors("target"):
        target = ligo_bridge.resolve_target(body.target, ckpt.config)
    limits.check_parameters(target, svc.settings.max_target_parameters)
    if body.strategy == "ligo" and body.fit.steps > 0 and not ckpt.has_tokenizer:
        raise field_problem("checkpoint_id", "the checkpoint has no tokenizer files, which fitting 'ligo' needs; "
                                             "upload it with its tokenizer, set fit.steps to 0, or pick another strategy")
    _check_growth(body)
    # The fitting settings the engine will use: the estimate, the memory plan and eval_tokens read them.
    source = ligo_bridge.config_from_dict(ckpt.config)
    batch_size = body.fit.batch_size or catalog.DEFAULT_BATCH_SIZE
    seq_len = min(body.fit.seq_len or catalog.DEFAULT_SEQ_LEN, ligo_bridge.max_positions(source))
    if problem := catalog.eval_tokens_problem(body.fit.eval_tokens, seq_len):
        raise field_problem("fit.eval_tokens", problem)
    if body.fit.data_uri is not None:
        _bucket, key = check_external_uri(svc, body.fit.data_uri, "fit.data_uri")
        if not key.lower().endswith(DATA_SUFFIXES):
            raise field_problem("fit.data_uri", "the fitting data must be a .txt or .jsonl object")
        try:
            svc.storage.head_uri(_bucket, key)
        except Exception as exc:
            raise field_problem("fit.data_uri", f"cannot read {body.fit.data_uri}: {exc}") from None
    with fields_of_ligo_errors("plan", ESTIMATE_PARAMETERS_IN_JOB):
        job_estimate(source, target, body, batch_size, seq_len)
    if svc.settings.worker_memory_gb is not None:
        _check_memory(ckpt, target, body, batch_size, seq_len, svc.settings.worker_memory_gb,
                      svc.settings.worker_gpus)
    return ckpt, target.to_dict()


def _check_memory(ckpt: Checkpoint, target, body: JobCreate, batch_size: int, seq_len: int,
                  budget_gb: float, processes: int) -> None:
    """Refuse at once a job whose memory plan (from the configs alone) is above the workers' budget."""
    refused = ligo_bridge.memory_refusal(
        ckpt.config, target, strategy=body.strategy, fit_steps=body.fit.steps, batch_size=batch_size, seq_len=seq_len,
        scored=ckpt.has_tokenizer and body.fit.eval_tokens != 0, dtype=body.growth.dtype, budget_gb=budget_gb,
        processes=processes,
    )
    if refused is not None:
        detail = refused.pop("detail")
        raise Problem(422, "memory-plan", detail, title="The job does not fit the workers' memory",
                      errors=[{"field": "target", "message": detail}], extra=refused)


def _request_hash(body: JobCreate) -> str:
    # Default growth options are left out, so a request keeps the hash it had before they existed.
    fields = body.model_dump(mode="json", exclude=None if body.growth.model_dump(exclude_none=True) else {"growth"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _existing(svc: Services, tenant: str, key: str) -> Job | None:
    with svc.db.read() as s:
        return s.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))


def _job_out(job, delivery=None) -> JobOut:
    return JobOut.model_validate(job_json(job, delivery))


def _located(job, response: Response) -> JobOut:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _job_out(job)


def _replay(job: Job, request_hash: str, response: Response) -> JobOut:
    if job.request_hash != request_hash:
        raise Problem(422, "idempotency-key-reused", "this Idempotency-Key was used for a different request",
                      errors=[{"field": "Idempotency-Key", "message": "already used with another request body"}])
    response.status_code = 200  # the job made earlier, not a new one
    return _located(job, response)


@router.post("", status_code=202, response_model=JobOut, responses={
    200: {"model": JobOut, "description": "The job made earlier with the same Idempotency-Key"},
    401: {"description": "No or wrong API key"},
    422: {"description": "A field is invalid; `errors[].field` names it"}})
def create_job(body: JobCreate, tenant: CurrentTenant, svc: Svc, response: Response,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JobOut:
    """Queue a growth job. Answers 202 with `Location: /v1/jobs/{id}`."""
    request_hash = _request_hash(body)
    if idempotency_key is not None:
        existing = _existing(svc, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash, response)
    ckpt, target_config = _validate(svc, tenant, body)
    job = Job(
        tenant=tenant, checkpoint_id=ckpt.id, state="queued", target=body.target, target_config=target_config,
        strategy=body.strategy, fit=body.fit.model_dump(),
        growth=body.growth.model_dump(exclude_none=True), plan=body.plan.model_dump(), seed=body.seed,
        callback_url=str(body.callback_url) if body.callback_url else None, idempotency_key=idempotency_key,
        request_hash=request_hash, loss_history=[], attempts=0, cancel_requested=False,
        progress_step=0, progress_total=0, created_at=utcnow(),
    )
    job, created = lifecycle.create_job(svc.db, job)
    if not created:
        return _replay(job, request_hash, response)
    svc.dispatcher.dispatch(job.id)
    return _located(job, response)


def _scalars(svc: Services, query) -> list:
    with svc.db.read() as s:
        return s.scalars(query).all()


def _cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=")


JOB_ID = re.compile(r"[0-9a-f]{32}")


def _uncursor(cursor: str) -> str:
    """The job id in a cursor; anything else is the client's mistake (400), whatever its bytes."""
    try:
        value = base64.urlsafe_b64decode(cursor[:64] + "=" * (-len(cursor[:64]) % 4)).decode()
    except ValueError:  # bad base64, non-ASCII text, bytes that are not UTF-8
        value = ""
    if len(cursor) > 64 or not JOB_ID.fullmatch(value):
        raise field_problem("cursor", "not a cursor from a previous page", status=400)
    return value


@router.get("", response_model=JobList, responses={400: {"description": "The cursor is not one this API gave"},
                                                    401: {"description": "No or wrong API key"}})
async def list_jobs(tenant: CurrentTenant, svc: Svc,
              state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
              cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    """The tenant's jobs, newest first; pass `next_cursor` back as `cursor` for the next page."""
    query = select(Job).where(Job.tenant == tenant)
    if state:
        query = query.where(Job.state == state)
    if cursor:
        query = query.where(Job.id < _uncursor(cursor))
    rows = await svc.db.call(_scalars, svc, query.order_by(Job.id.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    hooks = await svc.db.call(lifecycle.webhook_deliveries, svc.db, rows)
    return JobList(items=[_job_out(j, hooks.get(j.id)) for j in rows],
                   next_cursor=_cursor(rows[-1].id) if more else None)


@router.get("/{job_id}", response_model=JobOut, responses={404: {"description": "No such job"}})
async def get_job(job_id: str, tenant: CurrentTenant, svc: Svc) -> JobOut:
    job = _job_of(svc, tenant, job_id, await svc.db.call(_read_job, svc, job_id))
    hooks = await svc.db.call(lifecycle.webhook_deliveries, svc.db, [job])
    return _job_out(job, hooks.get(job.id))


@router.delete("/{job_id}", status_code=202, response_model=JobOut, responses={
    404: {"description": "No such job"}, 409: {"description": "The job has already finished"}})
def cancel_job(job_id: str, tenant: CurrentTenant, svc: Svc, response: Response) -> JobOut:
    """Cancel: a queued job at once, a running one at its next step (partial outputs removed)."""
    job = _job_of(svc, tenant, job_id)
    if job.state in TERMINAL_STATES:
        raise Problem(409, "job-finished", f"job {job_id} has already {job.state}")
    job = lifecycle.request_cancel(svc.db, tenant, job_id)
    return _located(job, response)


@router.get("/{job_id}/result", response_model=JobResult, responses={
    404: {"description": "No such job"}, 409: {"description": "The job has not succeeded"}})
def job_result(job_id: str, request: Request, tenant: CurrentTenant, svc: Svc) -> JobResult:
    """Download links (expiring) for every output file, the growth report and the cost estimate."""
    job = _job_of(svc, tenant, job_id)
    if job.state != "succeeded" or not job.manifest:
        raise Problem(409, "not-succeeded", f"job {job_id} is {job.state}; results exist once it has succeeded")
    ttl = svc.settings.url_ttl_seconds
    base = svc.settings.public_url or str(request.base_url)
    manifest = job.manifest
    files = [ResultFile(path=f["path"], size_bytes=f["size_bytes"], sha256=f.get("sha256"),
                        url=svc.storage.download_url(f"jobs/{job_id}/output/{f['path']}",
                                                     f["path"].rsplit("/", 1)[-1], ttl, base))
             for f in manifest["files"]]
    return JobResult(files=files, report=manifest["report"], estimate=manifest["estimate"],
                     expires_at=iso(utcnow() + timedelta(seconds=ttl)))
