"""ligo_client and ``ligo remote``: against the real embedded service (``ligo serve``) and, for
the presigned multipart upload, against moto's S3 with PostgreSQL, Redis and a Celery worker.

The unit tests at the top need no service; the rest are marked slow like the other service tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

import httpx
import pytest

from ligo_client import (
    BadInput,
    Client,
    IntegrityError,
    JobTimeout,
    LigoClientError,
    Retry,
    derive_idempotency_key,
)
from ligo_client.archive import pack_directory
from ligo_client.cli import main as remote
from ligo_client.http import retry_after
from ligo_client.progress import Display
from tests.service_fixtures import FIT, ROOT, TARGET, wait_for

FAST = Retry(attempts=2, backoff=0.05, max_delay=0.1)
CLI_FIT = ["--fit-steps", str(FIT["steps"]), "--batch-size", str(FIT["batch_size"]), "--seq-len", str(FIT["seq_len"])]


# --- no service ----------------------------------------------------------------------------------

def test_the_client_imports_without_torch_the_engine_or_the_service():
    code = ("import sys\n"
            "for name in ('torch', 'ligo_core', 'app', 'worker', 'transformers', 'fastapi'): sys.modules[name] = None\n"
            "import ligo_client, ligo_client.cli\n"
            "assert ligo_client.cli.main(['--help']) == 0\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "ligo remote grow SRC" in r.stdout


def test_packing_is_deterministic_flat_and_leaves_out_hidden_files(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    (model / "sub" / "weights.bin").write_bytes(os.urandom(3000))
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref")
    blob = tmp_path / "blob"
    blob.write_bytes(b"tokenizer")
    (model / "tokenizer.json").symlink_to(blob)  # as in a Hugging Face cache snapshot
    first, sha1, size1 = pack_directory(model, tmp_path / "scratch")
    os.utime(model / "config.json", (1, 1))  # times are not part of the archive
    second, sha2, size2 = pack_directory(model, tmp_path / "scratch")
    assert first != second and (sha1, size1) == (sha2, size2)
    assert first.read_bytes() == second.read_bytes() and hashlib.sha256(first.read_bytes()).hexdigest() == sha1
    with tarfile.open(first) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["config.json", "sub/weights.bin", "tokenizer.json"]
        assert all(m.isfile() and m.mtime == 0 and m.uid == 0 for m in members)
        assert tar.extractfile("tokenizer.json").read() == b"tokenizer"


def test_the_idempotency_key_follows_the_inputs_not_the_checkpoint_id():
    sha = "ab" * 32
    base = {"checkpoint_id": "a", "target": TARGET, "strategy": "ligo", "seed": 0, "fit": {"steps": 3}}
    key = derive_idempotency_key(sha, base)
    assert key == derive_idempotency_key(sha, {**base, "checkpoint_id": "b"})
    assert len(key) <= 255 and key.startswith("ligo-client-v1-")
    for changed in ({"target": "gpt2-medium"}, {"fit": {"steps": 4}}, {"seed": 1}, {"strategy": "stack"}):
        assert derive_idempotency_key(sha, {**base, **changed}) != key
    assert derive_idempotency_key("cd" * 32, base) != key


def test_retry_after_in_seconds_or_as_a_date_and_bounded():
    def resp(value):
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after(resp("2")) == 2.0
    assert retry_after(resp("100000")) == 300.0
    assert retry_after(resp("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0  # in the past
    assert retry_after(resp("soon")) is None and retry_after(httpx.Response(200)) is None


def test_transient_answers_are_retried_after_retry_after_and_problems_are_typed(tmp_path):
    calls = []

    def handler(request):
        calls.append(request.url.path)
        if len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "busy"})
        if request.url.path.endswith("/missing"):
            return httpx.Response(404, json={"type": "urn:ligo:problem:not-found", "title": "Not Found",
                                             "status": 404, "detail": "no job 'missing'"})
        return httpx.Response(200, json={"id": "j1", "state": "running", "progress": {}},
                              headers={"Retry-After": "0.01"})

    http = httpx.Client(base_url="http://svc", transport=httpx.MockTransport(handler))
    events = []
    with Client("http://svc", "k", http=http, cache_dir=tmp_path, retry=FAST, on_event=events.append,
                poll_interval=(0.01, 0.02)) as c:
        assert c.job("j1")["state"] == "running"
        assert [e["stage"] for e in events] == ["retrying"] and events[0]["delay"] == 0
        with pytest.raises(BadInput) as err:
            c.job("missing")
        assert err.value.status == 404 and err.value.kind == "not-found" and "no job 'missing'" in str(err.value)
        with pytest.raises(JobTimeout) as timeout:
            c.wait("j1", timeout=0.1)
        assert timeout.value.job["state"] == "running"


def test_cli_exit_1_when_the_service_cannot_be_reached(monkeypatch, capsys):
    from tests.service_fixtures import free_port

    monkeypatch.setattr("ligo_client.client.Retry", lambda: FAST)
    assert remote(["status", "j1", "--server", f"http://127.0.0.1:{free_port()}", "--key", "k"]) == 1
    err = capsys.readouterr().err
    assert "ConnectError" in err and "tried 3 times" in err


def test_unsafe_result_paths_are_refused(tmp_path):
    def handler(request):
        return httpx.Response(200, json={"files": [{"path": "../evil", "size_bytes": 1, "sha256": None,
                                                    "url": "http://x/f"}], "report": {}, "estimate": {}})

    http = httpx.Client(base_url="http://svc", transport=httpx.MockTransport(handler))
    with Client("http://svc", "k", http=http, cache_dir=tmp_path) as c, pytest.raises(LigoClientError, match="unsafe"):
        c.download("j1", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the temporary folder


def test_the_log_display_prints_one_line_per_change():
    import io

    out = io.StringIO()
    show = Display(out, live=False)
    for step in range(1, 101):
        show({"stage": "job", "job": {"id": "j", "state": "running", "stage": "fitting",
                                      "progress": {"step": step, "total": 100, "loss": 1.0}}})
    show({"stage": "job", "job": {"id": "j", "state": "succeeded", "stage": None, "progress": {}}})
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 12 and "\r" not in out.getvalue()
    assert lines[-1].endswith("job j succeeded") and "step 50/100 loss 1.0000" in "".join(lines)


# --- the embedded service ------------------------------------------------------------------------

class Tamper(httpx.BaseTransport):
    """Real HTTP, with the first ``times`` downloads answered with one byte flipped (same length)."""

    def __init__(self, times: int = 1):
        self.inner, self.left, self.gets = httpx.HTTPTransport(), times, []

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        if request.method != "GET":
            return response
        self.gets.append(str(request.url))
        if self.left:
            self.left -= 1
            data = bytearray(response.read())
            data[len(data) // 2] ^= 0xFF
            return httpx.Response(response.status_code, headers=response.headers, content=bytes(data))
        return response


@pytest.fixture(scope="module")
def service(embedded_service):
    return {"base": embedded_service["base"], "key": embedded_service["keys"]["alice"], **embedded_service}


@pytest.fixture(scope="module")
def grown(service, service_checkpoint, tmp_path_factory):
    """One grow through the client, from the model directory: (client events, job, cache dir)."""
    cache = tmp_path_factory.mktemp("client-cache")
    events = []
    with Client(service["base"], service["key"], cache_dir=cache, on_event=events.append) as c:
        job = c.grow(service_checkpoint, TARGET, fit=FIT, timeout=180)
    return events, job, cache


@pytest.mark.slow
def test_grow_through_the_client_end_to_end(service, grown, tmp_path):
    events, job, cache = grown
    assert job["state"] == "succeeded" and job["fit"]["steps"] == FIT["steps"], job
    stages = [e["stage"] for i, e in enumerate(events) if i == 0 or e["stage"] != events[i - 1]["stage"]]
    assert stages[:4] == ["packing", "uploading", "uploaded", "submitted"] and stages[-1] == "job"
    assert not next(e for e in events if e["stage"] == "submitted")["reused"]
    assert list((cache / "packs").iterdir()) == []  # the packed archive is removed after the upload

    out = tmp_path / "grown"
    with Client(service["base"], service["key"], cache_dir=cache) as c:
        assert c.download(job, out) == out
        result = c.result(job)
    for f in result["files"]:
        assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (4, 48, 6)
    with Client(service["base"], service["key"], cache_dir=cache) as c:
        by_checkpoint = c.estimate(TARGET, checkpoint=job["checkpoint_id"], fit_steps=3, fit_batch=2, seq_len=16)
        by_preset = c.estimate("gpt2-medium", source="gpt2")
        with pytest.raises(BadInput) as refused:
            c.estimate("layers=1", checkpoint=job["checkpoint_id"])
    assert by_checkpoint["target"]["layers"] == 4 and 0 < by_checkpoint["savings"]["fraction"] < 1
    assert by_preset["target"]["layers"] == 24
    assert refused.value.status == 422 and refused.value.errors[0]["field"] == "target"
    assert [p.name for p in tmp_path.iterdir()] == ["grown"]  # no partial folder left


@pytest.mark.slow
def test_a_retried_grow_reuses_the_job(service, service_checkpoint, grown, tmp_path):
    _, job, cache = grown
    events = []
    with Client(service["base"], service["key"], cache_dir=cache, on_event=events.append) as c:
        again = c.grow(service_checkpoint, TARGET, fit={**FIT, "lr": None}, wait=False)  # unset fields: same inputs
    assert again["id"] == job["id"]
    assert [(e["stage"], e.get("reused")) for e in events] == [  # packed to know its digest, but not sent
        ("packing", None), ("uploaded", True), ("submitted", True)]
    # Another machine: no cache, so the client asks the service for a checkpoint with the same
    # SHA-256 (GET /v1/checkpoints?sha256=), sends nothing, and gets the first job.
    events.clear()
    with Client(service["base"], service["key"], cache_dir=tmp_path, on_event=events.append) as c:
        elsewhere = c.grow(service_checkpoint, TARGET, fit=FIT, wait=False)
    uploaded = next(e for e in events if e["stage"] == "uploaded")
    assert uploaded["reused"] and uploaded["checkpoint"]["id"] == job["checkpoint_id"]
    assert not [e for e in events if e["stage"] == "uploading"]
    assert elsewhere["id"] == job["id"]
    # Different inputs are a different job.
    with Client(service["base"], service["key"], cache_dir=cache) as c:
        other = c.grow(service_checkpoint, TARGET, fit=FIT, strategy="stack", wait=False)
        assert other["id"] != job["id"]
        c.cancel(other)  # the worker is shared by the tests that follow


@pytest.mark.slow
def test_a_corrupted_download_is_detected_and_fetched_again(service, grown, tmp_path):
    _, job, _ = grown
    tamper, events = Tamper(times=1), []
    with Client(service["base"], service["key"], cache_dir=tmp_path / "c", on_event=events.append, retry=FAST,
                links=httpx.Client(transport=tamper)) as c:
        out = c.download(job, tmp_path / "out")
        result = c.result(job)
    retried = [e for e in events if e["stage"] == "retrying"]
    assert len(retried) == 1 and "sha256" in retried[0]["reason"]
    assert len(tamper.gets) == len(result["files"]) + 1 and tamper.gets[0] == tamper.gets[1]  # the same file again
    for f in result["files"]:
        assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]

    # A link that never gives the right bytes: an error, and nothing at the destination.
    with Client(service["base"], service["key"], cache_dir=tmp_path / "c", retry=FAST,
                links=httpx.Client(transport=Tamper(times=100))) as c, pytest.raises(IntegrityError, match="sha256"):
        c.download(job, tmp_path / "never")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _cli(service, *args, key=True) -> int:
    return remote([*args, "--server", service["base"], *(["--key", service["key"]] if key else [])])


@pytest.mark.slow
def test_cli_exit_0_grows_and_downloads(service, service_checkpoint, grown, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGO_CLIENT_CACHE", str(grown[2]))
    out = tmp_path / "out"
    assert _cli(service, "grow", str(service_checkpoint), "--target", TARGET, "--out", str(out), *CLI_FIT) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["n_layer"] == 4
    captured = capsys.readouterr()
    assert f"job {grown[1]['id']} succeeded" in captured.out  # the same job: same inputs
    log = captured.err.splitlines()
    assert all(line.startswith("[") and "s] " in line for line in log) and "\r" not in captured.err
    assert any("found: same inputs as an earlier run" in line for line in log)
    assert any("sizes and SHA-256 checked" in line for line in log)
    from ligo_core.cli import main as ligo  # registered as `ligo remote`

    assert ligo(["remote", "status", grown[1]["id"], "--server", service["base"], "--key", service["key"]]) == 0
    assert capsys.readouterr().out.strip() == f"{grown[1]['id']} succeeded"
    assert _cli(service, "download", grown[1]["id"], str(tmp_path / "again")) == 0


@pytest.mark.slow
def test_cli_exit_2_for_bad_input(service, service_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGO_CLIENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LIGO_API_KEY", raising=False)
    grow = ["grow", str(service_checkpoint), "--target", TARGET, "--out", str(tmp_path / "out"), *CLI_FIT]
    assert _cli(service, "grow", str(tmp_path / "nowhere"), "--target", TARGET, "--out", str(tmp_path / "o")) == 2
    assert "neither a file or directory here nor a checkpoint id" in capsys.readouterr().err
    assert _cli(service, *grow[:3], "layers=1", *grow[4:]) == 2  # smaller than the source: the service says so
    assert "target" in capsys.readouterr().err
    assert _cli(service, *grow, key=False) == 2
    assert "LIGO_API_KEY" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert _cli(service, *grow[:4], "--out", str(tmp_path / "full")) == 2
    assert _cli(service, "status", "0" * 32) == 2
    with pytest.raises(SystemExit) as exit_:
        _cli(service, "grow", str(service_checkpoint), "--out", str(tmp_path / "o"))  # no --target
    assert exit_.value.code == 2


@pytest.mark.slow
def test_cli_exit_3_when_the_job_fails(service, service_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGO_CLIENT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(service_checkpoint, model)
    (model / "NOTES.md").write_text("a checkpoint of this test's own")
    with Client(service["base"], service["key"], cache_dir=tmp_path / "cache") as c:
        ckpt = c.upload(model)
    stored = next((service["data"] / "objects" / "checkpoints" / ckpt["id"]).glob("*.tar"))
    stored.write_bytes(b"not a tar any more")  # accepted at upload, broken before the worker reads it
    assert _cli(service, "grow", ckpt["id"], "--target", TARGET, "--out", str(tmp_path / "out"), *CLI_FIT,
                "--json") == 3
    captured = capsys.readouterr()
    job_id = json.loads(captured.out)["job"]["id"]
    assert f"job {job_id} failed: checkpoint_error" in captured.err and not (tmp_path / "out").exists()
    assert _cli(service, "status", job_id) == 3
    assert _cli(service, "download", job_id, str(tmp_path / "out")) == 3


@pytest.mark.slow
def test_cli_exit_4_when_the_job_is_cancelled(service, service_checkpoint, grown, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGO_CLIENT_CACHE", str(grown[2]))
    long_fit = {**FIT, "steps": 100_000}
    with Client(service["base"], service["key"], cache_dir=grown[2]) as c:
        job = c.grow(service_checkpoint, TARGET, fit=long_fit, seed=4, wait=False)
    assert _cli(service, "cancel", job["id"]) == 0
    assert "cancel requested" in capsys.readouterr().out
    args = ["grow", str(service_checkpoint), "--target", TARGET, "--out", str(tmp_path / "out"), "--seed", "4",
            "--fit-steps", "100000", "--batch-size", "2", "--seq-len", "16"]
    assert _cli(service, *args) == 4  # the same inputs: the cancelled job
    assert f"job {job['id']} was cancelled" in capsys.readouterr().err
    assert _cli(service, "status", job["id"]) == 4
    assert _cli(service, "cancel", job["id"]) == 2  # already finished


@pytest.mark.slow
def test_cli_exit_5_on_timeout_and_the_job_goes_on(service, service_checkpoint, grown, tmp_path, monkeypatch,
                                                    capsys):
    monkeypatch.setenv("LIGO_CLIENT_CACHE", str(grown[2]))
    args = ["grow", str(service_checkpoint), "--target", TARGET, "--out", str(tmp_path / "out"), "--seed", "5",
            "--fit-steps", "100000", "--batch-size", "2", "--seq-len", "16", "--timeout", "1", "--json"]
    assert _cli(service, *args) == 5
    captured = capsys.readouterr()
    job = json.loads(captured.out)["job"]
    assert "still" in captured.err and f"ligo remote cancel {job['id']}" in captured.err
    with Client(service["base"], service["key"], cache_dir=grown[2]) as c:
        assert c.job(job)["state"] in ("queued", "running")
        c.cancel(job)
        wait_for(lambda: c.job(job)["state"] == "cancelled", 60, what="the cancellation")
    assert not (tmp_path / "out").exists()


# --- S3: presigned multipart upload, cut and resumed ------------------------------------------------

class Cut(Exception):
    """The process dies mid-upload."""


class CountingPuts(httpx.BaseTransport):
    def __init__(self, allow: int | None = None):
        self.inner, self.allow, self.puts = httpx.HTTPTransport(), allow, []

    def handle_request(self, request):
        if request.method == "PUT":
            if self.allow is not None and len(self.puts) >= self.allow:
                raise Cut()
            self.puts.append(request.url.params["partNumber"])
        return self.inner.handle_request(request)


@pytest.fixture(scope="module")
def s3_client(distributed, tmp_path_factory):
    cache = tmp_path_factory.mktemp("s3-cache")

    def make(transport=None, events=None):
        return Client("http://testserver", distributed["keys"]["alice"], http=distributed["client"], cache_dir=cache,
                      links=httpx.Client(transport=transport or httpx.HTTPTransport()), retry=FAST,
                      on_event=events.append if events is not None else None)

    return make


@pytest.mark.slow
def test_a_cut_multipart_upload_resumes_with_the_missing_parts(distributed, s3_client, service_checkpoint, tmp_path):
    model = tmp_path / "big"
    shutil.copytree(service_checkpoint, model)
    (model / "notes.bin").write_bytes(os.urandom(6 * 2**20))  # two 5 MiB parts
    archive, sha, size = pack_directory(model, tmp_path / "scratch")

    first = CountingPuts(allow=1)
    with s3_client(first) as c, pytest.raises(Cut):
        c.upload(model)
    assert first.puts == ["1"]
    assert distributed["s3"]["client"].list_multipart_uploads(Bucket="ligo-service").get("Uploads")

    again, events = CountingPuts(), []
    with s3_client(again, events) as c:
        ckpt = c.upload(model)
    assert again.puts == ["2"]  # only the part that had not been sent
    resumed = next(e for e in events if e["stage"] == "resuming")
    assert (resumed["parts_done"], resumed["parts"]) == (1, 2)
    assert (ckpt["sha256"], ckpt["size_bytes"], ckpt["family"]) == (sha, size, "gpt2")

    third = CountingPuts()
    with s3_client(third) as c:
        assert c.upload(model)["id"] == ckpt["id"] and third.puts == []  # the same bytes are not sent again


class CutAfterS3Answers(httpx.BaseTransport):
    """S3 takes the first part, then the process dies before it saves the ETag."""

    def __init__(self):
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        if request.method == "PUT":
            response.read()
            raise Cut()
        return response


@pytest.mark.slow
def test_a_resumed_upload_takes_the_parts_s3_holds_from_the_service(distributed, s3_client, service_checkpoint,
                                                                   tmp_path):
    """A part S3 received but whose ETag was never saved is not sent again: the client asks the
    service (GET .../uploads/{id}) for the parts S3 holds and for fresh URLs."""
    model = tmp_path / "big"
    shutil.copytree(service_checkpoint, model)
    (model / "notes.bin").write_bytes(os.urandom(6 * 2**20))  # two 5 MiB parts, not the other test's bytes
    with s3_client(CutAfterS3Answers()) as c, pytest.raises(Cut):
        c.upload(model)
    again, events = CountingPuts(), []
    with s3_client(again, events) as c:
        ckpt = c.upload(model)
    assert again.puts == ["2"]
    resumed = next(e for e in events if e["stage"] == "resuming")
    assert (resumed["parts_done"], resumed["parts"]) == (1, 2)
    assert ckpt["sha256"] == pack_directory(model, tmp_path / "scratch")[1]


@pytest.mark.slow
def test_grow_through_the_client_on_s3(s3_client, service_checkpoint, tmp_path):
    events = []
    with s3_client(events=events) as c:
        job = c.grow(service_checkpoint, TARGET, fit=FIT, timeout=180)
        out = c.download(job, tmp_path / "grown")
        result = c.result(job)
    assert c.presigned is True and any(e["stage"] == "uploading" for e in events)
    assert all("X-Amz-Signature=" in f["url"] for f in result["files"])
    assert json.loads((out / "config.json").read_text())["n_layer"] == 4
    for f in result["files"]:
        assert (out / f["path"]).stat().st_size == f["size_bytes"]
