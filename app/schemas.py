"""Request and response bodies of the /v1 API (the OpenAPI document is built from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl

from app.db import JOB_STAGES, JOB_STATES, TERMINAL_STATES
from ligo_core import catalog

JobState = Literal[JOB_STATES]
JobStage = Literal[JOB_STAGES]
Strategy = Literal[catalog.STRATEGY_NAMES]
LigoInit = Literal[tuple(catalog.LIGO_INITS)]
OutputDtype = Literal[catalog.OUTPUT_DTYPES]
MAX_TOKENS = 10**15  # planned training tokens: 70x the largest public runs (15T)
MAX_PRICE = 10**6  # USD per GPU-hour
INT64 = 2**63 - 1


def renderable(value: Any, depth: int = 0) -> Any:
    """A JSON value the service can store and answer with again: integers within 64 bits, at
    most 8 levels deep and 10,000 entries (orjson refuses larger integers at answer time)."""
    if depth > 8:
        raise ValueError("nested more than 8 levels deep")
    if isinstance(value, bool) or value is None or isinstance(value, (float, str)):
        return value
    if isinstance(value, int):
        if abs(value) > INT64:
            raise ValueError(f"integer {value} does not fit in 64 bits")
        return value
    items = value.values() if isinstance(value, dict) else value
    if len(items) > 10_000:
        raise ValueError("more than 10,000 entries")
    for item in items:
        renderable(item, depth + 1)
    return value


Json = Annotated[dict[str, Any], AfterValidator(renderable)]


def bounded(option: catalog.Option, default: Any = None, **kwargs: Any) -> Any:
    """A field holding one of the engine's numbers, with the bounds ligo_core/catalog.py gives it."""
    low = {"gt": option.low} if option.low_open else {"ge": option.low}
    return Field(default, le=option.high, **low, **kwargs)
SpecText = Annotated[str, Field(min_length=1, max_length=1000)]
TargetSpec = SpecText | Json
Id = Annotated[str, Field(min_length=1, max_length=64)]
Uri = Annotated[str, Field(min_length=1, max_length=2048)]


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat().replace("+00:00", "Z")


