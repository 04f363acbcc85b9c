"""End to end on the deployment stack: PostgreSQL, Redis, S3 (moto's server) and a Celery worker.

Also the flows only S3 has (presigned multipart upload, registering an existing object), a
running job cancelled, and a worker killed with SIGKILL in the middle of fitting.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select

from app.db import Checkpoint, Job, Upload, WebhookDelivery, utcnow
from app.schemas import job_json
from tests.service_fixtures import FIT, Api, CeleryWorker, job_objects, manifest_keys, tar_gz

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def alice(distributed):
    return Api(distributed["client"], distributed["keys"]["alice"])


@pytest.fixture(scope="module")
def ckpt(alice, checkpoint_tar):
    return alice.checkpoint(checkpoint_tar)


def storage(distributed):
    return distributed["app"].state.services.storage


def rows(distributed, model, *where) -> int:
    with distributed["app"].state.services.db.read() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def s3_state(distributed) -> tuple[list[str], list]:
    client, bucket = distributed["s3"]["client"], distributed["s3"]["bucket"]
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))
    return keys, client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_grow_end_to_end_with_presigned_downloads(distributed, alice, ckpt, checkpoint_tar, tmp_path):
    assert storage(distributed).get_bytes(f"checkpoints/{ckpt['id']}/tiny.tar.gz") == checkpoint_tar
    job_id = alice.submit(ckpt["id"], callback_url="http://127.0.0.1:9/nowhere").json()["id"]
    job = alice.wait(job_id, timeout=180)
    assert job["state"] == "succeeded", (job, (distributed["data"] / "worker.log").read_text()[-4000:])
    result = alice.get(f"/v1/jobs/{job_id}/result").json()
    for f in result["files"]:
        assert f["url"].startswith(distributed["s3"]["endpoint"]) and "X-Amz-Signature=" in f["url"]
        data = httpx.get(f["url"], timeout=30).content
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        (tmp_path / f["path"]).write_bytes(data)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (model.config.n_layer, model.config.n_embd) == (4, 48)
    db = distributed["app"].state.services.db
    with db.read() as s:
        row = s.get(Job, job_id)
    assert job_objects(storage(distributed), job_id) == manifest_keys(job_id, row.manifest)
    # The fast reader, on PostgreSQL, reads what the ORM reads. The webhook's delivery state moves
    # on its own clock (retries to an unreachable callback), so the readings, taken at different
    # moments, are compared without it.
    fast, orm = job_json(db.jobs.get(job_id)), job_json(row)
    assert {k: v for k, v in fast.items() if k != "webhook"} == {k: v for k, v in orm.items() if k != "webhook"} \
        == {k: v for k, v in job.items() if k != "webhook"}
    assert fast["webhook"].keys() == orm["webhook"].keys() == job["webhook"].keys()
    assert result["estimate"]["target"]["layers"] == 4


def test_a_one_paragraph_per_line_text_of_a_few_mb_is_the_fitting_data(distributed, alice, ckpt):
    """fit.data_uri: a plain-text corpus, one paragraph per line (no blank lines), of ~3 MB."""
    from ligo_core.data import default_corpus_texts

    lines = [" ".join(t.split()) for t in default_corpus_texts()]
    text = "\n".join(lines * (3 * 2**20 // len("\n".join(lines)) + 1)) + "\n"
    distributed["s3"]["client"].put_object(Bucket="external", Key="corpus/lines.txt", Body=text.encode())
    r = alice.submit(ckpt["id"], fit={**FIT, "data_uri": "s3://external/corpus/lines.txt"})
    assert r.status_code == 202, r.text
    job = alice.wait(r.json()["id"], timeout=180)
    assert job["state"] == "succeeded", (job, (distributed["data"] / "worker.log").read_text()[-4000:])
    report = alice.get(f"/v1/jobs/{job['id']}/result").json()["report"]
    assert len(text) > 3 * 2**20 and report["fit"]["data"].endswith("lines.txt")
    assert report["fit"]["steps"] == FIT["steps"] and report["heldout_loss"]["sequences"] > 0


def test_presigned_multipart_upload(distributed, alice, service_checkpoint):
    padded = tar_gz(service_checkpoint, extra={"notes.bin": os.urandom(6 * 2**20)})  # two 5 MiB parts
    r = alice.post("/v1/checkpoints/uploads", json={"filename": "big.tar.gz", "size_bytes": len(padded)})
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["part_size"] == 5 * 2**20 and len(up["parts"]) == math.ceil(len(padded) / up["part_size"]) == 2
    done = []
    for part in up["parts"]:
        start = (part["part_number"] - 1) * up["part_size"]
        resp = httpx.put(part["url"], content=padded[start:start + up["part_size"]], timeout=30)
        assert resp.status_code == 200, resp.text
        done.append({"part_number": part["part_number"], "etag": resp.headers["etag"]})
    r = alice.post(f"/v1/checkpoints/uploads/{up['id']}/complete", json={"parts": done})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == up["id"] and body["sha256"] == hashlib.sha256(padded).hexdigest()
    assert body["size_bytes"] == len(padded) and body["family"] == "gpt2"
    assert rows(distributed, Upload) == 0
    assert alice.get(f"/v1/checkpoints/{up['id']}").status_code == 200

    # Resuming: after one part of two, a GET gives fresh URLs and the part S3 holds; bob sees nothing.
    up = alice.post("/v1/checkpoints/uploads", json={"filename": "again.tar.gz", "size_bytes": len(padded)}).json()
    first = httpx.put(up["parts"][0]["url"], content=padded[: up["part_size"]], timeout=30).headers["etag"]
    r = alice.get(f"/v1/checkpoints/uploads/{up['id']}")
    assert r.status_code == 200, r.text
    resumed = r.json()
    assert resumed["uploaded"] == [{"part_number": 1, "etag": first}] and len(resumed["parts"]) == 2
    assert (resumed["part_size"], resumed["expires_at"]) == (up["part_size"], up["expires_at"])
    bob = Api(distributed["client"], distributed["keys"]["bob"])
    assert bob.get(f"/v1/checkpoints/uploads/{up['id']}").status_code == 404
    second = httpx.put(resumed["parts"][1]["url"], content=padded[up["part_size"]:], timeout=30).headers["etag"]
    r = alice.post(f"/v1/checkpoints/uploads/{up['id']}/complete",
                   json={"parts": [*resumed["uploaded"], {"part_number": 2, "etag": second}]})
    assert r.status_code == 201 and r.json()["sha256"] == hashlib.sha256(padded).hexdigest(), r.text
    assert alice.get(f"/v1/checkpoints/uploads/{up['id']}").status_code == 404  # complete: no longer an upload
    up = alice.post("/v1/checkpoints/uploads", json={"filename": "late.tar", "size_bytes": 10}).json()
    with distributed["app"].state.services.db.write() as s:
        s.get(Upload, up["id"]).expires_at = utcnow() - timedelta(seconds=1)
    r = alice.get(f"/v1/checkpoints/uploads/{up['id']}")
    assert r.status_code == 410 and "expired" in r.json()["detail"]
    assert alice.delete(f"/v1/checkpoints/uploads/{up['id']}").status_code == 204

    # A presigned upload of something that is not a checkpoint: 422, object and rows gone.
    before = s3_state(distributed), rows(distributed, Checkpoint)
    junk = os.urandom(1000)
    up = alice.post("/v1/checkpoints/uploads", json={"filename": "junk.zip", "size_bytes": len(junk)}).json()
    etag = httpx.put(up["parts"][0]["url"], content=junk, timeout=30).headers["etag"]
    r = alice.post(f"/v1/checkpoints/uploads/{up['id']}/complete", json={"parts": [{"part_number": 1, "etag": etag}]})
    assert r.status_code == 422 and "zip" in r.json()["detail"]
    assert (s3_state(distributed), rows(distributed, Checkpoint)) == before
    assert rows(distributed, Upload) == 0
    # Aborting one leaves no multipart upload in the bucket.
    up = alice.post("/v1/checkpoints/uploads", json={"filename": "x.tar", "size_bytes": 10}).json()
    assert alice.delete(f"/v1/checkpoints/uploads/{up['id']}").status_code == 204
    assert s3_state(distributed)[1] == [] and rows(distributed, Upload) == 0


def test_register_an_existing_object(distributed, alice, ckpt, checkpoint_tar):
    client = distributed["s3"]["client"]
    client.put_object(Bucket="external", Key="models/tiny.tar.gz", Body=checkpoint_tar)
    r = alice.post("/v1/checkpoints/register", json={"uri": "s3://external/models/tiny.tar.gz"})
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(checkpoint_tar).hexdigest()
    before = rows(distributed, Checkpoint)
    own = f"s3://{distributed['s3']['bucket']}/checkpoints/{ckpt['id']}/tiny.tar.gz"  # not by URI, even one's own
    for uri, match in ((own, "own storage"), ("s3://elsewhere/m.tar", "may read"),
                       ("s3://external/missing.tar.gz", "cannot read"), ("https://x/m.tar", "s3://")):
        r = alice.post("/v1/checkpoints/register", json={"uri": uri})
        assert r.status_code == 422 and match in r.json()["detail"], (uri, r.text)
    assert rows(distributed, Checkpoint) == before


def test_oversize_stream_to_s3_leaves_no_upload(distributed, alice):
    before = s3_state(distributed), rows(distributed, Checkpoint)

    def chunks():
        for _ in range(9):
            yield os.urandom(2**20)

    r = alice.upload(chunks(), "big.tar")
    assert r.status_code == 413
    assert (s3_state(distributed), rows(distributed, Checkpoint)) == before
    assert list((distributed["settings"].resolved_tmp_dir / "uploads").glob("*")) == []  # no spool file


def test_cancel_a_running_job(distributed, alice, ckpt):
    job_id = alice.submit(ckpt["id"], fit={"steps": 100_000, "batch_size": 2, "seq_len": 16}).json()["id"]
    alice.wait(job_id, check=lambda j: j["stage"] == "fitting" and j["progress"]["step"] >= 2, timeout=120)
    r = alice.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 202 and r.json()["cancel_requested"] and r.json()["state"] == "running"
    job = alice.wait(job_id, timeout=30)
    assert job["state"] == "cancelled" and job["error"] is None
    assert job["progress"]["step"] < 100_000
    assert job_objects(storage(distributed), job_id) == []


def test_a_worker_killed_mid_fit_is_replaced_and_the_job_finishes_once(distributed, alice, ckpt):
    steps = 60
    job_id = alice.submit(ckpt["id"], fit={"steps": steps, "batch_size": 2, "seq_len": 16},
                          callback_url="http://127.0.0.1:9/hook").json()["id"]
    alice.wait(job_id, check=lambda j: j["stage"] == "fitting" and j["progress"]["step"] >= 2, timeout=120)
    distributed["worker"].kill(signal.SIGKILL)  # the whole worker: parent and the child running the job
    assert alice.job(job_id)["state"] == "running"  # until its lease runs out
    worker = CeleryWorker(distributed["worker_env"], distributed["queue"], distributed["data"] / "worker2.log")
    distributed["worker"] = worker.start()
    job = alice.wait(job_id, timeout=180)
    assert job["state"] == "succeeded", (job, (distributed["data"] / "worker2.log").read_text()[-4000:])
    assert job["attempts"] == 2
    assert [s for s, _ in job["loss_history"]] == list(range(1, steps + 1))  # one full run on record
    with distributed["app"].state.services.db.read() as s:
        manifest = s.get(Job, job_id).manifest
        hooks = s.scalars(select(WebhookDelivery.event_type).where(WebhookDelivery.job_id == job_id)).all()
    assert manifest["attempt"] == 2
    assert job_objects(storage(distributed), job_id) == manifest_keys(job_id, manifest)
    assert hooks == ["job.succeeded"]  # one terminal transition


def test_the_s3_only_endpoints_are_documented_with_s3(distributed):
    paths = distributed["client"].get("/v1/openapi.json").json()["paths"]
    assert {"/v1/checkpoints/uploads", "/v1/checkpoints/uploads/{upload_id}/complete",
            "/v1/checkpoints/uploads/{upload_id}", "/v1/checkpoints/register"} <= set(paths)
