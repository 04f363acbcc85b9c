"""``Client``: the growth service from Python, one call per thing a pipeline step does."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx

from ligo_client import download as _download
from ligo_client import upload as _upload
from ligo_client.errors import BadInput, JobCancelled, JobFailed, JobTimeout, LigoClientError, RequestRejected
from ligo_client.http import Retry, retry_after, send

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}
KEY_PREFIX = "ligo-client-v1-"


def default_cache_dir() -> Path:
    if os.environ.get("LIGO_CLIENT_CACHE"):
        return Path(os.environ["LIGO_CLIENT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ligo-client"


def _id(thing: str | dict, what: str) -> str:
    value = thing.get("id") if isinstance(thing, dict) else thing
    if not isinstance(value, str) or not value or len(value) > 128:
        raise BadInput(f"not a {what} id: {value!r}")
    return value


def _compact(options: dict | None) -> dict:
    """Options without the unset fields, so equal inputs give equal idempotency keys."""
    return {k: v for k, v in (options or {}).items() if v is not None}


def derive_idempotency_key(checkpoint_sha256: str, request: dict) -> str:
    """Derived from the checkpoint's content and every other field of the job request, so a
    step retried with the same inputs, even after uploading the checkpoint again, asks for the
    same job."""
    fields = {k: v for k, v in request.items() if k != "checkpoint_id"}
    blob = json.dumps({"checkpoint_sha256": checkpoint_sha256, **fields}, sort_keys=True, separators=(",", ":"))
    return KEY_PREFIX + hashlib.sha256(blob.encode()).hexdigest()


class Client:
    """A session with a ligo growth service.

    ``base_url`` defaults to ``LIGO_SERVER`` (else http://127.0.0.1:8000) and ``api_key`` to
    ``LIGO_API_KEY``. ``on_event`` receives progress dicts, each with a ``stage``: packing,
    uploading, resuming, uploaded, submitted, job, downloading, downloaded, retrying.
    ``http`` (API calls) and ``links`` (signed URLs: S3 parts, downloads; sent no API key)
    may be given to change transports, proxies or TLS settings.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 on_event: Callable[[dict], None] | None = None, cache_dir: str | os.PathLike | None = None,
                 retry: Retry | None = None, http: httpx.Client | None = None, links: httpx.Client | None = None,
                 poll_interval: tuple[float, float] = (0.5, 10.0)):
        self.base_url = (base_url or os.environ.get("LIGO_SERVER") or DEFAULT_SERVER).rstrip("/")
        self.api_key = api_key or os.environ.get("LIGO_API_KEY") or ""
        if not self.api_key:
            raise BadInput("no API key: pass api_key (--key) or set LIGO_API_KEY")
        if not self.base_url.startswith(("http://", "https://")):
            raise BadInput(f"the server must be an http:// or https:// URL, not {self.base_url!r}")
        self.on_event = on_event
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.retry = retry or Retry()
        self.poll_interval = poll_interval
        self.presigned: bool | None = None  # whether the service takes presigned uploads; learnt on first use
        self._http = http or httpx.Client(base_url=self.base_url, timeout=self.timeout())
        self._links = links or httpx.Client(timeout=self.timeout(), follow_redirects=True)
        self._owned = [c for c, given in ((self._http, http), (self._links, links)) if given is None]

    # --- plumbing ----------------------------------------------------------------------------

    @staticmethod
    def timeout(read: float = 120.0) -> httpx.Timeout:
        return httpx.Timeout(120.0, connect=15.0, read=read)

    def emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def api(self, method: str, path: str, *, headers: dict | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}", **(headers or {})}
        r = send(self._http, method, path, retry=self.retry, headers=headers, on_retry=self.emit, **kw)
        try:
            ok = isinstance(r.json(), dict)
        except ValueError:
            ok = False
        if not ok:  # every answer of the API is a JSON object; anything else came from somewhere else
            raise LigoClientError(f"{method} {path}: the answer ({r.status_code}, {r.headers.get('content-type')}) "
                                  "is not the service's JSON; is the server URL right?")
        return r

    def link(self, method: str, url: str, **kw) -> httpx.Response:
        """A signed URL: the URL is the credential, so no API key goes with it."""
        return send(self._links, method, url, retry=self.retry, on_retry=self.emit, **kw)

    def close(self) -> None:
        for c in self._owned:
            c.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- checkpoints -------------------------------------------------------------------------

    def checkpoint(self, checkpoint: str | dict) -> dict:
        return self.api("GET", f"/v1/checkpoints/{quote(_id(checkpoint, 'checkpoint'), safe='')}").json()

    def upload(self, path: str | os.PathLike) -> dict:
        """Upload a model directory (packed as a .tar), an archive, or a .safetensors file with its
        config.json beside it; returns the checkpoint. Bytes uploaded before are not sent again,
        and a cut presigned upload resumes (state in ``cache_dir``)."""
        return _upload.upload(self, path, self.cache_dir / "packs", self.cache_dir / "uploads")

    def _checkpoint_of(self, checkpoint) -> dict:
        if isinstance(checkpoint, dict) and "sha256" in checkpoint:
            return checkpoint
        if isinstance(checkpoint, os.PathLike) or (isinstance(checkpoint, str) and Path(checkpoint).exists()):
            return self.upload(checkpoint)
        try:
            return self.checkpoint(checkpoint)
        except RequestRejected as exc:
            if exc.status == 404 and isinstance(checkpoint, str):
                raise BadInput(f"{checkpoint!r} is neither a file or directory here nor a checkpoint id "
                               "on the service") from None
            raise

    # --- jobs --------------------------------------------------------------------------------

    def job(self, job: str | dict) -> dict:
        return self.api("GET", f"/v1/jobs/{quote(_id(job, 'job'), safe='')}").json()

    def grow(self, checkpoint, target: str | dict, *, strategy: str = "ligo", fit: dict | None = None,
             growth: dict | None = None, plan: dict | None = None, seed: int = 0, callback_url: str | None = None,
             idempotency_key: str | None = None, wait: bool = True, timeout: float | None = None) -> dict:
        """Submit a growth job (uploading ``checkpoint`` first when it is a path) and, with ``wait``,
        wait for it. The Idempotency-Key comes from the checkpoint's SHA-256 and the options, so
        calling again with the same inputs returns the same job instead of making another."""
        ckpt = self._checkpoint_of(checkpoint)
        request = {"checkpoint_id": ckpt["id"], "target": target, "strategy": strategy, "seed": seed}
        for name, value in (("fit", _compact(fit)), ("growth", _compact(growth)), ("plan", _compact(plan)),
                            ("callback_url", callback_url)):
            if value:
                request[name] = value
        key = idempotency_key or derive_idempotency_key(ckpt["sha256"], request)
        job, reused = self._submit(request, key)
        self.emit({"stage": "submitted", "job": job, "reused": reused})
        return self.wait(job, timeout=timeout) if wait else job

    def _submit(self, request: dict, key: str) -> tuple[dict, bool]:
        r = self.api("POST", "/v1/jobs", json=request, headers={"Idempotency-Key": key})
        return r.json(), r.status_code == 200

    def jobs(self, state: str | None = None, limit: int = 100):
        """The tenant's jobs, newest first, at most ``limit`` of them."""
        cursor, seen = None, 0
        while seen < limit:
            params = {"limit": min(100, limit - seen), **({"state": state} if state else {}),
                      **({"cursor": cursor} if cursor else {})}
            page = self.api("GET", "/v1/jobs", params=params).json()
            for job in page.get("items") or []:
                seen += 1
                yield job
            cursor = page.get("next_cursor")
            if not cursor or not page.get("items"):
                return

    def wait(self, job: str | dict, *, timeout: float | None = None,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job ends; returns it when it succeeded, else raises JobFailed,
        JobCancelled, or JobTimeout after ``timeout`` seconds (the job keeps running). Polls back
        off from poll_interval[0] to poll_interval[1] seconds and wait longer when the service
        sends Retry-After."""
        job_id = _id(job, "job")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, longest = self.poll_interval
        while True:
            r = self.api("GET", f"/v1/jobs/{quote(job_id, safe='')}")
            current = r.json()
            self.emit({"stage": "job", "job": current})
            if on_progress is not None:
                on_progress(current)
            state = current.get("state")
            if state == "succeeded":
                return current
            if state == "failed":
                error = current.get("error") or {}
                raise JobFailed(f"job {job_id} failed: {error.get('type', 'unknown')}: {error.get('detail', '')}",
                                current)
            if state == "cancelled":
                raise JobCancelled(f"job {job_id} was cancelled", current)
            pause = max(delay, retry_after(r) or 0.0)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise JobTimeout(f"job {job_id} is still {state} after {timeout:g} s; it goes on running",
                                     current)
                pause = min(pause, left)
            time.sleep(pause)
            delay = min(delay * 1.5, longest)

    def cancel(self, job: str | dict) -> dict:
        """Ask the service to stop the job (a queued one at once, a running one at its next step)."""
        return self.api("DELETE", f"/v1/jobs/{quote(_id(job, 'job'), safe='')}").json()

    def result(self, job: str | dict) -> dict:
        """``{files: [{path, size_bytes, sha256, url}], report, estimate, expires_at}`` of a
        succeeded job; JobFailed / JobCancelled / BadInput when it has not succeeded."""
        job_id = _id(job, "job")
        try:
            return self.api("GET", f"/v1/jobs/{quote(job_id, safe='')}/result").json()
        except RequestRejected as exc:
            if exc.status != 409:
                raise
        current = self.job(job_id)
        state = current.get("state")
        if state == "failed":
            raise JobFailed(f"job {job_id} failed: {(current.get('error') or {}).get('detail', '')}", current)
        if state == "cancelled":
            raise JobCancelled(f"job {job_id} was cancelled", current)
        raise BadInput(f"job {job_id} is {state}; its result exists once it has succeeded")

    def download(self, job: str | dict, out_dir: str | os.PathLike) -> Path:
        """Every output file into ``out_dir`` (absent or empty), each checked against its
        recorded size and SHA-256 and fetched again when it does not match."""
        return _download.download(self, _id(job, "job"), Path(out_dir).expanduser())

    # --- cost ----------------------------------------------------------------------------------

    def estimate(self, target: str | dict, *, checkpoint=None, source: str | dict | None = None,
                 **options) -> dict:
        """FLOPs, GPU-hours and cost of growing versus training from scratch (``POST /v1/estimate``).
        Give ``checkpoint`` (an id, a checkpoint, or a path to upload) or ``source`` (a preset,
        size fields or a config); ``options`` are the endpoint's other fields (fit_steps, gpu, ...)."""
        if (checkpoint is None) == (source is None):
            raise BadInput("give either checkpoint or source")
        body = {"target": target, **_compact(options)}
        if checkpoint is not None:
            body["checkpoint_id"] = self._checkpoint_of(checkpoint)["id"]
        else:
            body["source"] = source
        return self.api("POST", "/v1/estimate", json=body).json()
