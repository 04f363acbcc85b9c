"""The web form's router on a bare FastAPI app: pages, assets, and the /ui/meta tables."""

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import ligo_core
from app.web import router
from app.web.routes import STATIC_DIR


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    app.include_router(router)
    return TestClient(app)


def test_root_redirects_to_the_form(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307
    assert r.headers["location"] == "/ui/"


def test_pages_are_one_document_with_a_strict_policy(client):
    form = client.get("/ui/")
    job = client.get("/ui/jobs/abc123")
    assert form.status_code == job.status_code == 200
    assert form.text == job.text
    assert "{{ROOT}}" not in form.text
    csp = form.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    # Offline: no asset or script from another origin.
    assert not re.search(r"""(src|href)=["']https?://""", form.text)


def test_every_referenced_asset_is_served_and_nothing_else(client):
    page = client.get("/ui/").text
    assets = re.findall(r"""(?:src|href)="(/ui/static/[^"]+)\"""", page)
    assert sorted(assets) == ["/ui/static/app.css", "/ui/static/app.js"]
    for path in assets:
        r = client.get(path)
        assert r.status_code == 200 and r.content == (STATIC_DIR / path.rsplit("/", 1)[1]).read_bytes()
    assert client.get("/ui/static/app.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    for bad in ("/ui/static/index.html", "/ui/static/..%2Froutes.py", "/ui/static/nope.js"):
        assert client.get(bad).status_code == 404


def test_every_module_the_script_imports_is_served_as_javascript(client):
    """The page loads one module (app.js); the browser fetches what it imports, relative to it."""
    seen, todo = set(), ["app.js"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        r = client.get(f"/ui/static/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].startswith("text/javascript"), name
        imports = re.findall(r"""^import .* from "\./([\w-]+\.js)";$""", r.text, flags=re.M)
        assert not re.search(r"""from ["'](?!\./)""", r.text), f"{name}: only ./ imports"
        todo += imports
        assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", r.text), name
    # Every module on disk is one the page uses.
    assert seen == {p.name for p in STATIC_DIR.glob("*.js")}


def test_no_external_urls_in_assets():
    for name in ("app.js", "app.css", "index.html"):
        text = (STATIC_DIR / name).read_text()
        assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", text), name


def test_behind_a_path_prefix_the_page_points_at_the_prefix():
    app = FastAPI()
    app.include_router(router)
    page = TestClient(app, root_path="/grow").get("/ui/").text
    assert '<meta name="ligo-root" content="/grow">' in page
    assert 'src="/grow/ui/static/app.js"' in page


def test_meta_groups_every_preset_by_family(client):
    meta = client.get("/ui/meta").json()
    families = meta["families"]
    assert set(families) == {"gpt2", "bert", "roberta", "llama"}
    listed = {p["name"]: (fam, p) for fam, f in families.items() for p in f["presets"]}
    assert set(listed) == set(ligo_core.PRESETS)
    fam, medium = listed["gpt2-medium"]
    assert fam == "gpt2"
    assert (medium["layers"], medium["hidden"], medium["heads"], medium["ffn"]) == (24, 1024, 16, 4096)
    # Mistral and Qwen2 grow from Llama-family checkpoints; GQA presets keep their KV heads.
    assert listed["mistral-7b"][0] == "llama" and listed["mistral-7b"][1]["kv_heads"] == 8
    assert families["llama"]["fields"] == ["layers", "hidden", "heads", "kv_heads", "ffn"]
    assert families["gpt2"]["fields"] == ["layers", "hidden", "heads", "ffn"]
    assert families["gpt2"]["config_keys"]["hidden"] == "n_embd"
    assert families["bert"]["objective"] == "mlm"


def test_meta_explains_every_strategy_in_one_line(client):
    strategies = client.get("/ui/meta").json()["strategies"]
    assert [s["name"] for s in strategies] == list(ligo_core.STRATEGIES)
    for s in strategies:
        assert s["summary"] and "\n" not in s["summary"] and len(s["summary"]) < 160
    assert [s["name"] for s in strategies if s["fitted"]] == ["ligo"]


def test_pages_stay_out_of_the_api_document(client):
    app = client.app
    assert not any(p.startswith("/ui") for p in app.openapi()["paths"])


def test_the_form_starts_with_the_engines_fitting_defaults(client):
    from ligo_core.catalog import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN

    defaults = client.get("/ui/meta").json()["defaults"]
    assert (defaults["fit_batch"], defaults["seq_len"]) == (DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN) == (16, 128)


def test_the_spread_field_says_what_the_catalog_says(client):
    from ligo_core import catalog

    spread = client.get("/ui/meta").json()["spread"]
    assert (spread["low"], spread["high"]) == (catalog.SPREAD.low, catalog.SPREAD.high)
    assert spread["defaults"] == "0 for net2net and preserve, 2 for ligo and stack and interpolate"
