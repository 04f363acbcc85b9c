"""The web form end to end: headless Chromium driven by Playwright, against the real service.

The service runs in its embedded mode (``ligo serve``: API, worker, SQLite, local storage, a
broker with no server) in a subprocess on a free loopback port. The browser is Debian's
Chromium (``/usr/bin/chromium``, or ``LIGO_CHROMIUM``); Playwright's own browser download is
never used. Screenshots of every step go to ``test-artifacts/web/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

CHROMIUM = os.environ.get("LIGO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "web"
README_SHOT = REPO / "docs" / "img" / "web-form.png"
# Tall enough that no page needs scrolling: full-page screenshots then never disturb a click.
VIEWPORT = {"width": 1280, "height": 2200}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

TINY = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64)
# Deeper and wider, head size kept: what the custom-size fields are set to.
TARGET = {"layers": 4, "hidden": 48, "heads": 6, "ffn": 192}
TARGET_SPEC = "layers=4,hidden=48,heads=6,ffn=192"


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 with its tokenizer, as saved by save_pretrained and tarred; and a bad upload."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ligo_core.data import default_corpus_texts
    from ligo_core.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_tokenizer(default_corpus_texts()[:300], vocab_size=384)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **TINY,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    model_dir = root / "tiny-gpt2"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    good = root / "tiny-gpt2.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(model_dir, arcname="tiny-gpt2")
    bad = root / "notes.tar.gz"
    bad.write_bytes(b"these are my notes, not a model archive\n" * 20)
    return {"good": good, "bad": bad}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ligo(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """``ligo serve`` in embedded mode on a free port; yields (base URL, API key)."""
    data = tmp_path_factory.mktemp("ligo-data")
    port = _free_port()
    env = {**os.environ, "LIGO_DATA_DIR": str(data), "LIGO_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    key = _ligo("keys", "create", "--data-dir", str(data), "--tenant", "web-test", env=env).stdout.strip().split()[-1]
    log = open(data / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ligo serve exited with {proc.returncode}:\n{(data / 'serve.log').read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ligo serve not ready after 60 s:\n{(data / 'serve.log').read_text()}")
            time.sleep(0.3)
        yield base, key
    finally:
        _stop(proc)
        log.close()


def _children(pid: int) -> list[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    return [int(c) for t in tasks for c in (t / "children").read_text().split()]


def _stop(proc: subprocess.Popen) -> None:
    """Stop ``ligo serve`` and the worker it started (in its own process group).

    SIGINT, not SIGTERM: uvicorn re-raises the signal it caught once it has shut down, and
    under SIGTERM's default action the server's own clean-up (stopping its worker) never runs.
    """
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in workers:  # whatever the server could not stop
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The service checks an upload in a separate process (it loads torch): give steps time.
    expect.set_options(timeout=30_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True, base_url=service[0])
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def api(service, method: str, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
    base, key = service
    headers = {"Authorization": f"Bearer {key}", **(headers or {})}
    return httpx.request(method, base + path, headers=headers, timeout=60, **kwargs)


def sci(x: float) -> str:
    """A number as the page writes FLOPs: 2.39e8."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


# ---------------------------------------------------------------------------- steps

def enter_key(page, key: str) -> None:
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/ui/$"))
    page.get_by_label("API key").focus()
    page.keyboard.type(key)
    page.keyboard.press("Enter")  # the key form submits from the keyboard
    expect(page.locator("#api-key-status")).to_have_text(f"Key in use (ends …{key[-4:]})")
    expect(page.locator("#api-key-error")).to_be_empty()


def upload(page, archive: Path) -> None:
    page.get_by_label("Checkpoint archive").set_input_files(archive)
    page.get_by_role("button", name="Upload").click()


# ---------------------------------------------------------------------------- tests

