"""Fixtures for the service tests: tiny checkpoints as archives, and real running services.

- ``embedded_service``: ``python -m app.cli serve`` in a subprocess (SQLite, local storage,
  filesystem broker, its own Celery worker), as a user would start it.
- ``distributed``: the API in-process (TestClient) on PostgreSQL (a fresh schema, dropped
  afterwards), Redis (a queue name of its own) and moto's S3 server on loopback, with a
  real Celery worker process that tests can kill.

Tests needing Redis, PostgreSQL or moto skip, naming what is missing, when it is not there;
set LIGO_TEST_REQUIRE_SERVICES=1 (as CI does) to make that a failure instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGET = "layers=4,hidden=48,heads=6,ffn=192"
FIT = {"steps": 3, "batch_size": 2, "seq_len": 16}
REDIS_URL = os.environ.get("LIGO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("LIGO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TEST_ENV = {  # fast leases and loops, so the recovery tests take seconds
    "LIGO_LEASE_SECONDS": "3",
    "LIGO_MAINTENANCE_INTERVAL_SECONDS": "0.3",
    "LIGO_PROGRESS_INTERVAL_SECONDS": "0.05",
    "LIGO_CANCEL_POLL_SECONDS": "0.1",
    "LIGO_REDISPATCH_AFTER_SECONDS": "5",
    "LIGO_WEBHOOK_ALLOW_PRIVATE": "true",
    "LIGO_WEBHOOK_BACKOFF_SECONDS": "0.2",
    "LIGO_JOB_TIME_LIMIT_SECONDS": "600",
    "LIGO_AUTH_CACHE_SECONDS": "0",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def missing(what: str) -> None:
    if os.environ.get("LIGO_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is required (LIGO_TEST_REQUIRE_SERVICES=1) but not available")
    pytest.skip(f"{what} is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def tar_gz(directory: Path, arcname: str = "model", extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        tar.add(directory, arcname=arcname)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(f"{arcname}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def service_checkpoint(checkpoint_dir) -> Path:
    """The tiny GPT-2 (2 layers, width 32, byte-level BPE tokenizer) saved by save_pretrained."""
    return checkpoint_dir("gpt2")


@pytest.fixture(scope="session")
def checkpoint_tar(service_checkpoint) -> bytes:
    return tar_gz(service_checkpoint)


@pytest.fixture(scope="session")
def unsupported_tar(tmp_path_factory) -> bytes:
    """A real, tiny OPT checkpoint: a family the service does not grow."""
    import transformers

    d = tmp_path_factory.mktemp("opt")
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    transformers.OPTForCausalLM(config).save_pretrained(d)
    return tar_gz(d)


# --- a client for either a TestClient or a live server -------------------------------------------

class Api:
    def __init__(self, client, key: str):
        self.client, self.key = client, key

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def request(self, method: str, path: str, **kw):
        headers = {**self.headers, **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def upload(self, data: bytes, filename: str = "tiny.tar.gz", **kw):
        return self.post("/v1/checkpoints", params={"filename": filename}, content=data,
                         headers={"Content-Type": "application/octet-stream", **kw.pop("headers", {})}, **kw)

    def checkpoint(self, data: bytes) -> dict:
        r = self.upload(data)
        assert r.status_code == 201, r.text
        return r.json()

    def submit(self, checkpoint_id: str, fit: dict | None = None, headers: dict | None = None, **body):
        payload = {"checkpoint_id": checkpoint_id, "target": TARGET, "fit": fit or FIT, **body}
        return self.post("/v1/jobs", json=payload, headers=headers or {})

    def job(self, job_id: str) -> dict:
        r = self.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 120, check=None):
        def done():
            job = self.job(job_id)
            if check is not None:
                return job if check(job) else None
            return job if job["state"] in states else None

        return wait_for(done, timeout, 0.1, f"job {job_id} to reach {states}")


# --- a webhook receiver ------------------------------------------------------------------------

class WebhookReceiver:
    """Collects POSTs on loopback (any path); answers 500 to the first ``fail_first`` of them,
    ``status`` to the rest."""

    def __init__(self, fail_first: int = 0, status: int = 204):
        self.received: list[dict] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                receiver.received.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                self.send_response(500 if len(receiver.received) <= receiver.fail_first else status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver():
    r = WebhookReceiver(fail_first=1)
    yield r
    r.close()


# --- processes -----------------------------------------------------------------------------------

def child_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGO_")}
    env.update(TEST_ENV)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


class CeleryWorker:
    """A real ``celery worker`` process group (parent and its per-job children)."""

    def __init__(self, env: dict, queue: str, log_path: Path):
        self.env, self.queue, self.log_path = env, queue, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> CeleryWorker:
        name = f"test-{secrets.token_hex(3)}@%h"
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", self.queue, "-c", "1",
               "--loglevel", "INFO", "-n", name, "--without-gossip", "--without-mingle", "--without-heartbeat"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        wait_for(lambda: b"ready." in self.log_path.read_bytes() or self.proc.poll() is not None, 60,
                 what="the celery worker to start")
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


def make_keys(database_url: str, *tenants: str) -> dict[str, str]:
    from app.auth import create_key
    from app.db import Database
    from app.migrate import upgrade

    upgrade(database_url)
    db = Database(database_url)
    try:
        return {t: create_key(db, t) for t in tenants}
    finally:
        db.dispose()


def wait_ready(proc: subprocess.Popen, base: str, log_path: Path, timeout: float = 120) -> None:
    """Until a started `ligo serve` answers /readyz; its log's end if it dies first."""
    def ready():
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text()[-3000:])
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(base + "/readyz", timeout=2).status_code == 200
        return False

    wait_for(ready, timeout, 0.2, "ligo serve to be ready")


