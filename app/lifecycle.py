"""Every change of a job's state happens here, as a conditional UPDATE on the job row.

    queued --claim--> running --finish--> succeeded | failed | cancelled
    queued --cancel--> cancelled
    running --lease expired--> queued (again) | failed (too many attempts) | cancelled

The row is the source of truth; the broker only delivers job ids. A worker owns a running
job through a lease (``lease_owner``, ``lease_expires_at``) that its heartbeat extends;
every write a worker makes is conditional on still holding the lease, so a job whose worker
was presumed dead and re-queued finishes exactly once. A terminal transition writes the
job's webhook into the outbox table in the same transaction.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import TERMINAL_STATES, Database, Job, WebhookDelivery, utcnow
from app.schemas import iso, job_json


def _event_type(state: str) -> str:
    return f"job.{state}"


def _enqueue_webhook(s: Session, job: Job, now: datetime) -> None:
    if not job.callback_url:
        return
    msg_id = "msg_" + secrets.token_hex(16)
    payload = json.dumps({"type": _event_type(job.state), "timestamp": iso(now), "data": job_json(job)},
                         separators=(",", ":"))
    s.add(WebhookDelivery(id=msg_id, job_id=job.id, tenant=job.tenant, url=job.callback_url,
                          event_type=_event_type(job.state), payload=payload, next_attempt_at=now))


def _terminal(s: Session, job_id: str, where, now: datetime, state: str, *, error_type: str | None = None,
              error_detail: str | None = None, manifest: dict | None = None) -> bool:
    values = dict(state=state, finished_at=now, lease_owner=None, lease_expires_at=None)
    if state == "succeeded":
        values["stage"] = None
    if error_type:
        values.update(error_type=error_type, error_detail=(error_detail or "")[:4000])
    if manifest is not None:
        values["manifest"] = manifest
    done = s.execute(update(Job).where(Job.id == job_id, where).values(**values)).rowcount == 1
    if done:
        job = s.get(Job, job_id, populate_existing=True)
        _enqueue_webhook(s, job, now)
    return done


# --- the API's side ----------------------------------------------------------------------------

def create_job(db: Database, job: Job) -> tuple[Job, bool]:
    """Insert ``job``; with an idempotency key already used by the tenant, return that job instead."""
    try:
        with db.write() as s:
            s.add(job)
        return job, True
    except IntegrityError:
        if job.idempotency_key is None:
            raise
        with db.read() as s:
            existing = s.scalar(select(Job).where(Job.tenant == job.tenant, Job.idempotency_key == job.idempotency_key))
        if existing is None:
            raise
        return existing, False


def webhook_deliveries(db: Database, jobs) -> dict[str, WebhookDelivery]:
    """The webhook outbox row of each finished job that has a callback (one per job: its terminal event)."""
    ids = [j.id for j in jobs if j.callback_url and j.state in TERMINAL_STATES]
    if not ids:
        return {}
    with db.read() as s:
        rows = s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id.in_(ids))
                         .order_by(WebhookDelivery.created_at)).all()
    return {row.job_id: row for row in rows}  # the latest per job


def mark_dispatched(db: Database, job_id: str) -> None:
    with db.write() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.state == "queued").values(dispatched_at=utcnow()))


def request_cancel(db: Database, tenant: str, job_id: str) -> Job | None:
    """Cancel a queued job at once; ask a running one to stop at its next step."""
    now = utcnow()
    with db.write() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.tenant == tenant, Job.state.in_(("queued", "running")))
                  .values(cancel_requested=True))
        _terminal(s, job_id, and_(Job.tenant == tenant, Job.state == "queued"), now, "cancelled")
        return s.get(Job, job_id, populate_existing=True)


# --- the worker's side -------------------------------------------------------------------------

def claim(db: Database, job_id: str, owner: str, lease_seconds: float) -> Job | None:
    """Take a queued job for ``owner``; None if it is not queued (done, cancelled, or taken)."""
    now = utcnow()
    with db.write() as s:
        claimed = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == "queued", Job.cancel_requested.is_(False))
            .values(state="running", stage="downloading", lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds), attempts=Job.attempts + 1,
                    started_at=now, progress_step=0, progress_total=0, progress_loss=None, loss_history=[])
        ).rowcount == 1
        return s.get(Job, job_id, populate_existing=True) if claimed else None


def _owned(job_id: str, owner: str):
    return and_(Job.id == job_id, Job.state == "running", Job.lease_owner == owner)


def heartbeat(db: Database, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when it was lost (the job was re-queued or finished)."""
    with db.write() as s:
        return s.execute(update(Job).where(_owned(job_id, owner)).values(
            lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))).rowcount == 1


def report_progress(db: Database, job_id: str, owner: str, *, stage: str, step: int, total: int,
                    loss: float | None, loss_history: list | None = None) -> bool:
    values = dict(stage=stage, progress_step=step, progress_total=total, progress_loss=loss)
    if loss_history is not None:
        values["loss_history"] = loss_history
    with db.write() as s:
        return s.execute(update(Job).where(_owned(job_id, owner)).values(**values)).rowcount == 1


def cancel_requested(db: Database, job_id: str) -> bool:
    with db.read() as s:
        return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def holds_lease(db: Database, job_id: str, owner: str) -> bool:
    with db.read() as s:
        return s.scalar(select(Job.id).where(_owned(job_id, owner))) is not None


def finish(db: Database, job_id: str, owner: str, state: str, *, error_type: str | None = None,
           error_detail: str | None = None, manifest: dict | None = None) -> bool:
    """The worker's terminal transition; False if it no longer held the lease (nothing changed)."""
    with db.write() as s:
        return _terminal(s, job_id, _owned(job_id, owner), utcnow(), state,
                         error_type=error_type, error_detail=error_detail, manifest=manifest)


# --- maintenance (run periodically by the API process) -----------------------------------------

def requeue_expired(db: Database, max_attempts: int) -> list[str]:
    """Jobs whose worker stopped heartbeating: queue again (ids returned, to dispatch), or end them."""
    now = utcnow()
    requeued = []
    with db.read() as s:
        rows = s.execute(select(Job.id, Job.attempts, Job.cancel_requested, Job.lease_owner)
                         .where(Job.state == "running", Job.lease_expires_at < now)).all()
    for job_id, attempts, cancel, owner in rows:
        with db.write() as s:
            expired = and_(Job.state == "running", Job.lease_owner == owner, Job.lease_expires_at < now)
            if cancel:
                _terminal(s, job_id, expired, now, "cancelled")
            elif attempts >= max_attempts:
                _terminal(s, job_id, expired, now, "failed", error_type="worker_lost",
                          error_detail=f"the worker stopped responding on each of {attempts} attempts")
            elif s.execute(update(Job).where(Job.id == job_id, expired).values(
                    state="queued", stage=None, lease_owner=None, lease_expires_at=None,
                    dispatched_at=None)).rowcount == 1:
                requeued.append(job_id)
    return requeued


def undispatched(db: Database, older_than_seconds: float) -> list[str]:
    """Queued jobs whose task never reached the broker (the API stopped, or the broker was down)."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    with db.read() as s:
        return list(s.scalars(select(Job.id).where(
            Job.state == "queued", Job.dispatched_at.is_(None), Job.cancel_requested.is_(False),
            or_(Job.created_at < cutoff, Job.attempts > 0))))
