"""Issue 16, findings 2-8, each reproduced through the real API (in-process, and `ligo serve`).

2 decompression bombs, 3 config-driven memory, 4 integers past 64 bits, 5 target size,
6 leftovers of killed attempts, 7 secrets (logs, files, webhook secrets and refusals, problem
details, compose), 8 a bounded schemathesis run that must find no 5xx. Finding 1 is tested in
test_service_api.py and test_checkpoint_io.py.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.service_fixtures import (
    ROOT,
    Api,
    WebhookReceiver,
    child_env,
    ligo_serve,
    make_keys,
    tar_gz,
    wait_for,
)

CAP = 4 * 2**20  # upload cap of the in-process service
MEMORY_LIMIT = 512 * 2**20  # the validator's peak resident memory on any upload
BOMB_BYTES = 2**30


def assert_problem(r, status: int, field: str | None = None, match: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    if field is not None:
        assert field in [e["field"] for e in body.get("errors", [])], body
    if match is not None:
        assert re.search(match, body["detail"]), body["detail"]
    return body


@pytest.fixture(scope="module")
def svc(tmp_path_factory, checkpoint_tar):
    from app.main import create_app
    from app.settings import Settings

    data = tmp_path_factory.mktemp("security") / "data"  # made by the service: private
    settings = Settings(data_dir=data, max_upload_bytes=CAP, max_extract_bytes=2**31, auth_cache_seconds=0,
                        maintenance_interval_seconds=0.2, webhook_backoff_seconds=0.2, lease_seconds=3)
    settings.make_data_dir()
    keys = make_keys(settings.resolved_database_url, "alice", "bob")  # tenants made without the key...
    app = create_app(settings)  # ...are sealed when the service starts
    with TestClient(app) as client:
        services = app.state.services
        alice = Api(client, keys["alice"])
        ckpt = alice.checkpoint(checkpoint_tar)  # also starts the validator process
        yield {"client": client, "app": app, "services": services, "settings": settings, "keys": keys,
               "data": data, "alice": alice, "ckpt": ckpt}


@pytest.fixture(scope="module")
def alice(svc):
    return svc["alice"]


def stored(svc) -> list[str]:
    return [o.key for o in svc["services"].storage.list("checkpoints/")]


def validator_peak_bytes() -> int:
    """The largest peak resident memory (VmHWM) of this process's validator children (printed:
    docs/BENCHMARKS.md quotes it)."""
    peaks = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat_fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat_fields[1]) == os.getpid() and b"app.validator" in (proc / "cmdline").read_bytes():
                line = next(x for x in (proc / "status").read_text().splitlines() if x.startswith("VmHWM"))
                peaks.append(int(line.split()[1]) * 1024)
    assert peaks, "no validator process found"
    print(f"validator peak resident memory: {max(peaks) / 2**20:.0f} MiB")
    return max(peaks)


def with_config(directory: Path, **changes) -> bytes:
    config = json.loads((directory / "config.json").read_text())
    return tar_gz_files(directory, {"config.json": json.dumps({**config, **changes}).encode()})


def tar_gz_files(directory: Path, replace: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(directory.iterdir()):
            if f.name not in replace:
                tar.add(f, arcname=f"model/{f.name}")
        for name, data in replace.items():
            info = tarfile.TarInfo(f"model/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def bomb(directory: Path, zeros: int = BOMB_BYTES, name: str = "zeros.bin") -> bytes:
    """A .tar.gz of the model plus ``zeros`` zero bytes, about 1 MB per GiB: gzip members
    concatenated (tar reads them as one stream), the zeros compressed once and repeated."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w")
    tar.add(directory, arcname="model")
    info = tarfile.TarInfo(f"model/{name}")
    info.size = zeros
    head = buf.getvalue()[:tar.offset] + info.tobuf(tar.format, tar.encoding, tar.errors)  # its data follows
    chunk = 2**20
    zero_member = gzip.compress(b"\0" * chunk, 9)
    tail = b"\0" * (-zeros % 512) + b"\0" * 1024  # padding to a block, then the end-of-archive blocks
    return gzip.compress(head, 9) + zero_member * (zeros // chunk) + gzip.compress(tail, 9)


# --- 2. decompression bombs ------------------------------------------------------------------------

def test_a_decompression_bomb_is_refused_at_once_and_leaves_nothing(svc, alice, service_checkpoint):
    """A 1 GiB zero file in a ~1 MB .tar.gz was a 201, and each job extracted it again."""
    data = bomb(service_checkpoint)
    assert len(data) < 2 * 2**20
    before = stored(svc)
    started = time.perf_counter()
    body = assert_problem(alice.upload(data, "bomb.tar.gz"), 422, match="times its size")
    assert time.perf_counter() - started < 5, "the bomb was inflated before being refused"
    assert "decompression bomb" in body["detail"]
    assert stored(svc) == before
    scratch = svc["settings"].resolved_tmp_dir / "validate"
    leftovers = [p for p in scratch.rglob("*") if p.is_file() and p.name != ".lock"]
    assert not leftovers
    assert validator_peak_bytes() < MEMORY_LIMIT


def test_only_model_files_are_extracted_within_the_caps(service_checkpoint, tmp_path):
    from ligo_core.archive import extract
    from ligo_core.errors import CheckpointError

    junk = {"README.md": b"# model\n", "training_args.bin": b"\x80pickle", "optimizer.pt": os.urandom(4096)}
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(tar_gz(service_checkpoint, extra=junk))
    dest = tmp_path / "out"
    skipped = extract(archive, dest)
    assert sorted(Path(s).name for s in skipped) == sorted(["generation_config.json", *junk])
    assert sorted(p.name for p in (dest / "model").iterdir()) == ["config.json", "model.safetensors",
                                                                  "tokenizer.json", "tokenizer_config.json"]
    # The total cap, whatever the ratio: a plain .tar (no compression) over max_bytes.
    plain = tmp_path / "m.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(service_checkpoint, arcname="model")
    size = sum(f.stat().st_size for f in service_checkpoint.iterdir())
    with pytest.raises(CheckpointError, match="extraction limit"):
        extract(plain, tmp_path / "capped", max_bytes=size - 1)


# --- 3. config-driven memory -------------------------------------------------------------------------

def test_absurd_config_sizes_are_refused_fast_naming_the_field(svc, alice, service_checkpoint):
    """vocab_size 16,000,000 held the validator at 4.2 GiB for 39 s; now a 422 in milliseconds."""
    before = stored(svc)
    started = time.perf_counter()
    body = assert_problem(alice.upload(with_config(service_checkpoint, vocab_size=16_000_000)), 422,
                          field="config.json.vocab_size", match="over the limit")
    assert time.perf_counter() - started < 1.0
    assert body["type"].endswith("checkpoint-invalid")
    for field, value in (("n_layer", 10**6), ("n_embd", 10**7), ("n_head", 0)):
        assert_problem(alice.upload(with_config(service_checkpoint, **{field: value})), 422,
                       field=f"config.json.{field}")
    # Within each bound, but not what the weights hold: refused from the headers, nothing allocated.
    started = time.perf_counter()
    assert_problem(alice.upload(with_config(service_checkpoint, vocab_size=4_000_000)), 422,
                   match=r"has shape \(384, 32\), but the config implies \(4000000, 32\)")
    assert time.perf_counter() - started < 1.0
    # A bare .safetensors file: its config is checked at the door, before the body is read.
    config = json.loads((service_checkpoint / "config.json").read_text())
    header = base64.b64encode(json.dumps({**config, "vocab_size": 16_000_000}).encode()).decode()
    weights = (service_checkpoint / "model.safetensors").read_bytes()
    assert_problem(alice.upload(weights, "m.safetensors", headers={"X-Ligo-Config": header}), 422,
                   field="X-Ligo-Config.vocab_size")
    assert stored(svc) == before
    assert validator_peak_bytes() < MEMORY_LIMIT


# --- 4. integers past 64 bits ------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, field", [
    ("/v1/jobs", {"plan": {"tokens": 10**30}}, "plan.tokens"),
    ("/v1/jobs", {"plan": {"price_per_gpu_hour": 1e300}}, "plan.price_per_gpu_hour"),
    ("/v1/jobs", {"target": {"layers": 10**30}}, "target"),
    ("/v1/jobs", {"seed": 2**64}, "seed"),
    ("/v1/estimate", {"tokens": 10**30}, "tokens"),
    ("/v1/estimate", {"source": {"model_type": "gpt2", "n_embd": 2**70}}, "source"),
])
def test_numbers_past_64_bits_are_refused_not_stored(svc, alice, path, body, field):
    """plan.tokens 10**30 was stored and made every later GET /v1/jobs of the tenant a 500."""
    base = ({"checkpoint_id": svc["ckpt"]["id"], "target": "layers=4,hidden=48,heads=6,ffn=192"} if path == "/v1/jobs"
            else {"source": "gpt2", "target": "gpt2-medium"})
    assert_problem(alice.post(path, json={**base, **body}), 422, field=field)
    r = alice.get("/v1/jobs", params={"limit": 100})
    assert r.status_code == 200 and all(isinstance(j["plan"], dict) for j in r.json()["items"])


