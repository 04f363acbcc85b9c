"""The /v1 API in-process on the embedded defaults (SQLite, local storage, filesystem broker).

No worker runs here: these tests cover authentication, tenancy, uploads and their error
paths, job submission and validation, idempotency, cancellation of queued jobs, listing,
estimates and the operational endpoints (and one job, run by the worker's runner in-process). Every refused request must leave no row and no
stored object behind.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.db import Checkpoint, Job
from tests.service_fixtures import TARGET, Api, make_keys

CAP = 1_000_000


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    from app.main import create_app
    from app.settings import Settings

    data = tmp_path_factory.mktemp("api")
    settings = Settings(data_dir=data, max_upload_bytes=CAP, auth_cache_seconds=0, maintenance_interval_seconds=60)
    keys = make_keys(settings.resolved_database_url, "alice", "bob")
    app = create_app(settings)
    with TestClient(app) as client:
        yield {"client": client, "app": app, "services": app.state.services, "keys": keys, "data": data}


@pytest.fixture(scope="module")
def alice(svc):
    return Api(svc["client"], svc["keys"]["alice"])


@pytest.fixture(scope="module")
def bob(svc):
    return Api(svc["client"], svc["keys"]["bob"])


@pytest.fixture(scope="module")
def ckpt(alice, checkpoint_tar):
    return alice.checkpoint(checkpoint_tar)


def counts(svc) -> tuple[int, int, list[str], list[str]]:
    """(checkpoint rows, job rows, stored objects, leftover partial uploads)."""
    services = svc["services"]
    with services.db.read() as s:
        n_ckpt = s.scalar(select(func.count()).select_from(Checkpoint))
        n_jobs = s.scalar(select(func.count()).select_from(Job))
    partial = services.storage.root / ".partial"
    return n_ckpt, n_jobs, [o.key for o in services.storage.list("")], sorted(p.name for p in partial.glob("*"))


def assert_problem(r, status: int, field: str | None = None, match: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["type"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    if match is not None:
        assert re.search(match, body["detail"]), body["detail"]
    return body


# --- authentication and tenancy ------------------------------------------------------------------

def test_requests_without_a_valid_key_are_refused(svc, ckpt):
    client = svc["client"]
    for path in ("/v1/jobs", f"/v1/checkpoints/{ckpt['id']}"):
        r = client.get(path)
        assert_problem(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert_problem(client.get(path, headers={"Authorization": "Bearer ligo_wrong"}), 401)
        assert_problem(client.get(path, headers={"Authorization": "Basic abc"}), 401)
    assert client.get("/healthz").json() == {"status": "ok"}


def test_another_tenants_resources_are_not_found(alice, bob, ckpt):
    assert alice.get(f"/v1/checkpoints/{ckpt['id']}").status_code == 200
    assert_problem(bob.get(f"/v1/checkpoints/{ckpt['id']}"), 404)
    job = alice.submit(ckpt["id"]).json()
    for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("DELETE", f"/v1/jobs/{job['id']}"),
                         ("GET", f"/v1/jobs/{job['id']}/result")):
        assert_problem(bob.request(method, path), 404)
    assert job["id"] not in [j["id"] for j in bob.get("/v1/jobs").json()["items"]]
    # Bob cannot grow Alice's checkpoint either, and learns nothing about it.
    assert_problem(bob.submit(ckpt["id"]), 422, field="checkpoint_id", match="no checkpoint")
    assert alice.job(job["id"])["state"] == "queued"


# --- uploads ---------------------------------------------------------------------------------------

def test_upload_reports_the_checkpoint_and_stores_it(svc, alice, ckpt, checkpoint_tar):
    assert ckpt["sha256"] == hashlib.sha256(checkpoint_tar).hexdigest()
    assert ckpt["size_bytes"] == len(checkpoint_tar)
    assert (ckpt["family"], ckpt["model_type"], ckpt["has_tokenizer"]) == ("gpt2", "gpt2", True)
    assert (ckpt["config"]["n_layer"], ckpt["config"]["n_embd"], ckpt["config"]["n_head"]) == (2, 32, 4)
    assert ckpt["num_parameters"] > 20_000
    stored = svc["services"].storage.path_of(f"checkpoints/{ckpt['id']}/tiny.tar.gz")
    assert stored.read_bytes() == checkpoint_tar
    assert alice.get(f"/v1/checkpoints/{ckpt['id']}").json() == ckpt


def test_checkpoints_are_found_by_their_sha256_within_the_tenant(alice, bob, ckpt, checkpoint_tar):
    digest = hashlib.sha256(checkpoint_tar).hexdigest()
    found = alice.get("/v1/checkpoints", params={"sha256": digest}).json()["items"]
    assert ckpt["id"] in [c["id"] for c in found] and all(c["sha256"] == digest for c in found)
    assert bob.get("/v1/checkpoints", params={"sha256": digest}).json()["items"] == []
    assert alice.get("/v1/checkpoints", params={"sha256": "0" * 64}).json()["items"] == []
    assert_problem(alice.get("/v1/checkpoints", params={"sha256": "not-hex"}), 422, field="sha256")
    assert_problem(alice.get("/v1/checkpoints", params={"limit": 10**30}), 422, field="limit")


def test_oversize_uploads_are_refused_and_leave_nothing(svc, alice, ckpt):
    before = counts(svc)
    big = b"\0" * (CAP + 1)
    assert_problem(alice.upload(big), 413)  # Content-Length says so: refused before reading

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(40):
            yield b"\1" * 32_768

    assert_problem(alice.upload(chunks()), 413)
    assert counts(svc) == before


def test_bad_archives_and_unsupported_families_are_422_and_leave_nothing(svc, alice, ckpt, unsupported_tar,
                                                                          service_checkpoint):
    before = counts(svc)
    assert_problem(alice.upload(b"this is not a gzip file at all" * 10), 422, match="not a readable tar")
    assert_problem(alice.upload(unsupported_tar), 422, match="opt")
    escape = io.BytesIO()
    with tarfile.open(fileobj=escape, mode="w") as tar:
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    assert_problem(alice.upload(escape.getvalue(), "escape.tar"), 422, match="outside the archive")
    assert_problem(alice.upload(b"", "empty.zip"), 422, field="body")
    assert_problem(alice.upload(b"x", "model.exe"), 422, field="filename")
    weights = (service_checkpoint / "model.safetensors").read_bytes()
    assert_problem(alice.upload(weights, "model.safetensors"), 422, field="X-Ligo-Config")
    assert counts(svc) == before


def _sharded_tar(service_checkpoint, shard_name: str, tokenizer_config: dict | None = None) -> bytes:
    """The tiny checkpoint with an index whose weight_map names ``shard_name`` for one tensor."""
    from safetensors.torch import load_file

    state = load_file(str(service_checkpoint / "model.safetensors"))
    first = sorted(state)[0]
    weight_map = {name: ("model-00001-of-00001.safetensors" if name != first else shard_name) for name in state}
    extra = {"model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": weight_map}).encode()}
    if tokenizer_config is not None:
        extra["tokenizer_config.json"] = json.dumps(tokenizer_config).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(service_checkpoint.iterdir()):
            if f.name in ("model.safetensors", *extra):
                continue
            tar.add(f, arcname=f"model/{f.name}")
        shard = (service_checkpoint / "model.safetensors").read_bytes()
        for name, data in {"model-00001-of-00001.safetensors": shard, **extra}.items():
            info = tarfile.TarInfo(f"model/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_checkpoint_cannot_name_files_outside_itself(svc, alice, bob, ckpt, service_checkpoint):
    """Issue 16, finding 1: a shard index (or tokenizer config) naming another tenant's stored
    checkpoint, a parent folder or a server file is refused, naming the entry, and the answer is
    the same whether that file exists or not (no oracle)."""
    storage = svc["services"].storage
    alices = storage.path_of(f"checkpoints/{ckpt['id']}/tiny.tar.gz")
    assert alices.is_file()
    before = counts(svc)
    for entry in (str(alices), "/etc/passwd", "/no/such/file.safetensors", "../model.safetensors",
                  "sub/../../model.safetensors"):
        body = assert_problem(bob.upload(_sharded_tar(service_checkpoint, entry)), 422,
                              match="model.safetensors.index.json names")
        shown = alices.name if entry == str(alices) else entry  # the server's own paths are never shown
        assert f"names {shown!r}" in body["detail"] and "outside the checkpoint" in body["detail"]
        assert str(svc["data"]) not in body["detail"]
    for key in ("vocab_file", "tokenizer_file", "merges_file"):
        body = assert_problem(bob.upload(_sharded_tar(service_checkpoint, "model-00001-of-00001.safetensors",
                                                      {key: "/etc/passwd"})), 422, match=f"tokenizer_config.json's {key}")
    assert counts(svc) == before
    # The same layout with a name inside the checkpoint is a valid upload.
    ok = bob.upload(_sharded_tar(service_checkpoint, "model-00001-of-00001.safetensors"))
    assert ok.status_code == 201, ok.text


def test_a_bare_safetensors_file_with_its_config(svc, alice, service_checkpoint):
    config = json.loads((service_checkpoint / "config.json").read_text())
    header = base64.b64encode(json.dumps(config).encode()).decode()
    weights = (service_checkpoint / "model.safetensors").read_bytes()
    r = alice.upload(weights, "model.safetensors", headers={"X-Ligo-Config": header})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["family"], body["has_tokenizer"], body["sha256"]) == ("gpt2", False,
                                                                       hashlib.sha256(weights).hexdigest())
    keys = [o.key for o in svc["services"].storage.list(f"checkpoints/{body['id']}/")]
    assert keys == [f"checkpoints/{body['id']}/config.json", f"checkpoints/{body['id']}/model.safetensors"]
    # Without a tokenizer LiGO cannot fit; the service says so at submission.
    assert_problem(alice.submit(body["id"]), 422, field="checkpoint_id", match="tokenizer")
    assert alice.submit(body["id"], strategy="stack").status_code == 202


def test_presigned_uploads_need_s3(alice):
    r = alice.post("/v1/checkpoints/uploads", json={"filename": "m.tar.gz", "size_bytes": 10})
    assert_problem(r, 404, match="S3")


# --- jobs ------------------------------------------------------------------------------------------

def test_a_job_is_queued_with_a_location(alice, ckpt):
    r = alice.submit(ckpt["id"], plan={"tokens": 10**9, "gpu": "A100"}, seed=7)
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["state"], job["stage"], job["attempts"], job["cancel_requested"]) == ("queued", None, 0, False)
    assert (job["target"], job["strategy"], job["seed"], job["fit"]["steps"]) == (TARGET, "ligo", 7, 3)
    assert job["plan"]["tokens"] == 10**9 and job["error"] is None and job["created_at"].endswith("Z")
    assert job["growth"] == {}  # the engine's defaults
    # The target as resolved against the checkpoint, before the job runs.
    config = job["target_config"]
    assert (config["model_type"], config["n_layer"], config["n_embd"], config["n_head"], config["n_inner"]) == \
        ("gpt2", 4, 48, 6, 192)
    assert alice.job(job["id"]) == job


def test_growth_options_are_kept_as_given(alice, ckpt):
    job = alice.submit(ckpt["id"], growth={"spread": 0, "ligo_init": "stack"}).json()
    assert job["growth"] == {"spread": 0.0, "ligo_init": "stack"} and alice.job(job["id"])["growth"] == job["growth"]


def test_growth_options_accept_what_the_engine_accepts():
    """The schema is built from ligo_core/catalog.py (torch-free); the engine's operators from the
    same names (ligo_core/strategies.py): the three must agree."""
    from typing import get_args

    from app.schemas import GrowthOptions
    from ligo_core.catalog import LIGO_INITS, SPREAD, STRATEGY_NAMES
    from ligo_core.strategies import LIGO_INIT_MODES, STRATEGY_MODES

    assert set(LIGO_INIT_MODES) == set(LIGO_INITS) and set(STRATEGY_MODES) | {"ligo"} == set(STRATEGY_NAMES)
    MAX_SPREAD = SPREAD.high

    fields = GrowthOptions.model_fields
    assert set(get_args(get_args(fields["ligo_init"].annotation)[0])) == set(LIGO_INITS)
    def bounds(name):
        meta = fields[name].metadata
        return (next(m.ge for m in meta if hasattr(m, "ge")), next(m.le for m in meta if hasattr(m, "le")))

    assert (bounds("spread"), bounds("noise")) == ((0, MAX_SPREAD), (0, 1.0))  # noise: growth.py checks [0, 1]


@pytest.mark.parametrize("body, field, match", [
    ({"target": "layers=1,hidden=48,heads=6,ffn=192"}, "target", "n_layer"),
    ({"target": "layers=4,hidden=50,heads=6,ffn=192"}, "target", "divisible"),
    ({"target": "bert-base"}, "target", "family"),
    ({"target": {"layers": "many"}}, "target", "layers"),
    ({"strategy": "magic"}, "strategy", None),
    ({"fit": {"steps": -1}}, "fit.steps", None),
    ({"plan": {"gpu": "abacus"}}, "plan.gpu", "abacus"),
    ({"callback_url": "not a url"}, "callback_url", None),
    ({"fit": {"steps": 3, "data_uri": "s3://b/k.txt"}}, "fit.data_uri", "S3"),
    ({"growth": {"spread": 4.5}}, "growth.spread", None),
    ({"growth": {"noise": -0.1}}, "growth.noise", None),
    ({"growth": {"ligo_init": "random"}}, "growth.ligo_init", None),
    ({"growth": {"amount": 1}}, "growth.amount", None),
    ({"strategy": "stack", "growth": {"ligo_init": "stack"}}, "growth.ligo_init", "no fit"),
    ({"strategy": "net2net", "growth": {"spread": 1.0}}, "growth.spread", "exact copies"),
    ({"strategy": "net2net", "growth": {"noise": 0.5}}, "growth.noise", "exact copies"),
])
def test_invalid_jobs_are_refused_naming_the_field(svc, alice, ckpt, body, field, match):
    before = counts(svc)
    payload = {"checkpoint_id": ckpt["id"], "target": TARGET, **body}
    assert_problem(alice.post("/v1/jobs", json=payload), 422, field=field, match=match)
    assert counts(svc) == before


def test_the_same_idempotency_key_gives_the_same_job(svc, alice, bob, ckpt):
    first = alice.submit(ckpt["id"], headers={"Idempotency-Key": "run-42"})
    again = alice.submit(ckpt["id"], headers={"Idempotency-Key": "run-42"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    with svc["services"].db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == "run-42")) == 1
    other = alice.submit(ckpt["id"], fit={"steps": 9}, headers={"Idempotency-Key": "run-42"})
    assert_problem(other, 422, field="Idempotency-Key")
    exact = alice.submit(ckpt["id"], growth={"spread": 0}, headers={"Idempotency-Key": "run-42"})
    assert_problem(exact, 422, field="Idempotency-Key")
    # Keys are per tenant.
    bob_ckpt = bob.checkpoint(svc["services"].storage.path_of(f"checkpoints/{ckpt['id']}/tiny.tar.gz").read_bytes())
    assert bob.submit(bob_ckpt["id"], headers={"Idempotency-Key": "run-42"}).status_code == 202


def test_the_worker_grows_to_the_target_resolved_at_submission(svc, alice, ckpt):
    from app.ligo_bridge import config_from_dict
    from worker.runner import JobRunner

    services = svc["services"]
    job = alice.submit(ckpt["id"], strategy="stack", fit={"steps": 0}).json()
    # The spec would resolve to another shape now (as after an engine upgrade): the job grows to
    # the config its answers have shown since submission.
    with services.db.write() as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(target="layers=3,hidden=64,heads=4"))
    assert JobRunner(services.settings, services.db, services.storage).run(job["id"]) == "succeeded"
    written = json.loads(services.storage.get_bytes(f"jobs/{job['id']}/output/config.json"))
    assert (written["n_layer"], written["n_embd"], written["n_head"], written["n_inner"]) == (4, 48, 6, 192)

    def config(data: dict) -> dict:  # every field, defaults included (config.json leaves them out)
        out = config_from_dict(data).to_dict()
        # The engine scales the norm's epsilon with the width, which keeps the grown function exact.
        return {k: v for k, v in out.items()
                if k not in ("transformers_version", "architectures", "dtype", "layer_norm_epsilon")}

    assert config(written) == config(job["target_config"])
    assert alice.job(job["id"])["target_config"] == job["target_config"]


def test_a_job_above_the_workers_memory_is_refused_with_the_numbers(svc, alice, ckpt, monkeypatch):
    monkeypatch.setattr(svc["services"].settings, "worker_memory_gb", 0.01)
    before = counts(svc)
    body = assert_problem(alice.submit(ckpt["id"], strategy="stack", fit={"steps": 0, "eval_tokens": 0}), 422,
                          field="target", match=r"needs about [\d.]+ GiB of memory, above the worker's budget of 0\.0 GiB")
    assert body["type"].endswith("memory-plan") and body["budget_gib"] == 0.01
    assert body["needed_gib"] > 0.5 and body["biggest_term"] in body["terms_gib"]
    assert counts(svc) == before  # no job row
    monkeypatch.setattr(svc["services"].settings, "worker_memory_gb", 64.0)
    assert alice.submit(ckpt["id"], strategy="stack", fit={"steps": 0, "eval_tokens": 0}).status_code == 202


def test_a_job_on_several_gpus_is_planned_per_process(svc, alice, ckpt, monkeypatch):
    """LIGO_WORKER_GPUS=N: each of the job's N processes holds 1/N of the batch and of the sharded
    operator (ligo_core/memory_plan.py), and the budget is each one's."""
    from app import ligo_bridge

    settings = svc["services"].settings
    monkeypatch.setattr(settings, "worker_memory_gb", 64.0)
    monkeypatch.setattr(settings, "worker_gpus", 4)
    planned = []
    original = ligo_bridge.memory_refusal

    def spy(*args, **kwargs):
        planned.append(kwargs["processes"])
        return original(*args, **kwargs)

    monkeypatch.setattr(ligo_bridge, "memory_refusal", spy)
    assert alice.submit(ckpt["id"], strategy="ligo", fit={"steps": 2}).status_code == 202
    assert planned == [4]