def stop_serve(proc: subprocess.Popen) -> None:
    """SIGTERM, as a service manager stops it; its process group killed if that takes too long."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def ligo_serve(data: Path, log_path: Path, log_level: str = "warning"):
    """``python -m app.cli serve`` on a free loopback port with ``data`` as its data directory:
    yields (process, base URL) once it is ready; stopped with SIGTERM afterwards."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                                 str(data), "--log-level", log_level], env=child_env({"LIGO_DATA_DIR": str(data)}),
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, log_path)
        yield proc, base
    finally:
        stop_serve(proc)


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory):
    """``ligo serve`` on a free loopback port with a fresh data directory."""
    data = tmp_path_factory.mktemp("embedded")
    log_path = data / "serve.log"
    keys = make_keys(f"sqlite:///{data / 'ligo.db'}", "alice", "bob")
    with ligo_serve(data, log_path) as (proc, base), httpx.Client(base_url=base, timeout=60) as client:
        yield {"base": base, "data": data, "keys": keys, "client": client, "log": log_path, "proc": proc}


# --- Redis, PostgreSQL, S3 -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_url():
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        missing(f"Redis at {REDIS_URL} ({exc})")
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url():
    """A schema of its own in the test database, dropped afterwards."""
    try:
        import psycopg

        admin = psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), autocommit=True, connect_timeout=3)
    except Exception as exc:
        missing(f"PostgreSQL at {POSTGRES_URL} ({exc})")
    schema = f"ligo_test_{secrets.token_hex(4)}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a loopback port, with the service's bucket and an 'external' one."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        missing(f"moto[server] ({exc})")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, **creds)
    for bucket in ("ligo-service", "external"):
        client.create_bucket(Bucket=bucket)
    yield {"endpoint": endpoint, "client": client, "bucket": "ligo-service"}
    server.stop()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, redis_url, postgres_url, s3_server):
    """API (in-process) + PostgreSQL + Redis + S3 + a Celery worker process."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    data = tmp_path_factory.mktemp("distributed")
    queue = f"gpu-test-{secrets.token_hex(3)}"
    env = {
        "LIGO_DATA_DIR": str(data / "api"), "LIGO_DATABASE_URL": postgres_url, "LIGO_BROKER_URL": redis_url,
        "LIGO_GPU_QUEUE": queue, "LIGO_STORAGE_BACKEND": "s3", "LIGO_S3_BUCKET": s3_server["bucket"],
        "LIGO_S3_ENDPOINT_URL": s3_server["endpoint"], "LIGO_S3_ACCESS_KEY_ID": "test",
        "LIGO_S3_SECRET_ACCESS_KEY": "test", "LIGO_S3_REGISTER_BUCKETS": "external",
        "LIGO_S3_PART_SIZE_BYTES": str(5 * 2**20), "LIGO_MAX_UPLOAD_BYTES": str(8 * 2**20),
        # One key for every instance on the session's shared schema: an instance whose loop outlives
        # its module would otherwise take another's webhooks and fail to open their sealed secrets.
        "LIGO_SECRET_KEY": "distributed-tests-shared-secret",
    }
    settings = Settings.model_validate({k[5:].lower(): v for k, v in {**TEST_ENV, **env}.items()
                                        if k.startswith("LIGO_")})
    keys = make_keys(postgres_url, "alice", "bob")
    worker_env = child_env({**env, "LIGO_DATA_DIR": str(data / "worker")})
    worker = CeleryWorker(worker_env, queue, data / "worker.log").start()
    app = create_app(settings)
    ctx = {"app": app, "keys": keys, "settings": settings, "worker": worker, "worker_env": worker_env,
           "queue": queue, "data": data, "s3": s3_server}
    try:
        with TestClient(app) as client:
            ctx["client"] = client
            yield ctx
    finally:
        ctx["worker"].stop()  # the one running now: a test may have replaced the first
    with contextlib.suppress(Exception):  # leave nothing of this run in Redis
        import redis

        r = redis.Redis.from_url(redis_url)
        r.delete(queue, *(f"{queue}\x06\x16{p}" for p in range(10)), f"_kombu.binding.{queue}",
                 f"_kombu.binding_permanent.{queue}")
        for tag, message in r.hgetall("unacked").items():  # the killed worker's unacknowledged task
            if queue.encode() in message:
                r.hdel("unacked", tag)
                r.zrem("unacked_index", tag)


def job_objects(storage, job_id: str) -> list[str]:
    return sorted(o.key for o in storage.list(f"jobs/{job_id}/"))


def manifest_keys(job_id: str, manifest: dict) -> list[str]:
    return sorted([f"jobs/{job_id}/manifest.json"] + [f"jobs/{job_id}/output/{f['path']}" for f in manifest["files"]])


def loads(text: str) -> dict:
    return json.loads(text)
