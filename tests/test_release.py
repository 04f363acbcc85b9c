"""Release quality: the wheel works like the checkout, and a first run says what it does.

The slow half builds the wheel from a copy of the sources, installs it (not editable) into a
fresh venv outside the checkout, and runs that venv's `ligo serve` from another directory: the
form, its assets, the API docs with theirs, an upload with `curl -F` and an estimate equal to
the checkout's. The venv borrows the test interpreter's dependencies through a .pth file added
after the install (nothing downloaded; the checkout itself is never on its path).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest

import ligo_core
from tests.service_fixtures import free_port, stop_serve, wait_for, wait_ready

ROOT = Path(__file__).resolve().parent.parent
# The packages the wheel holds, as pyproject.toml names them ("ligo_core*" -> ligo_core).
PACKAGES = tuple(re.findall(r'"(\w+)\*"', re.search(r"(?m)^include = \[(.*)\]$",
                                                   (ROOT / "pyproject.toml").read_text()).group(1)))
# An estimate whose answer depends on the shipped measurements (the benchmark's own setting).
ESTIMATE = {"source": "family=gpt2,layers=2,hidden=64,heads=4", "target": "layers=4,hidden=128"}


def tree_files() -> set[str]:
    """The files of the packages as the repository holds them (what the wheel must carry)."""
    try:
        listed = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but bytecode
        listed = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*") if p.is_file()]
    return {f for f in listed if "__pycache__" not in f and not f.endswith(".pyc")}


def child_env(**extra) -> dict:
    """The environment of a user's shell: no PYTHONPATH, no LIGO_* settings of the test run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("LIGO_")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