def test_eval_tokens_and_dtype_reach_the_engine(svc, alice, ckpt):
    from worker.runner import JobRunner

    services = svc["services"]
    job = alice.submit(ckpt["id"], strategy="preserve", fit={"steps": 0, "seq_len": 16, "eval_tokens": 64},
                       growth={"dtype": "bfloat16"}).json()
    assert JobRunner(services.settings, services.db, services.storage).run(job["id"]) == "succeeded"
    report = alice.get(f"/v1/jobs/{job['id']}/result").json()["report"]
    assert report["eval_tokens"] == 64 and report["heldout_loss"]["sequences"] == 4
    assert json.loads(services.storage.get_bytes(f"jobs/{job['id']}/output/config.json"))["dtype"] == "bfloat16"
    assert_problem(alice.submit(ckpt["id"], fit={"steps": 0, "eval_tokens": -1}), 422, field="fit.eval_tokens")
    # Too few to score (under 2 sequences): refused at submission, not as a failed job later.
    body = assert_problem(alice.submit(ckpt["id"], fit={"steps": 0, "seq_len": 16, "eval_tokens": 20}), 422,
                          field="fit.eval_tokens")
    assert "below 2 sequences of 16 tokens (32)" in body["detail"]
    assert_problem(alice.submit(ckpt["id"], growth={"dtype": "int8"}), 422, field="growth.dtype")


