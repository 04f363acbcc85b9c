"""One growth job, start to end: claim, download, ``ligo_core.grow``, upload, manifest, finish.

Runs inside the Celery task (a fresh child process per job); ligo_core, and with it torch,
is imported here only when a job runs. Job state changes go through ``app.lifecycle``.

Publication order: outputs under ``jobs/{id}/output/``, then ``jobs/{id}/manifest.json``
last, then the row turns ``succeeded``. A re-run after a lost worker first removes whatever
an earlier attempt left under ``jobs/{id}/``, so a job has one result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from app import lifecycle, ligo_bridge, scratch
from app.db import JOB_STAGES, Checkpoint, Database, Job, utcnow
from app.schemas import iso
from app.settings import Settings
from app.storage import S3Storage, Storage, StorageError, file_sha256, make_storage, parse_s3_uri
from app.validator import ALLOCATOR_WORDS, scrub
from worker.celery_app import sweep_scratch

log = logging.getLogger("ligo.worker")
MAX_HISTORY = 1000  # points of the fitting loss kept on the job row


class LeaseLost(Exception):
    """Another worker owns the job now (ours was presumed dead)."""


class Heartbeat(threading.Thread):
    """Extends the job's lease every third of its length; notes when the lease is lost."""

    def __init__(self, db: Database, job_id: str, owner: str, lease_seconds: float):
        super().__init__(name="ligo-heartbeat", daemon=True)
        self.db, self.job_id, self.owner, self.lease = db, job_id, owner, lease_seconds
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.lease / 3):
            try:
                if not lifecycle.heartbeat(self.db, self.job_id, self.owner, self.lease):
                    self.lost.set()
                    return
            except Exception:  # a database hiccup: try again next beat, the lease has slack
                log.exception("heartbeat failed for job %s", self.job_id)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


class Progress:
    """ligo_core's progress events -> the job row (stage, step of total, loss, loss history)."""

    def __init__(self, db: Database, job_id: str, owner: str, interval: float, lost: threading.Event):
        self.db, self.job_id, self.owner, self.interval, self.lost = db, job_id, owner, interval, lost
        self.history: list[list[float]] = []
        self.stride = 1
        self.stage: str | None = None
        self.fitting: tuple[int, int, float | None] | None = None  # last fitting step, total, loss
        self._last_write = 0.0

    def __call__(self, event: dict) -> None:
        stage = event.get("stage")
        step, total, loss = int(event.get("step") or 0), int(event.get("total") or 0), event.get("loss")
        if loss is not None and not math.isfinite(loss):
            loss = None  # a diverged fit: JSON (the row, the webhook) has no NaN
        if stage == "fitting":
            self.fitting = (step, total, None if loss is None else float(loss))
            if loss is not None and step % self.stride == 0:
                self.history.append([step, float(loss)])
                if len(self.history) > MAX_HISTORY:  # long fits: keep every other point
                    self.history = self.history[1::2]
                    self.stride *= 2
        if stage not in JOB_STAGES:
            stage = self.stage or "loading"
        now = time.monotonic()
        if stage != self.stage or step >= total or now - self._last_write >= self.interval:
            self._write(stage, step, total, None if loss is None else float(loss))
            self._last_write = now

    def set(self, stage: str, step: int = 0, total: int = 1) -> None:
        self._write(stage, step, total, None)

    def show_fit(self) -> None:
        """Leave the fitting progress (step of total, last loss) on the row of a finished job."""
        if self.fitting is not None:
            self._write(self.stage or "uploading", *self.fitting)

    def _write(self, stage: str, step: int, total: int, loss: float | None) -> None:
        self.stage = stage
        ok = lifecycle.report_progress(self.db, self.job_id, self.owner, stage=stage, step=step, total=total,
                                   loss=loss, loss_history=list(self.history))
        if not ok:
            self.lost.set()


def plain_json(value):
    """``value`` as plain JSON: NaN and infinities (a diverged loss) become null, which every
    reader of the job row accepts; anything else unusual becomes its string."""
    import orjson

    return orjson.loads(orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS))