def test_the_openapi_document_states_the_bounds(svc):
    spec = svc["client"].get("/v1/openapi.json").json()["components"]["schemas"]
    tokens = spec["PlanOptions"]["properties"]["tokens"]["anyOf"][0]
    assert (tokens["minimum"], tokens["maximum"]) == (1, 10**15)
    assert spec["EstimateIn"]["properties"]["fit_batch"]["anyOf"][0]["maximum"] == 65_536  # None: the engine's default
    assert spec["JobCreate"]["properties"]["checkpoint_id"]["maxLength"] == 64


# --- 5. target size ------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, match", [
    ("layers=1000000", "n_layer|layers 1000000 is over the limit"),
    ("hidden=10000000", "hidden 10000000 is over the limit"),
    ({"layers": 4, "hidden": 10**7}, "hidden 10000000 is over the limit"),
    ("layers=1024,hidden=32768,heads=256,ffn=131072", "LIGO_MAX_TARGET_PARAMETERS"),
])
def test_targets_over_the_size_cap_are_422_naming_target(svc, alice, target, match):
    """layers=1000000 or hidden=10000000 was accepted (202)."""
    for path in ("/v1/jobs", "/v1/estimate"):
        r = alice.post(path, json={"checkpoint_id": svc["ckpt"]["id"], "target": target, "strategy": "stack"})
        body = assert_problem(r, 422, match=match)
        assert body["errors"][0]["field"].split(".")[0] == "target", body  # target, or target.hidden


