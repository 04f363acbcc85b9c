"""End to end on the embedded default: ``ligo serve`` with SQLite, local storage, filesystem broker.

Upload a tiny GPT-2, grow it, download every output through its signed link, load it with
transformers, and receive the signed webhook (after one refused delivery: it is retried).
"""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest

from app.auth import webhook_secret
from app.db import Database
from app.settings import Settings
from app.webhooks import verify
from tests.service_fixtures import FIT, Api, wait_for

pytestmark = pytest.mark.slow


def test_grow_a_checkpoint_end_to_end(embedded_service, checkpoint_tar, webhook_receiver, tmp_path):
    api = Api(embedded_service["client"], embedded_service["keys"]["alice"])
    ckpt = api.checkpoint(checkpoint_tar)
    r = api.submit(ckpt["id"], callback_url=webhook_receiver.url, growth={"spread": 0.5, "ligo_init": "stack"},
                   headers={"Idempotency-Key": "e2e"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = api.wait(job_id, timeout=180)
    assert job["state"] == "succeeded", (job, embedded_service["log"].read_text()[-4000:])
    assert job["attempts"] == 1 and job["error"] is None and job["finished_at"] >= job["started_at"]
    assert [step for step, _ in job["loss_history"]] == [1, 2, 3]
    assert job["progress"] == {"step": 3, "total": 3, "loss": job["loss_history"][-1][1]}
    assert Api(embedded_service["client"], embedded_service["keys"]["bob"]).get(f"/v1/jobs/{job_id}").status_code == 404

    result = api.get(f"/v1/jobs/{job_id}/result").json()
    names = {f["path"] for f in result["files"]}
    assert {"config.json", "model.safetensors", "growth_report.json", "tokenizer.json"} <= names
    out = tmp_path / "grown"
    out.mkdir()
    for f in result["files"]:
        assert f["url"].startswith(embedded_service["base"] + "/v1/files/")
        data = httpx.get(f["url"], timeout=30).content  # no API key: the link is the credential
        assert len(data) == f["size_bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]
        (out / f["path"]).write_bytes(data)
    assert json.loads((out / "growth_report.json").read_text())["strategy"] == result["report"]["strategy"] == "ligo"
    assert result["report"]["target"]["sizes"]["layers"] == 4
    assert (result["report"]["spread"], result["report"]["ligo_init"]) == (0.5, "stack")  # the job's growth options
    assert 0 < result["estimate"]["savings"]["fraction"] < 1
    assert result["estimate"]["fit"]["steps"] == FIT["steps"] and result["estimate"]["fit"]["batch"] == 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head, model.config.n_inner) == (4, 48, 6, 192)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The grown model reads text.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()

    # Exactly the published files are stored for the job; no scratch is left behind.
    objects = embedded_service["data"] / "objects" / "jobs" / job_id
    stored = sorted(p.relative_to(objects).as_posix() for p in objects.rglob("*") if p.is_file())
    assert stored == sorted(["manifest.json"] + [f"output/{n}" for n in names])
    assert not list((embedded_service["data"] / "tmp").glob("job-*"))

    # The webhook: refused once, retried, signed with the tenant's secret, same webhook-id.
    hooks = wait_for(lambda: len(webhook_receiver.received) >= 2 and webhook_receiver.received, 30,
                     what="the webhook retry")
    key = Settings(data_dir=embedded_service["data"]).signing_key()  # the database holds the secret sealed
    db = Database(f"sqlite:///{embedded_service['data'] / 'ligo.db'}", key)
    secret = webhook_secret(db, "alice")
    db.dispose()
    first, second = hooks[:2]
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
    assert verify(secret, second["headers"], second["body"])
    event = json.loads(second["body"])
    assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id and event["data"]["state"] == "succeeded"
    time.sleep(0.5)
    assert len(webhook_receiver.received) == 2  # delivered once accepted, never again


def test_health_and_readiness(embedded_service):
    client = embedded_service["client"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    assert client.get("/v1/openapi.json").json()["info"]["title"] == "LiGO growth service"
    assert client.get("/v1/jobs").status_code == 401