def test_wrong_key_and_bad_upload_show_the_servers_message(page, service, archives):
    base, key = service
    page.goto("/ui/")
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#api-key-error")).to_contain_text("The service refused the key")
    expect(page.get_by_label("API key")).to_have_attribute("aria-invalid", "true")
    assert page.evaluate("sessionStorage.getItem('ligo.apiKey')") is None

    enter_key(page, key)
    upload(page, archives["bad"])
    error = page.locator("#upload-file-error")
    expect(error).not_to_be_empty()
    # The page shows the service's own words: ask it the same question directly.
    answer = api(service, "POST", "/v1/checkpoints?filename=notes.tar.gz", content=archives["bad"].read_bytes(),
                 headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 422
    # (The service names its temporary copy of the file, a different one each time.)
    same = re.compile(r"[0-9a-f]{32}-")
    assert same.sub("", answer.json()["detail"]) in same.sub("", error.inner_text())
    assert "not a readable tar archive" in error.inner_text()
    expect(page.locator("#upload-status")).to_have_text("Upload refused (HTTP 422).")
    expect(page.locator("#checkpoint-info")).to_be_hidden()
    expect(page.get_by_role("button", name="Grow checkpoint")).to_be_disabled()
    shot(page, "01-bad-upload")


def test_upload_estimate_grow_watch_and_download(page, service, archives):
    base, key = service
    enter_key(page, key)
    shot(page, "02-key-entered")

    # Upload: progress bar, then the detected family and sizes.
    upload(page, archives["good"])
    expect(page.locator("#upload-status")).to_have_text("Uploaded tiny-gpt2.tar.gz.")
    expect(page.locator("#upload-progress")).to_have_js_property("value", 100)
    facts = page.locator("#checkpoint-facts")
    expect(facts).to_contain_text("gpt2 (causal LM)")
    expect(facts).to_contain_text("layers 2, hidden 32, heads 4, ffn 128")
    ckpt_id = facts.locator("code").first.inner_text()
    shot(page, "03-uploaded")

    # Presets of the detected family only; custom sizes are offered too.
    options = page.locator("#target-preset option")
    values = options.evaluate_all("os => os.map(o => o.value)")
    assert values[:-1] == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"] and values[-1] == "__custom__"

    # A preset gives an estimate that matches the service's for the same settings.
    target = page.get_by_label("Target architecture")
    target.select_option("gpt2-medium")
    savings = page.get_by_test_id("savings")
    expect(savings).to_contain_text("less compute")
    expect(page.get_by_test_id("resolved-target")).to_have_text(
        "Target as resolved: 24 layers, hidden 1024, 16 heads, FFN 4096, head size 64.")

    # Custom sizes; a target that does not fit shows its error next to the hidden-size field.
    target.select_option("__custom__")
    page.get_by_label("Hidden size").fill("50")
    expect(page.locator("#custom-hidden-error")).to_contain_text("divisible")
    expect(page.get_by_label("Hidden size")).to_have_attribute("aria-invalid", "true")
    shot(page, "04-target-error")
    for field, value in TARGET.items():
        page.get_by_label({"layers": "Layers", "hidden": "Hidden size", "heads": "Attention heads",
                           "ffn": "FFN size"}[field], exact=True).fill(str(value))
    expect(page.locator("#custom-hidden-error")).to_be_empty()
    page.get_by_label("Fitting steps").fill("3")
    page.get_by_label("Batch size").fill("2")
    page.get_by_label("Sequence length").fill("32")
    page.get_by_label("Training tokens").fill("1000000000")

    # The preview matches the service's own estimate for the same request.
    body = {"checkpoint_id": ckpt_id, "target": TARGET_SPEC, "strategy": "ligo", "fit_steps": 3, "fit_batch": 2, "seq_len": 32,
            "tokens": 1_000_000_000, "gpu": "H100", "utilisation": 0.4}
    expected = api(service, "POST", "/v1/estimate", json=body)
    assert expected.status_code == 200, expected.text
    est = expected.json()
    pct = f"{est['savings']['fraction'] * 100:.1f}% less compute"
    expect(savings).to_have_text(pct)
    fit_row = page.locator("#estimate tr[data-phase=fit] td").nth(1)
    expect(fit_row).to_have_text(sci(est["fit"]["flops"]))

    # Strategy by keyboard: arrow keys move between the radio buttons; the estimate follows.
    page.get_by_role("radio", name=re.compile(r"^ligo")).focus()
    page.keyboard.press("ArrowDown")
    expect(page.get_by_role("radio", name=re.compile(r"^stack"))).to_be_checked()
    expect(fit_row).not_to_have_text(sci(est["fit"]["flops"]))
    page.keyboard.press("ArrowUp")
    expect(page.get_by_role("radio", name=re.compile(r"^ligo"))).to_be_checked()
    expect(fit_row).to_have_text(sci(est["fit"]["flops"]))
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter(el => el.type !== 'hidden' && !el.labels.length && !el.getAttribute('aria-label'))
        .map(el => el.id || el.name)""")
    assert unlabelled == []
    shot(page, "05-estimate")

    # A job the service refuses: its message goes under the field it names (fit.seq_len), and
    # stays there although leaving the field for the button asks for a new preview.
    page.get_by_label("Sequence length").fill("4")
    page.get_by_role("button", name="Grow checkpoint").click()
    expect(page.locator("#fit-seq-error")).to_contain_text("greater than or equal to 8")
    expect(page.get_by_label("Sequence length")).to_have_attribute("aria-invalid", "true")
    page.wait_for_timeout(600)  # past the preview's debounce
    expect(page.locator("#fit-seq-error")).to_contain_text("greater than or equal to 8")
    expect(page.locator("#job-created")).to_be_empty()
    page.get_by_label("Sequence length").fill("32")
    expect(page.locator("#fit-seq-error")).to_be_empty()
    expect(fit_row).to_have_text(sci(est["fit"]["flops"]))
    spread = page.get_by_label("Move copied units apart (spread)")
    spread.fill("9")
    page.get_by_role("button", name="Grow checkpoint").click()
    expect(page.locator("#growth-spread-error")).to_contain_text("less than or equal to 4")
    expect(page.locator("#job-created")).to_be_empty()
    spread.fill("0")  # exact growth

    # Submit; the job shows up in the list and runs to success.
    page.get_by_role("button", name="Grow checkpoint").click()
    created = page.locator("#job-created a")
    expect(created).to_be_visible()
    job_id = created.inner_text()
    row = page.locator(f'#jobs-body tr[data-job-id="{job_id}"]')
    expect(row).to_be_visible()
    expect(row.locator("[data-state]")).to_have_attribute("data-state", "succeeded", timeout=90_000)
    expect(row).to_contain_text("3/3")
    listing = shot(page, "06-job-list")
    if os.environ.get("LIGO_UPDATE_SCREENSHOTS") or not README_SHOT.exists():
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(listing, README_SHOT)

    job = api(service, "GET", f"/v1/jobs/{job_id}").json()
    assert job["checkpoint_id"] == ckpt_id and job["state"] == "succeeded" and job["growth"] == {"spread": 0.0}

    # The job page: chart of every logged loss, downloads, estimate and report.
    created.click()
    expect(page).to_have_url(re.compile(rf"/ui/jobs/{job_id}$"))
    expect(page.locator("#job-facts [data-state]")).to_have_attribute("data-state", "succeeded")
    expect(page.locator("#job-facts")).to_contain_text("4 layers, hidden 48, 6 heads, FFN 192, head size 8")
    chart = page.locator("#loss-chart svg")
    expect(chart).to_have_attribute("data-points", str(len(job["loss_history"])))
    assert len(job["loss_history"]) >= 1
    expect(page.locator("#job-cancel")).to_be_hidden()
    expect(page.locator("#job-result")).to_be_visible()
    result = api(service, "GET", f"/v1/jobs/{job_id}/result").json()
    links = page.locator("#job-files a")
    assert sorted(links.all_inner_texts()) == sorted(f["path"] for f in result["files"])
    expect(page.locator("#job-estimate [data-testid=savings]")).to_have_text(
        f"{result['estimate']['savings']['fraction'] * 100:.1f}% less compute")
    expect(page.locator("#job-report")).to_contain_text("ligo")
    shot(page, "07-job-succeeded")

    # Follow a download link: the grown model's config has the target's sizes.
    with page.expect_download() as download:
        page.get_by_role("link", name="config.json", exact=True).click()
    config = json.loads(Path(download.value.path()).read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["n_inner"]) == (4, 48, 6, 192)


def test_cancel_a_running_job(page, service, archives):
    base, key = service
    # The checkpoint comes from the API this time; the page picks it up from the session.
    answer = api(service, "POST", "/v1/checkpoints?filename=tiny-gpt2.tar.gz", content=archives["good"].read_bytes(),
                 headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 201, answer.text
    page.goto("/ui/")
    page.evaluate("c => sessionStorage.setItem('ligo.checkpoint', JSON.stringify(c))", answer.json())
    enter_key(page, key)
    expect(page.locator("#checkpoint-facts")).to_contain_text(answer.json()["id"])
    page.get_by_label("Target architecture").select_option("__custom__")
    page.get_by_label("Layers", exact=True).fill("4")
    page.get_by_label("Fitting steps").fill("100000")
    page.get_by_label("Batch size").fill("2")
    page.get_by_label("Sequence length").fill("32")
    expect(page.get_by_test_id("savings")).to_be_visible()
    page.get_by_role("button", name="Grow checkpoint").click()
    created = page.locator("#job-created a")
    expect(created).to_be_visible()
    job_id = created.inner_text()
    created.click()

    # Wait until it is fitting, so the cancel hits a running job.
    state = page.locator("#job-facts [data-state]")
    expect(state).to_have_attribute("data-state", "running", timeout=60_000)
    expect(page.locator("#job-progress-label")).to_contain_text(re.compile(r"fitting \d+ of 100000"), timeout=60_000)
    expect(page.locator("#loss-chart svg")).to_be_visible()
    shot(page, "08-job-running")
    cancel = page.get_by_role("button", name="Cancel job")
    cancel.focus()
    page.keyboard.press("Enter")
    # "Cancel requested" while the job finishes its step; a job that stops before the page hears
    # back goes straight to "cancelled" (seen in CI: the step ended within the request).
    expect(page.locator("#job-cancel-status")).to_contain_text(re.compile("Cancel requested|The job was cancelled"))
    expect(state).to_have_attribute("data-state", "cancelled", timeout=60_000)
    expect(cancel).to_be_hidden()
    expect(page.locator("#job-cancel-status")).to_have_text("The job was cancelled.")
    expect(page.locator("#job-result")).to_be_hidden()
    shot(page, "09-job-cancelled")

    job = api(service, "GET", f"/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled"
    assert job["progress"]["step"] < 100000