# --- the wheel, installed -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(src)], check=True, cwd=src, env=child_env())
    (built,) = dist.glob("ligo_grow-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
    python = home / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    f"ligo-grow[service] @ {wheel.as_uri()}"], check=True, env=child_env(), cwd=home)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies: this interpreter's, after the venv's own packages (so `app` is the wheel's).
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "zz_dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    return home


def test_the_wheel_carries_every_file_of_the_packages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert tree_files() - names == set()
    for needed in ("app/web/static/index.html", "app/web/static/app.js", "app/alembic.ini",
                   "app/migrations/env.py", "ligo_core/data/calibration.json", "ligo_core/corpus/wikipedia_en_leads.txt.gz"):
        assert needed in names


@pytest.fixture(scope="module")
def served(venv, tmp_path_factory):
    """The venv's `ligo serve` (no worker) started from a directory of its own, with one API key."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import app, json, ligo_core, sys; print(json.dumps([app.__file__, ligo_core.__file__, sys.path]))"],
                           capture_output=True, text=True, check=True, cwd=elsewhere, env=child_env()).stdout
    app_file, core_file, path = json.loads(where)
    assert app_file.startswith(str(venv)) and core_file.startswith(str(venv)), where
    assert str(ROOT) not in path, where
    ligo = str(venv / "bin" / "ligo")
    data = elsewhere / "data"
    key = subprocess.run([ligo, "keys", "create", "--tenant", "release", "--data-dir", str(data)], capture_output=True,
                         text=True, check=True, cwd=elsewhere, env=child_env()).stdout.strip()
    port = free_port()
    log = open(elsewhere / "serve.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen([ligo, "serve", "--port", str(port), "--data-dir", str(data), "--no-worker",
                             "--log-level", "warning"], cwd=elsewhere, env=child_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, elsewhere / "serve.log", timeout=120)
    with httpx.Client(base_url=base, timeout=60) as client:
        yield {"client": client, "key": key, "venv": venv, "cwd": elsewhere, "log": elsewhere / "serve.log"}
    stop_serve(proc)


@pytest.mark.slow
def test_the_installed_service_serves_the_form_and_its_assets(served):
    client = served["client"]
    page = client.get("/ui/")
    assert page.status_code == 200 and "ligo-root" in page.text
    assert {"/ui/static/app.css", "/ui/static/app.js"} <= set(re.findall(r"""(?:src|href)="(/ui/static/[^"]+)\"""",
                                                                            page.text))
    for asset in (ROOT / "app/web/static").iterdir():  # the page's and every script module it imports
        if asset.name != "index.html":
            r = client.get(f"/ui/static/{asset.name}")
            assert r.status_code == 200 and r.content == asset.read_bytes(), asset.name
    assert client.get("/ui/meta").json()["defaults"]["fit_batch"] == 16


@pytest.mark.slow
def test_the_installed_service_serves_its_api_docs_offline(served):
    assert_docs_offline(served["client"])


@pytest.mark.slow
def test_the_installed_service_estimates_like_the_checkout(served):
    from ligo_core.cost import estimate

    r = served["client"].post("/v1/estimate", json=ESTIMATE, headers={"Authorization": f"Bearer {served['key']}"})
    assert r.status_code == 200, r.text
    source = ligo_core.resolve_target(ESTIMATE["source"])
    here = json.loads(json.dumps(estimate(source, ligo_core.resolve_target(ESTIMATE["target"], source))))
    assert r.json() == here
    assert "measured" in here["savings"]["basis"]  # the shipped calibration is in play
    # The installed command line says the same.
    cli = subprocess.run([str(served["venv"] / "bin" / "ligo"), "estimate", "--source", ESTIMATE["source"],
                          "--target", ESTIMATE["target"], "--json"], capture_output=True, text=True, check=True,
                         cwd=served["cwd"], env=child_env())
    assert json.loads(cli.stdout) == here


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_uploads_a_checkpoint_as_a_form(served, checkpoint_tar, tmp_path):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(checkpoint_tar)
    out = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {served['key']}", "-F", f"file=@{archive}",
                          str(served["client"].base_url.join("/v1/checkpoints"))],
                         capture_output=True, text=True, check=True, timeout=120)
    ckpt = json.loads(out.stdout)
    assert (ckpt.get("filename"), ckpt.get("size_bytes"), ckpt.get("family")) == \
        ("model.tar.gz", len(checkpoint_tar), "gpt2"), out.stdout


# --- the same checks in-process, and the first run ------------------------------------------------

def assert_docs_offline(client) -> None:
    page = client.get("/v1/docs")
    assert page.status_code == 200
    assert not re.search(r"""(?:src|href)=["']https?://""", page.text), "the docs page loads from another host"
    assets = re.findall(r"""(?:src|href)=["'](/[^"']+)""", page.text)
    assert {a.rsplit("/", 1)[1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for path in assets:
        r = client.get(path)
        assert r.status_code == 200 and len(r.content) > 1000, path
    assert client.get("/v1/openapi.json").json()["openapi"].startswith("3.")


def test_the_api_docs_need_no_network(tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    assert_docs_offline(TestClient(create_app(Settings(data_dir=tmp_path), maintenance=False)))


def test_the_shipped_calibration_is_the_reference_runs_records(tmp_path):
    """The estimate reads package data, the same file the reference benchmark run wrote."""
    from ligo_core import calibration

    assert calibration.MEASURED_PATH == Path(ligo_core.__file__).parent / "data" / "calibration.json"
    shipped = json.loads(calibration.MEASURED_PATH.read_text())
    assert shipped == json.loads((ROOT / "docs/results/savings.json").read_text())
    # python -m bench.savings --report rewrites it with the run's tables, when told where (a copy here).
    from bench import report, savings

    shutil.copy(ROOT / "docs/results/savings_curves.json", tmp_path / "savings_curves.json")
    savings.main(["--report", str(tmp_path / "savings_curves.json"), "--calibration", str(tmp_path / "cal.json")])
    assert json.loads((tmp_path / "cal.json").read_text()) == json.loads((tmp_path / "savings.json").read_text())
    assert report.calibration_path(ROOT / "docs" / "results", None) == calibration.MEASURED_PATH
    assert report.calibration_path(tmp_path, None) is None  # probes elsewhere leave it alone


def test_serve_without_the_service_extra_says_what_to_install(monkeypatch, capsys, tmp_path):
    from ligo_core.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ligo: error:") and "uvicorn" in err and "pip install 'ligo-grow[service]'" in err
    assert not (tmp_path / "ligo.db").exists()
    # Without the service's CLI module at all, `serve` and `keys` are still listed and explain.
    monkeypatch.setitem(sys.modules, "app.cli", None)
    assert main(["keys", "create", "--tenant", "t"]) == 2
    assert "pip install 'ligo-grow[service]'" in capsys.readouterr().err


def _subparsers(parser):
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_option_has_help_with_an_example_and_the_help_is_plain_text():
    import argparse

    from ligo_core.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top and "examples:" in top
    commands = dict(_subparsers(parser))
    for group in ("keys", "remote"):
        commands.update({f"{group} {k}": p for k, p in _subparsers(commands.pop(group)).items()})
    for name, sub in commands.items():
        assert "example:" in (sub.epilog or ""), f"ligo {name} has no example"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"ligo {name} {action.dest} has no help"
            if action.option_strings and action.nargs != 0:  # an option with a value shows one
                assert "e.g." in action.help, f"ligo {name} {action.option_strings[0]} has no example"


def test_targets_keep_the_source_proportions_and_are_echoed(capsys):
    import transformers as T

    from ligo_core.cli import ProgressPrinter
    from ligo_core.matrices import target_summary
    from ligo_core.targets import describe_sizes, resolve_target, sizes_of

    source = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=256)
    target = resolve_target("layers=4,hidden=128,heads=8", source)
    assert sizes_of(target) == {"layers": 4, "hidden": 128, "heads": 8, "kv_heads": 8, "ffn": 512, "head_dim": 16}
    assert sizes_of(resolve_target("hidden=128", source))["heads"] == 8  # the head size kept
    llama = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=172)
    assert sizes_of(resolve_target("hidden=96", llama)) == \
        {"layers": 2, "hidden": 96, "heads": 6, "kv_heads": 3, "ffn": 258, "head_dim": 16}
    assert sizes_of(resolve_target("layers=4,ffn=300", source))["ffn"] == 300  # given fields win
    with pytest.raises(ligo_core.TargetError, match="head size 16: give heads="):
        resolve_target("hidden=72", source)

    from rich.console import Console

    printer = ProgressPrinter(Console(file=io.StringIO(), width=40))
    printer({"stage": "loading", "step": 0, "total": 1, "loss": None, "target": target_summary(target)})
    for step in range(1, 21):
        printer({"stage": "fitting", "step": step, "total": 20, "loss": 5.0 - step / 10})
    printer({"stage": "saving", "step": 0, "total": 1, "loss": None})
    lines = printer.console.file.getvalue().splitlines()
    # In a log: each line stamped with the time since the start; one per stage, the target, a
    # tenth of the fit per line; never a bar, never wrapped at the console's width.
    assert all(re.match(r"\[ *\d+\.\ds\] ", line) for line in lines)
    text = [line.split("] ", 1)[1] for line in lines]
    assert text == ["loading the checkpoint and the fitting text",
                    "target: " + describe_sizes(target_summary(target)),
                    "fitting the growth operator (20 steps)",
                    *[f"fitting {s}/20, loss {5.0 - s / 10:.4f}" for s in range(2, 21, 2)],
                    "saving the grown checkpoint"]
    assert "layers 4, hidden 128, heads 8, kv_heads 8, ffn 512, head_dim 16, parameters" in text[1]


def test_run_outputs_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("ligo-demo/small/config.json", "ligo-data/ligo.db"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_the_images_install_the_wheel_and_carry_no_source_tree():
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    dockerfiles = {s["build"]["dockerfile"] for s in compose["services"].values() if "build" in s}
    assert dockerfiles == {"docker/Dockerfile.api", "docker/Dockerfile.worker"}
    for name in dockerfiles:
        stages = re.split(r"(?m)^FROM ", (ROOT / name).read_text())[1:]
        build, runtime = stages[0], stages[-1]
        assert build.split()[2] == "wheel" and "pip wheel" in build, name  # FROM ... AS wheel
        assert "COPY --from=wheel /wheels" in runtime and "/wheels/ligo_grow-*.whl)[service]" in runtime, name
        copied = re.findall(r"(?m)^COPY (?!--from)(.+)$", runtime)
        assert copied == [], f"{name} copies sources into the image: {copied}"
    # The builder gets the packages and what building them needs, not the environments or data.
    ignored = {line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"}
    assert {".venv", ".git", "ligo-data", "tests"} <= ignored
    assert not ignored & {*PACKAGES, "pyproject.toml", "README.md", "*"}


@pytest.mark.slow
def test_a_normal_shutdown_logs_no_error(tmp_path):
    """SIGTERM to `ligo serve` stops the API, then the worker (cold shutdown), with no ERROR."""
    port, log_path = free_port(), tmp_path / "serve.log"
    env = child_env(PYTHONPATH=str(ROOT))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                                 str(tmp_path / "data")], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: b" ready." in log_path.read_bytes() or proc.poll() is not None, 120, 0.3,
                 "the worker to be ready")
        wait_for(lambda: b"Uvicorn running" in log_path.read_bytes() or proc.poll() is not None, 60, 0.3,
                 "the API to be up")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "Cold shutdown" in text and "Application shutdown complete" in text
    assert "ERROR" not in text and "Traceback" not in text, text[-3000:]