def _error_type(exc: BaseException) -> str:
    name = type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class JobRunner:
    def __init__(self, settings: Settings, db: Database | None = None, storage: Storage | None = None):
        self.settings = settings
        self.db = db or Database(settings.resolved_database_url)
        self.storage = storage or make_storage(settings)

    def run(self, job_id: str) -> str:
        """Run the job if it is queued; returns its final state, or 'skipped' / 'lost'."""
        s = self.settings
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        job = lifecycle.claim(self.db, job_id, owner, s.lease_seconds)
        if job is None:
            log.info("job %s is not queued; nothing to do", job_id)
            return "skipped"
        log.info("job %s: attempt %d on %s", job_id, job.attempts, owner)
        # A later attempt took over an expired lease: whatever a killed one left goes first.
        sweep_scratch(s)  # (also done when the worker starts: worker.celery_app)
        beat = Heartbeat(self.db, job_id, owner, s.lease_seconds)
        beat.start()
        with scratch.folder(s.resolved_tmp_dir, f"job-{job_id}-") as work:
            tempfile.tempdir = str(work)  # every temporary file of the job lives, and dies, with it
            try:
                return self._run(job, owner, work, beat)
            finally:
                tempfile.tempdir = None
                beat.stop()

    def _run(self, job: Job, owner: str, work: Path, beat: Heartbeat) -> str:
        s = self.settings
        progress = Progress(self.db, job.id, owner, s.progress_interval_seconds, beat.lost)
        deadline = time.monotonic() + s.job_time_limit_seconds
        timed_out = threading.Event()
        polled = {"at": 0.0, "cancel": False}

        def should_cancel() -> bool:
            if beat.lost.is_set():
                return True
            if time.monotonic() > deadline:
                timed_out.set()
                return True
            now = time.monotonic()
            if now - polled["at"] >= s.cancel_poll_seconds:
                polled["at"], polled["cancel"] = now, lifecycle.cancel_requested(self.db, job.id)
            return polled["cancel"]

        def finish(state: str, **kw) -> str:
            if beat.lost.is_set() or not lifecycle.finish(self.db, job.id, owner, state, **kw):
                log.warning("job %s: lease lost; another worker has it", job.id)
                return "lost"
            return state

        from celery.exceptions import SoftTimeLimitExceeded

        import ligo_core
        from ligo_core.checkpoint import opened_source

        prefix = f"jobs/{job.id}/"
        try:
            self.storage.delete_prefix(prefix)  # whatever an earlier attempt left
            with self.db.read() as session:
                ckpt = session.get(Checkpoint, job.checkpoint_id)
            src = self._fetch_checkpoint(ckpt, work / "src")
            data = self._fetch_data(job.fit.get("data_uri"), work / "data")
            if should_cancel():
                raise ligo_core.GrowthCancelled()
            out = work / "out"
            # A worker that owns several GPUs runs the job across them; a failed rank fails the job.
            grow = (partial(ligo_core.grow_parallel, nproc=s.worker_gpus) if s.worker_gpus > 1 else ligo_core.grow)
            with opened_source(src, max_bytes=s.resolved_max_extract_bytes, tmp_dir=work) as directory:
                report = grow(  # the target resolved at submission, which the job's answers show
                    directory, ligo_bridge.config_from_dict(job.target_config), out, strategy=job.strategy, fit_steps=job.fit["steps"], data=data,
                    seed=job.seed, device=s.worker_device, lr=job.fit.get("lr"), batch_size=job.fit.get("batch_size"),
                    seq_len=job.fit.get("seq_len"), progress=progress, should_cancel=should_cancel,
                    eval_tokens=job.fit.get("eval_tokens"), memory_gb=s.worker_memory_gb,  # the plan checked again
                    **(job.growth or {}),  # GrowthOptions set on the job; the rest are the engine defaults
                )
            files = self._upload(out, prefix + "output/", progress, should_cancel)
            manifest = {
                "job_id": job.id, "attempt": job.attempts, "created_at": iso(utcnow()), "files": files,
                "report": report, "estimate": self._estimate(ckpt, report, job),
            }
            if should_cancel():
                raise ligo_core.GrowthCancelled()
            progress.show_fit()
            if not lifecycle.holds_lease(self.db, job.id, owner):
                raise LeaseLost()
            manifest = plain_json(manifest)
            self.storage.put_bytes(prefix + "manifest.json", json.dumps(manifest, indent=1).encode())
            return finish("succeeded", manifest=manifest)
        except (ligo_core.GrowthCancelled, SoftTimeLimitExceeded, LeaseLost) as exc:
            if beat.lost.is_set() or isinstance(exc, LeaseLost):
                log.warning("job %s: lease lost; stopping without touching its outputs", job.id)
                return "lost"
            self._remove_outputs(prefix)
            if timed_out.is_set() or isinstance(exc, SoftTimeLimitExceeded):
                return finish("failed", error_type="time_limit",
                              error_detail=f"the job ran longer than {s.job_time_limit_seconds} s")
            return finish("cancelled")
        except ligo_core.LigoError as exc:
            self._remove_outputs(prefix)
            return finish("failed", error_type=_error_type(exc), error_detail=self._shown(str(exc)))
        except StorageError as exc:
            self._remove_outputs(prefix)
            return finish("failed", error_type="storage_error", error_detail=self._shown(str(exc)))
        except Exception as exc:
            log.exception("job %s failed", job.id)
            self._remove_outputs(prefix)
            return finish("failed", error_type="internal_error", error_detail=self._shown(f"{type(exc).__name__}: {exc}"))

    # --- pieces ------------------------------------------------------------------------------

    def _shown(self, message: str) -> str:
        """An error as the tenant sees it: no server paths, no allocator's report."""
        if any(word in message.lower() for word in ALLOCATOR_WORDS):
            return "the worker ran out of memory (the target may be too large for its device)"
        return scrub(message, [self.settings.resolved_tmp_dir, self.settings.data_dir.resolve()])

    def _remove_outputs(self, prefix: str) -> None:
        try:
            self.storage.delete_prefix(prefix)
        except Exception:
            log.exception("could not remove %s", prefix)

    def _fetch_checkpoint(self, ckpt: Checkpoint, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        if ckpt.external:
            bucket, key = parse_s3_uri(ckpt.object_key)
            if not isinstance(self.storage, S3Storage):
                raise StorageError("this checkpoint lives in S3 but the worker has no S3 storage configured")
            path = dest / ckpt.filename
            self.storage.download_uri(bucket, key, path)
            return path
        if ckpt.layout == "archive":
            path = dest / ckpt.filename
            self.storage.download(ckpt.object_key, path)
            return path
        for obj in self.storage.list(ckpt.object_key):
            self.storage.download(obj.key, dest / obj.key[len(ckpt.object_key):])
        return dest

    def _fetch_data(self, uri: str | None, dest: Path) -> Path | None:
        if not uri:
            return None
        if not isinstance(self.storage, S3Storage):
            raise StorageError("fit.data_uri needs the S3 storage backend")
        bucket, key = parse_s3_uri(uri)
        path = dest / key.rsplit("/", 1)[-1]
        self.storage.download_uri(bucket, key, path)
        return path

    def _upload(self, out: Path, prefix: str, progress: Progress, should_cancel) -> list[dict]:
        import ligo_core

        paths = sorted(p for p in out.rglob("*") if p.is_file())
        files = []
        progress.set("uploading", 0, len(paths))
        for i, path in enumerate(paths, 1):
            if should_cancel():
                raise ligo_core.GrowthCancelled()
            rel = path.relative_to(out).as_posix()
            size, sha256 = file_sha256(path)
            files.append({"path": rel, "size_bytes": size, "sha256": sha256})
            self.storage.put_file(prefix + rel, path)
            progress.set("uploading", i, len(paths))
        return files

    def _estimate(self, ckpt: Checkpoint, report: dict, job: Job) -> dict:
        fit, plan = report.get("fit", {}), job.plan
        try:
            return ligo_bridge.estimate(
                ligo_bridge.config_from_dict(ckpt.config), ligo_bridge.config_from_dict(report["target"]["config"]),
                strategy=job.strategy,
                fit_steps=int(fit.get("steps") or 0), fit_batch=int(fit.get("batch_size") or 1),
                seq_len=int(fit.get("seq_len") or 1), tokens=plan.get("tokens"), gpu=plan.get("gpu", "H100"),
                price_per_gpu_hour=plan.get("price_per_gpu_hour"), utilisation=plan.get("utilisation"),
            )
        except Exception as exc:  # the grown model is fine; say why there is no estimate
            log.exception("job %s: estimate failed", job.id)
            return {"error": f"{type(exc).__name__}: {exc}"}
