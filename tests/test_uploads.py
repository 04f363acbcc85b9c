"""``POST /v1/checkpoints`` with a multipart form (curl -F, requests' files=, a browser's form):
streamed to storage with the raw body's cap, hash and checks, and nothing left behind on refusal.
(tests/test_release.py sends one with curl to an installed `ligo serve`.)"""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from app import uploads
from tests.service_fixtures import Api, make_keys
from tests.test_service_api import assert_problem, counts

CAP = 1_000_000


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    from app.main import create_app
    from app.settings import Settings

    data = tmp_path_factory.mktemp("uploads")
    settings = Settings(data_dir=data, max_upload_bytes=CAP, auth_cache_seconds=0, maintenance_interval_seconds=60)
    keys = make_keys(settings.resolved_database_url, "alice")
    app = create_app(settings)
    with TestClient(app) as client:
        yield {"client": client, "services": app.state.services, "api": Api(client, keys["alice"])}


def form(parts: list[tuple[str, str | None, bytes]], boundary: str = "----WebKitFormBoundaryq8X2k0aRr1zT9d4B",
         close: bool = True) -> tuple[bytes, dict]:
    """A multipart body as a browser writes it: (name, filename or None, content) per part."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: application/gzip\r\n" if filename else ""
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode() if close else b""
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_form(api: Api, body: bytes, headers: dict, **params):
    return api.post("/v1/checkpoints", content=body, headers=headers, params=params)


def test_a_form_upload_stores_the_same_checkpoint_as_a_raw_body(svc, checkpoint_tar):
    api = svc["api"]
    raw = api.checkpoint(checkpoint_tar)
    r = api.post("/v1/checkpoints", files={"file": ("tiny.tar.gz", checkpoint_tar, "application/gzip")})  # requests' way
    assert r.status_code == 201, r.text
    ckpt = r.json()
    assert ckpt["filename"] == "tiny.tar.gz"  # from the part
    assert (ckpt["sha256"], ckpt["size_bytes"]) == (hashlib.sha256(checkpoint_tar).hexdigest(), len(checkpoint_tar))
    assert {k: ckpt[k] for k in ("family", "config", "num_parameters", "has_tokenizer")} == \
        {k: raw[k] for k in ("family", "config", "num_parameters", "has_tokenizer")}
    stored = svc["services"].storage.path_of(f"checkpoints/{ckpt['id']}/tiny.tar.gz")
    assert stored.read_bytes() == checkpoint_tar


def test_other_fields_are_skipped_and_the_query_filename_wins(svc, checkpoint_tar):
    body, headers = form([("note", None, b"from the web form"), ("file", "upload.tgz", checkpoint_tar),
                          ("after", None, b"ignored too")])
    r = post_form(svc["api"], body, headers, filename="named.tar.gz")
    assert r.status_code == 201, r.text
    assert r.json()["filename"] == "named.tar.gz" and r.json()["size_bytes"] == len(checkpoint_tar)


def test_bad_forms_are_refused_naming_the_problem_and_leave_nothing(svc, checkpoint_tar):
    api = svc["api"]
    before = counts(svc)
    assert_problem(post_form(api, *form([("other", "x.tar.gz", b"not the file")])), 422, field="file",
                   match="no `file` part")
    assert_problem(post_form(api, *form([("file", "empty.tar.gz", b"")])), 422, field="file", match="empty")
    assert_problem(post_form(api, *form([("file", None, checkpoint_tar)])), 422, field="filename")
    assert_problem(post_form(api, *form([("file", "a.tar.gz", checkpoint_tar), ("file", "b.tar.gz", b"x")])),
                   422, field="file", match="more than one")
    cut = form([("file", "cut.tar.gz", checkpoint_tar)], close=False)
    assert_problem(post_form(api, *cut), 422, field="file", match="cut off")
    assert_problem(post_form(api, b"--x\r\n", {"Content-Type": "multipart/form-data"}), 422, field="Content-Type")
    assert_problem(post_form(api, *form([("file", "bad.tar.gz", b"not a gzip file" * 10)])), 422,
                   match="not a readable tar")
    assert counts(svc) == before


def test_the_size_cap_holds_while_a_form_streams(svc):
    api = svc["api"]
    before = counts(svc)
    body, headers = form([("file", "big.tar.gz", b"\1" * (CAP + 1))])

    def chunks():  # no Content-Length: the file part is counted as it arrives
        for i in range(0, len(body), 65_536):
            yield body[i:i + 65_536]

    assert_problem(api.post("/v1/checkpoints", content=chunks(), headers=headers), 413)
    padding, headers = form([("note", None, b"x" * (uploads.MAX_FORM_OVERHEAD + 1)), ("file", "a.tar.gz", b"x")])
    assert_problem(post_form(api, padding, headers), 413, match="besides its `file` part")
    assert counts(svc) == before


def test_the_api_document_offers_both_bodies(svc):
    body = svc["client"].get("/v1/openapi.json").json()["paths"]["/v1/checkpoints"]["post"]["requestBody"]
    assert set(body["content"]) == {"application/octet-stream", "multipart/form-data"}
    assert body["content"]["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