def test_cancelling_a_queued_job_is_immediate(alice, ckpt):
    job = alice.submit(ckpt["id"]).json()
    r = alice.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 202
    assert (r.json()["state"], r.json()["cancel_requested"]) == ("cancelled", True)
    assert r.json()["finished_at"] is not None
    assert_problem(alice.delete(f"/v1/jobs/{job['id']}"), 409)
    assert_problem(alice.get(f"/v1/jobs/{job['id']}/result"), 409, match="cancelled")


def test_listing_pages_through_jobs_newest_first(alice, ckpt):
    made = [alice.submit(ckpt["id"]).json()["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        page = alice.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen))
    assert seen[:5] == made[::-1]
    cancelled = alice.get("/v1/jobs", params={"state": "cancelled", "limit": 100}).json()["items"]
    assert cancelled and all(j["state"] == "cancelled" for j in cancelled)
    for cursor in ("!!", "é", "QUFB", "x" * 200, "%00"):  # issue 16.8: a malformed cursor was a 500
        assert_problem(alice.get("/v1/jobs", params={"cursor": cursor}), 400, field="cursor")
    assert_problem(alice.get("/v1/jobs", params={"state": "sleeping"}), 422, field="state")


# --- estimate ----------------------------------------------------------------------------------------

def test_estimate_matches_the_cost_model(alice, ckpt):
    import ligo_core
    from ligo_core.cost import estimate

    r = alice.post("/v1/estimate", json={"source": "gpt2", "target": "gpt2-medium", "fit_steps": 100,
                                         "tokens": 10**10, "gpu": "A100"})
    assert r.status_code == 200, r.text
    expected = estimate(ligo_core.resolve_target("gpt2"),
                        ligo_core.resolve_target("gpt2-medium", ligo_core.resolve_target("gpt2")),
                        fit_steps=100, tokens=10**10, gpu="A100")
    assert r.json()["savings"]["fraction"] == pytest.approx(expected["savings"]["fraction"])
    assert r.json()["scratch"]["flops"] == pytest.approx(expected["scratch"]["flops"])
    assert (r.json()["fit"]["batch"], r.json()["fit"]["seq_len"]) == (16, 128)  # what a job fits with
    by_ckpt = alice.post("/v1/estimate", json={"checkpoint_id": ckpt["id"], "target": TARGET})
    assert by_ckpt.status_code == 200 and by_ckpt.json()["target"]["layers"] == 4
    by_config = alice.post("/v1/estimate", json={"source": ckpt["config"], "target": TARGET})
    assert by_config.json()["target"] == by_ckpt.json()["target"]
    assert_problem(alice.post("/v1/estimate", json={"source": "gpt2", "target": "bert-base"}), 422, field="target")
    assert_problem(alice.post("/v1/estimate", json={"source": "gpt2", "target": "gpt2-medium", "gpu": "abacus"}),
                   422, field="gpu")


def test_engine_errors_name_their_field_whatever_their_message_says(alice, ckpt):
    # The field comes from the error's `field`: a GPU named like another field (which the message
    # then quotes) is still the GPU's fault, in an estimate and in a job.
    for gpu in ("fit_steps", "tokens"):
        r = alice.post("/v1/estimate", json={"source": "gpt2", "target": "gpt2-medium", "gpu": gpu})
        assert [e["field"] for e in assert_problem(r, 422, match="unknown GPU")["errors"]] == ["gpu"]
        r = alice.post("/v1/jobs", json={"checkpoint_id": ckpt["id"], "target": TARGET, "plan": {"gpu": gpu}})
        assert [e["field"] for e in assert_problem(r, 422, match="unknown GPU")["errors"]] == ["plan.gpu"]
    r = alice.post("/v1/estimate", json={"source": "gpt2-medium", "target": "gpt2"})  # field "layers": the target's
    assert [e["field"] for e in assert_problem(r, 422, match="shrink")["errors"]] == ["target"]


# --- operations ----------------------------------------------------------------------------------

def test_readiness_metrics_and_openapi(svc, alice, ckpt):
    client = svc["client"]
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    metrics = client.get("/metrics").text
    with svc["services"].db.read() as s:
        queued = s.scalar(select(func.count()).select_from(Job).where(Job.state == "queued"))
    assert f'ligo_jobs{{state="queued"}} {float(queued)}' in metrics
    assert f"ligo_queue_depth {float(queued)}" in metrics
    assert re.search(r'ligo_http_requests_total\{method="POST",route="/v1/checkpoints",status="201"\} \d', metrics)
    spec = client.get("/v1/openapi.json").json()
    for path in ("/v1/checkpoints", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/estimate"):
        assert path in spec["paths"], path
    assert not [p for p in spec["paths"] if p.startswith(("/v1/checkpoints/uploads", "/v1/checkpoints/register"))]
    assert "application/octet-stream" in spec["paths"]["/v1/checkpoints"]["post"]["requestBody"]["content"]
    assert spec["paths"]["/v1/jobs"]["get"]["security"] == [{"apiKey": []}]
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert "security" not in spec["paths"]["/v1/files/{token}"]["get"]  # the signed link is the credential


def test_file_links_are_signed(svc):
    storage = svc["services"].storage
    storage.put_bytes("jobs/x/output/a.txt", b"hello")
    url = storage.download_url("jobs/x/output/a.txt", "a.txt", 60, "http://testserver")
    client = svc["client"]
    r = client.get(url)
    assert r.status_code == 200 and r.content == b"hello"
    assert 'filename="a.txt"' in r.headers["content-disposition"]
    assert_problem(client.get(url[:-3] + "AAA"), 403)
    storage.delete_prefix("jobs/x/")


@pytest.mark.slow
def test_a_worker_with_two_gpus_runs_one_job_across_two_processes(svc, alice, ckpt):
    """LIGO_WORKER_GPUS=2 (gloo CPU processes here): the job's fit runs in two ranks; a rank that
    fails (an input no rank can read) fails the job with its error, as one process would."""
    from worker.runner import JobRunner

    services = svc["services"]
    settings = services.settings.model_copy(update={"worker_gpus": 2, "worker_device": "cpu"})
    job = alice.submit(ckpt["id"], strategy="ligo", fit={"steps": 2, "batch_size": 2, "seq_len": 16}).json()
    assert JobRunner(settings, services.db, services.storage).run(job["id"]) == "succeeded"
    manifest = json.loads(services.storage.get_bytes(f"jobs/{job['id']}/manifest.json"))
    assert manifest["report"]["processes"] == 2 and len(manifest["report"]["fit"]["loss_history"]) == 2
    assert alice.job(job["id"])["progress"]["step"] == 2
    bad = alice.submit(ckpt["id"], strategy="ligo", fit={"steps": 1, "batch_size": 1, "seq_len": 16}).json()
    assert JobRunner(settings, services.db, services.storage).run(bad["id"]) == "failed"
    failed = alice.job(bad["id"])
    assert failed["error"]["type"] == "target_error" and "cannot be split over 2 processes" in failed["error"]["detail"]
    assert not services.storage.list(f"jobs/{bad['id']}/")