class Strict(BaseModel):
    """Request bodies: unknown fields are refused, and so are NaN and infinite numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- checkpoints -------------------------------------------------------------------------------

class CheckpointOut(BaseModel):
    id: str
    filename: str
    size_bytes: int
    sha256: str
    family: str
    model_type: str
    config: dict[str, Any]
    num_parameters: int
    has_tokenizer: bool
    created_at: str


class CheckpointList(BaseModel):
    items: list[CheckpointOut]


class UploadCreate(Strict):
    filename: str = Field(min_length=1, max_length=255,
                          description="Name of the archive (.tar, .tar.gz, .tgz, .zip) or .safetensors file.")
    size_bytes: int = Field(gt=0, le=2**50, description="Exact size of the file to upload.")
    config: Json | None = Field(None, description="config.json contents, for a bare .safetensors file.")


class CompletedPart(Strict):
    part_number: int = Field(ge=1, le=10_000)
    etag: str = Field(min_length=1, max_length=256)


class UploadPart(BaseModel):
    part_number: int
    url: str


class UploadOut(BaseModel):
    id: str
    filename: str
    size_bytes: int
    part_size: int
    parts: list[UploadPart]
    expires_at: str
    uploaded: list[CompletedPart] = Field(
        default_factory=list,
        description="Parts S3 already holds, with their ETags (GET: to resume an upload, skip these).")


class UploadComplete(Strict):
    parts: list[CompletedPart] = Field(min_length=1, max_length=10_000)


class RegisterIn(Strict):
    uri: Uri = Field(description="s3://bucket/key of an existing archive the service can read.")
    config: Json | None = Field(None, description="config.json contents, for a bare .safetensors object.")


# --- jobs --------------------------------------------------------------------------------------

class FitOptions(Strict):
    steps: int = bounded(catalog.FIT_STEPS, catalog.DEFAULT_FIT_STEPS,
                         description="Fitting steps of the operator (LiGO only).")
    lr: float | None = bounded(catalog.FIT_LR, description=(
        f"Peak fitting learning rate (default {catalog.DEFAULT_FIT_LR:g})."))
    batch_size: int | None = bounded(catalog.BATCH_SIZE, description=(
        f"Sequences per fitting step (default {catalog.DEFAULT_BATCH_SIZE})."))
    seq_len: int | None = bounded(catalog.SEQ_LEN, description=(
        f"Tokens per fitting sequence (default {catalog.DEFAULT_SEQ_LEN}, at most the model's positions)."))
    data_uri: Uri | None = Field(None, description="s3://bucket/key of a text corpus; default: the shipped corpus.")
    eval_tokens: int | None = bounded(catalog.EVAL_TOKENS, description=(
        "Held-out tokens the small, grown and random models are scored on (default 64 sequences of seq_len; "
        "0 skips scoring, and then a fixed strategy's model is written tensor by tensor without being built: "
        "use 0 for big targets). The job's report gives the number used as eval_tokens."))


class GrowthOptions(Strict):
    """How the operator is built; empty fields take the engine's defaults (docs/GROWTH.md)."""

    spread: float | None = bounded(catalog.SPREAD, description=(
        f"How far growth moves copied units apart (default {catalog.spread_defaults_text()}). "
        "0 keeps the grown model exactly function-preserving; larger values start it a little further from "
        "the small model's outputs and train better. Not for net2net, which keeps exact copies."))
    noise: float | None = bounded(catalog.NOISE, description=(
        f"Symmetry breaking between copies that keeps the function exact (default {catalog.DEFAULT_NOISE:g}). "
        "Not for net2net."))
    ligo_init: LigoInit | None = Field(None, description=(
        "Where LiGO's fit starts (ligo only): "
        + "; ".join(f"{name}: {what}" for name, what in catalog.LIGO_INITS.items())
        + f" (default {catalog.DEFAULT_LIGO_INIT})."))
    dtype: OutputDtype | None = Field(None, description=(
        "dtype of the written weights: auto (default) keeps the checkpoint's, so bf16 stays bf16."))


class PlanOptions(Strict):
    tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Tokens the grown model will be trained on.")
    gpu: str = Field("H100", min_length=1, max_length=64)
    price_per_gpu_hour: float | None = Field(None, ge=0, le=MAX_PRICE)
    utilisation: float | None = Field(None, gt=0, le=1)


class JobCreate(Strict):
    checkpoint_id: Id
    target: TargetSpec = Field(description="A preset name, 'layers=..,hidden=..' fields, or a dict of fields.")
    strategy: Strategy = catalog.DEFAULT_STRATEGY
    fit: FitOptions = Field(default_factory=FitOptions)
    growth: GrowthOptions = Field(default_factory=GrowthOptions)
    plan: PlanOptions = Field(default_factory=PlanOptions)
    seed: int = bounded(catalog.SEED, catalog.DEFAULT_SEED)
    callback_url: HttpUrl | None = Field(None, max_length=2048)


class Progress(BaseModel):
    step: int
    total: int
    loss: float | None


class JobError(BaseModel):
    type: str
    detail: str


class WebhookState(BaseModel):
    state: Literal["waiting", "pending", "delivered", "failed"] = Field(description=(
        "waiting: the job has not finished; pending: being delivered or retried; delivered; "
        "failed: refused for good (a non-public address, a 4xx other than 408/429) or out of attempts"))
    attempts: int
    last_status: int | None = Field(description="HTTP status of the last attempt")
    last_error: str | None


