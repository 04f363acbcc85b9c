"""Request and response bodies of the /v1 API (the OpenAPI document is built from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobStage = Literal["downloading", "loading", "evaluating", "fitting", "materialising", "saving", "uploading"]
Strategy = Literal["ligo", "stack", "interpolate", "net2net", "preserve"]
TargetSpec = str | dict[str, Any]


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat().replace("+00:00", "Z")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class UploadCreate(Strict):
    filename: str = Field(description="Name of the archive (.tar, .tar.gz, .tgz, .zip) or .safetensors file.")
    size_bytes: int = Field(gt=0, description="Exact size of the file to upload.")
    config: dict[str, Any] | None = Field(None, description="config.json contents, for a bare .safetensors file.")


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


class CompletedPart(Strict):
    part_number: int = Field(ge=1, le=10_000)
    etag: str


class UploadComplete(Strict):
    parts: list[CompletedPart] = Field(min_length=1)


class RegisterIn(Strict):
    uri: str = Field(description="s3://bucket/key of an existing archive the service can read.")
    config: dict[str, Any] | None = Field(None, description="config.json contents, for a bare .safetensors object.")


# --- jobs --------------------------------------------------------------------------------------

class FitOptions(Strict):
    steps: int = Field(100, ge=0, le=1_000_000, description="Fitting steps of the operator (LiGO only).")
    lr: float | None = Field(None, gt=0, le=1.0, description="Peak fitting learning rate (default 1e-4).")
    batch_size: int | None = Field(None, ge=1, le=65_536)
    seq_len: int | None = Field(None, ge=8, le=1_048_576)
    data_uri: str | None = Field(None, description="s3://bucket/key of a text corpus; default: the shipped corpus.")


class GrowthOptions(Strict):
    """How the operator is built; empty fields take the engine's defaults (docs/GROWTH.md)."""

    spread: float | None = Field(None, ge=0, le=4, description=(
        "How far growth moves copied units apart (default 0 for preserve, 2 for the other strategies). "
        "0 keeps the grown model exactly function-preserving; larger values start it a little further from "
        "the small model's outputs and train better. Not for net2net, which keeps exact copies."))
    noise: float | None = Field(None, ge=0, le=1, description=(
        "Symmetry breaking between copies that keeps the function exact (default 1). Not for net2net."))
    ligo_init: Literal["preserve", "stack", "interpolate"] | None = Field(None, description=(
        "Where LiGO's fit starts (ligo only): the exact function-preserving operator (default), "
        "the stacked depth of the reference code, or each layer repeated in place."))


class PlanOptions(Strict):
    tokens: int | None = Field(None, ge=1, description="Tokens the grown model will be trained on.")
    gpu: str = "H100"
    price_per_gpu_hour: float | None = Field(None, ge=0)
    utilisation: float | None = Field(None, gt=0, le=1)


class JobCreate(Strict):
    checkpoint_id: str
    target: TargetSpec = Field(description="A preset name, 'layers=..,hidden=..' fields, or a dict of fields.")
    strategy: Strategy = "ligo"
    fit: FitOptions = Field(default_factory=FitOptions)
    growth: GrowthOptions = Field(default_factory=GrowthOptions)
    plan: PlanOptions = Field(default_factory=PlanOptions)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    callback_url: HttpUrl | None = None


class Progress(BaseModel):
    step: int
    total: int
    loss: float | None


class JobError(BaseModel):
    type: str
    detail: str


class JobOut(BaseModel):
    id: str
    state: JobState
    stage: JobStage | None
    progress: Progress
    loss_history: list[tuple[int, float]]
    checkpoint_id: str
    target: TargetSpec
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
    checkpoint_id: str | None = Field(None, description="Or an uploaded checkpoint as the source.")
    target: TargetSpec
    strategy: Strategy = "ligo"
    fit_steps: int = Field(100, ge=0, le=1_000_000)
    fit_batch: int = Field(256, ge=1, le=65_536)
    seq_len: int = Field(128, ge=1, le=1_048_576)
    tokens: int | None = Field(None, ge=1)
    gpu: str = "H100"
    price_per_gpu_hour: float | None = Field(None, ge=0)
    utilisation: float | None = Field(None, gt=0, le=1)


def job_json(job) -> dict:
    """The public JSON of a job row (also the ``data`` of its webhooks)."""
    return {
        "id": job.id,
        "state": job.state,
        "stage": job.stage,
        "progress": {"step": job.progress_step, "total": job.progress_total, "loss": job.progress_loss},
        "loss_history": job.loss_history or [],
        "checkpoint_id": job.checkpoint_id,
        "target": job.target,
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
        "fit_outcome": (((job.manifest or {}).get("report") or {}).get("fit") or {}).get("outcome"),
    }


def checkpoint_json(ckpt) -> dict:
    return {
        "id": ckpt.id, "filename": ckpt.filename, "size_bytes": ckpt.size_bytes, "sha256": ckpt.sha256,
        "family": ckpt.family, "model_type": ckpt.model_type, "config": ckpt.config,
        "num_parameters": ckpt.num_parameters, "has_tokenizer": ckpt.has_tokenizer,
        "created_at": iso(ckpt.created_at),
    }