def test_the_cap_is_a_setting(svc, alice, monkeypatch):
    monkeypatch.setattr(svc["settings"], "max_target_parameters", 10_000)
    r = alice.post("/v1/estimate", json={"checkpoint_id": svc["ckpt"]["id"], "target": "layers=4,hidden=48,heads=6"})
    assert_problem(r, 422, field="target", match="over this service's limit of 10,000")


# --- 6. leftovers of killed attempts -------------------------------------------------------------------

def test_a_killed_attempts_scratch_is_removed_when_the_next_attempt_takes_over(svc, alice):
    from worker.runner import JobRunner

    job = alice.submit(svc["ckpt"]["id"], fit={"steps": 0}, strategy="stack").json()
    root = svc["settings"].resolved_tmp_dir
    # An attempt that dies by SIGKILL in the middle of its work, its folder locked (app.scratch).
    code = ("import os, signal, sys; from pathlib import Path; from app import scratch; "
            f"p, _ = scratch.claim(Path(sys.argv[1]), 'job-{job['id']}-'); "
            "(p / 'ligo-src-x').mkdir(); (p / 'ligo-src-x' / 'model.safetensors').write_bytes(bytes(2**20)); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, env=child_env({}), check=False)
    dead = list(root.glob(f"job-{job['id']}-*"))
    assert len(dead) == 1 and (dead[0] / "ligo-src-x" / "model.safetensors").is_file()
    # The next attempt (the real runner, as Celery runs it) sweeps it before it starts.
    state = JobRunner(svc["settings"], svc["services"].db, svc["services"].storage).run(job["id"])
    assert state == "succeeded", alice.job(job["id"])
    assert not list(root.glob("job-*")) and not list(root.glob("ligo-src-*"))


def test_a_live_attempts_scratch_is_left_alone(tmp_path):
    from app import scratch

    with scratch.folder(tmp_path, "job-live-") as live:
        assert scratch.sweep(tmp_path, ("job-",)) == [] and live.is_dir()
    assert not live.exists()


# --- 7. secrets ----------------------------------------------------------------------------------------

def test_the_database_and_data_directory_are_private(svc):
    assert stat.S_IMODE(svc["data"].stat().st_mode) == 0o700
    assert stat.S_IMODE((svc["data"] / "ligo.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((svc["data"] / "secret.key").stat().st_mode) == 0o600


def test_webhook_secrets_are_sealed_at_rest(svc):
    from app.auth import webhook_secret
    from app.webhooks import sign, verify

    with sqlite3.connect(svc["data"] / "ligo.db") as conn:
        rows = dict(conn.execute("SELECT name, webhook_secret FROM tenants").fetchall())
    assert set(rows) == {"alice", "bob"}
    assert all(v.startswith("gAAAA") and "whsec_" not in v for v in rows.values())
    secret = webhook_secret(svc["services"].db, "alice")
    assert secret.startswith("whsec_") and secret not in rows.values()
    ts = int(time.time())
    assert verify(secret, {"webhook-id": "m", "webhook-timestamp": str(ts),
                           "webhook-signature": sign(secret, "m", ts, "{}")}, "{}")


def test_migration_0003_seals_existing_plaintext_secrets(tmp_path):
    from app.auth import webhook_secret
    from app.db import Database
    from app.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0002")
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("INSERT INTO tenants (name, webhook_secret, created_at) VALUES "
                     "('old', 'whsec_b2xkIHNlY3JldCBvbGQgc2VjcmV0', '2026-01-01 00:00:00')")
    assert webhook_secret(Database(url), "old") == "whsec_b2xkIHNlY3JldCBvbGQgc2VjcmV0"  # legacy: read as is
    upgrade(url, secret_key=b"the service's key")
    with sqlite3.connect(tmp_path / "old.db") as conn:
        (sealed,) = conn.execute("SELECT webhook_secret FROM tenants").fetchone()
    assert sealed.startswith("gAAAA")
    assert webhook_secret(Database(url, b"the service's key"), "old") == "whsec_b2xkIHNlY3JldCBvbGQgc2VjcmV0"


def finished_job_with_callback(alice, svc, url: str) -> str:
    job = alice.submit(svc["ckpt"]["id"], strategy="stack", fit={"steps": 0}, callback_url=url).json()
    assert job["webhook"] == {"state": "waiting", "attempts": 0, "last_status": None, "last_error": None}
    alice.delete(f"/v1/jobs/{job['id']}")  # cancelled: a terminal state, so its webhook is sent
    return job["id"]


def test_refused_webhooks_are_not_retried_and_the_job_shows_why(svc, alice, monkeypatch, caplog):
    # A non-public address (the SSRF refusal): failed after one attempt.
    caplog.set_level("WARNING", logger="ligo.webhooks")
    job_id = finished_job_with_callback(alice, svc, "http://127.0.0.1:9/hooks/private?token=abc")
    hook = wait_for(lambda: (h := alice.job(job_id)["webhook"])["state"] == "failed" and h, 10,
                    what="the refused webhook")
    assert hook["attempts"] == 1 and "non-public address" in hook["last_error"]
    assert "127.0.0.1" in caplog.text and "/hooks/private" not in caplog.text and "token=abc" not in caplog.text
    # A 404 is the receiver's final word; a 503 is retried.
    monkeypatch.setattr(svc["settings"], "webhook_allow_private", True)
    gone, busy = WebhookReceiver(status=404), WebhookReceiver(status=503)
    try:
        gone_id = finished_job_with_callback(alice, svc, gone.url + "/secret-path?token=abc")
        busy_id = finished_job_with_callback(alice, svc, busy.url)
        wait_for(lambda: alice.job(gone_id)["webhook"]["state"] == "failed" and len(busy.received) >= 3, 20,
                 what="the webhooks to be tried")
        time.sleep(0.6)
        assert alice.job(gone_id)["webhook"] == {"state": "failed", "attempts": 1, "last_status": 404,
                                                 "last_error": "HTTP 404"} and len(gone.received) == 1
        busy_hook = alice.job(busy_id)["webhook"]
        assert busy_hook["state"] == "pending" and busy_hook["attempts"] >= 3 and busy_hook["last_status"] == 503
        listed = {j["id"]: j["webhook"] for j in alice.get("/v1/jobs", params={"limit": 100}).json()["items"]}
        assert listed[gone_id]["state"] == "failed"
    finally:
        gone.close()
        busy.close()
    assert "secret-path" not in caplog.text


def test_problem_details_never_show_server_paths():
    from app.validator import scrub

    roots = [Path("/srv/data"), Path("/srv/data/tmp/validate")]
    message = ("archive member 'x' cannot be written ([Errno 20] Not a directory: "
               "'/srv/data/tmp/validate/validate-ab12/ligo-src-x/model/config.json/x')")
    assert scrub(message, roots) == "archive member 'x' cannot be written ([Errno 20] Not a directory: 'x')"


def test_compose_needs_the_operators_passwords_and_hides_the_console():
    text = (ROOT / "docker-compose.yml").read_text()
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "LIGO_SECRET_KEY"):
        uses = re.findall(r"(?<!\$)\$\{" + var + r"([^}]*)\}", text)  # $${..} is the container shell's
        assert uses and all(u.startswith(":?") for u in uses), (var, uses)
    assert "9001:" not in text and "change-me" not in text and "ligo-secret-key" not in text


# --- 8. fuzzing --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_schemathesis_run_finds_no_server_error(svc, alice):
    """Every operation of the OpenAPI document, schema-valid and schema-violating requests,
    with a real checkpoint id where the body takes one: no answer may be a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    # The document only: requests go through the fixture's client, whose event loop owns the
    # validator's processes (from_asgi would run the app's lifespan a second time).
    schema = schemathesis.openapi.from_dict(svc["client"].get("/v1/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/checkpoints", "POST /v1/jobs",
                                                                      "GET /v1/jobs", "POST /v1/estimate"}
    auth = {"Authorization": f"Bearer {svc['keys']['alice']}"}
    failures = []

    def with_checkpoint(case):
        if isinstance(case.body, dict) and "checkpoint_id" in case.body:
            case.body["checkpoint_id"] = svc["ckpt"]["id"]
        return case

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode).map(with_checkpoint))
            @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=auth)
                if not kwargs.pop("cookies", None) and "data" in kwargs:
                    kwargs["content"] = kwargs.pop("data")
                request = svc["client"].build_request(**kwargs)
                try:
                    request.read()  # a body the client itself cannot encode (an int as a form's file) is not sent
                except (TypeError, AttributeError, ValueError):
                    return
                r = svc["client"].send(request)
                if r.status_code >= 500:
                    failures.append((case.method, case.formatted_path, case.query, case.body, r.status_code, r.text))

            with contextlib.suppress(Unsatisfiable):  # a parameter no schema-violating value exists for
                run()
    assert not failures, failures[:3]


# --- `ligo serve`: the access log, a killed worker ----------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``ligo serve`` with the access log on (level info), in a data directory it creates."""
    data = tmp_path_factory.mktemp("served") / "data"
    log_path = data.parent / "serve.log"
    with ligo_serve(data, log_path, "info") as (proc, base), httpx.Client(base_url=base, timeout=60) as client:
        keys = make_keys(f"sqlite:///{data / 'ligo.db'}", "alice")
        yield {"base": base, "data": data, "api": Api(client, keys["alice"]), "log": log_path, "proc": proc}


def children(pid: int) -> list[tuple[int, str]]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append((int(proc.name), (proc / "cmdline").read_bytes().decode(errors="replace")))
    return found


@pytest.mark.slow
def test_served_data_is_private_and_the_access_log_hides_download_tokens(served, checkpoint_tar):
    api = served["api"]
    assert stat.S_IMODE(served["data"].stat().st_mode) == 0o700
    assert stat.S_IMODE((served["data"] / "ligo.db").stat().st_mode) == 0o600
    ckpt = api.checkpoint(checkpoint_tar)
    job = api.submit(ckpt["id"], strategy="stack", fit={"steps": 0}).json()
    assert api.wait(job["id"], timeout=180)["state"] == "succeeded", served["log"].read_text()[-3000:]
    url = api.get(f"/v1/jobs/{job['id']}/result").json()["files"][0]["url"]
    assert httpx.get(url, timeout=30).status_code == 200
    token = url.rsplit("/", 1)[1]
    log = wait_for(lambda: (t := served["log"].read_text()).count("/v1/files/[redacted]") and t, 10,
                   what="the access log line")
    assert token not in log and token[:24] not in log
    assert re.search(r'"GET /v1/files/\[redacted\] HTTP/1.1" 200', log)


@pytest.mark.slow
def test_a_killed_workers_scratch_is_swept_when_it_restarts(served, checkpoint_tar):
    """Each killed attempt left DATA/tmp/job-* (and an extraction) behind."""
    api = served["api"]
    ckpt = api.checkpoint(checkpoint_tar)
    job = api.submit(ckpt["id"], fit={"steps": 100_000, "batch_size": 2, "seq_len": 16}).json()
    api.wait(job["id"], check=lambda j: j["stage"] == "fitting", timeout=180)
    tmp = served["data"] / "tmp"
    scratch = list(tmp.glob(f"job-{job['id']}-*"))
    assert len(scratch) == 1 and list(scratch[0].glob("ligo-src-*/model/model.safetensors"))
    worker = [pid for pid, cmd in children(served["proc"].pid) if "celery" in cmd]
    assert len(worker) == 1
    os.killpg(worker[0], signal.SIGKILL)  # the worker and the child running the job
    wait_for(lambda: not scratch[0].exists(), 60, what="the restarted worker to sweep the dead attempt")
    # The job itself runs again once its lease expires (its new folder is a live one); stop it.
    api.wait(job["id"], check=lambda j: j["attempts"] == 2 and j["state"] == "running", timeout=120)
    api.delete(f"/v1/jobs/{job['id']}")
    assert api.wait(job["id"], timeout=120)["state"] == "cancelled"
    wait_for(lambda: not list(tmp.glob("job-*")), 30, what="the cancelled attempt's folder to go")