class JobOut(BaseModel):
    id: str
    state: JobState
    stage: JobStage | None
    progress: Progress
    loss_history: list[tuple[int, float]]
    checkpoint_id: str
    target: TargetSpec
    target_config: dict[str, Any] = Field(description=(
        "The target as resolved against the checkpoint (config.json of the grown model): fields left out "
        "of `target` keep the source's proportions."))
    strategy: str
    fit: dict[str, Any]
    growth: dict[str, Any]
    plan: dict[str, Any]
    seed: int
    callback_url: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: JobError | None
    attempts: int
    cancel_requested: bool
    webhook: WebhookState | None = Field(description="Delivery of the callback_url webhook; null without one")
    fit_outcome: str | None = Field(None, description=(
        "Once succeeded: what LiGO's guarded fit wrote (improved, kept_start, stopped_diverged; "
        "the result's report.fit says more); null for fixed strategies and unfinished jobs."))


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class ResultFile(BaseModel):
    path: str
    size_bytes: int
    sha256: str | None = None
    url: str


class JobResult(BaseModel):
    files: list[ResultFile]
    report: dict[str, Any]
    estimate: dict[str, Any]
    expires_at: str


# --- estimate ----------------------------------------------------------------------------------

class EstimateIn(Strict):
    source: TargetSpec | None = Field(None, description="The small model: preset, fields or a config dict.")
    checkpoint_id: Id | None = Field(None, description="Or an uploaded checkpoint as the source.")
    target: TargetSpec
    strategy: Strategy = catalog.DEFAULT_STRATEGY
    fit_steps: int = bounded(catalog.FIT_STEPS, catalog.DEFAULT_FIT_STEPS)
    fit_batch: int | None = bounded(catalog.BATCH_SIZE, description=(
        f"Sequences per fitting step; default: the engine's, which `ligo grow` and jobs fit with "
        f"({catalog.DEFAULT_BATCH_SIZE})."))
    # An estimate may price any sequence length (the fit's own floor, SEQ_LEN.low, is not needed here).
    seq_len: int = Field(catalog.DEFAULT_SEQ_LEN, ge=1, le=catalog.SEQ_LEN.high)
    tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    gpu: str = Field("H100", min_length=1, max_length=64)
    price_per_gpu_hour: float | None = Field(None, ge=0, le=MAX_PRICE)
    utilisation: float | None = Field(None, gt=0, le=1)


def webhook_json(job, delivery=None) -> dict | None:
    """The webhook's delivery state: from its outbox row (``delivery``) once the job has finished."""
    if not job.callback_url:
        return None
    if delivery is None:
        return {"state": "pending" if job.state in TERMINAL_STATES else "waiting",
                "attempts": 0, "last_status": None, "last_error": None}
    state = "delivered" if delivery.delivered_at else "failed" if delivery.failed_at else "pending"
    return {"state": state, "attempts": delivery.attempts, "last_status": delivery.last_status,
            "last_error": delivery.last_error}


def job_json(job, delivery=None) -> dict:
    """The public JSON of a job row (also the ``data`` of its webhooks); ``delivery``: its webhook's
    outbox row, if any."""
    return {
        "id": job.id,
        "state": job.state,
        "stage": job.stage,
        "progress": {"step": job.progress_step, "total": job.progress_total, "loss": job.progress_loss},
        "loss_history": job.loss_history or [],
        "checkpoint_id": job.checkpoint_id,
        "target": job.target,
        "target_config": job.target_config,
        "strategy": job.strategy,
        "fit": job.fit,
        "growth": job.growth or {},
        "plan": job.plan,
        "seed": job.seed,
        "callback_url": job.callback_url,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "error": {"type": job.error_type, "detail": job.error_detail or ""} if job.error_type else None,
        "attempts": job.attempts,
        "cancel_requested": bool(job.cancel_requested),
        "webhook": webhook_json(job, delivery),
        "fit_outcome": (((job.manifest or {}).get("report") or {}).get("fit") or {}).get("outcome"),
    }


def checkpoint_json(ckpt) -> dict:
    return {
        "id": ckpt.id, "filename": ckpt.filename, "size_bytes": ckpt.size_bytes, "sha256": ckpt.sha256,
        "family": ckpt.family, "model_type": ckpt.model_type, "config": ckpt.config,
        "num_parameters": ckpt.num_parameters, "has_tokenizer": ckpt.has_tokenizer,
        "created_at": iso(ckpt.created_at),
    }
