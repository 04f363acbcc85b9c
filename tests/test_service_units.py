"""Service pieces without a running server: job state machine, storage, links, webhook signatures."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from app import lifecycle
from app.auth import create_key, ensure_tenant
from app.db import Checkpoint, Database, Job, WebhookDelivery, utcnow
from app.migrate import alembic_config, upgrade
from app.storage import LocalStorage, StorageError, sign_token, verify_token
from app.webhooks import backoff, sign, verify
from tests.service_fixtures import ROOT


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    database = Database(url)
    ensure_tenant(database, "alice")
    with database.write() as s:
        s.add(Checkpoint(id="c1", tenant="alice", filename="m.tar", size_bytes=1, sha256="0" * 64, family="gpt2",
                         model_type="gpt2", config={}, num_parameters=1, has_tokenizer=True, layout="archive",
                         object_key="checkpoints/c1/m.tar"))
    yield database
    database.dispose()


def new_job(db, job_id="j1", callback=None) -> Job:
    job = Job(id=job_id, tenant="alice", checkpoint_id="c1", state="queued", target="gpt2-medium", target_config={},
              strategy="ligo", fit={"steps": 1}, plan={}, seed=0, loss_history=[], attempts=0,
              cancel_requested=False, progress_step=0, progress_total=0, callback_url=callback, created_at=utcnow())
    return lifecycle.create_job(db, job)[0]


def state(db, job_id="j1") -> Job:
    with db.read() as s:
        return s.get(Job, job_id)


def expire_lease(db, job_id="j1"):
    with db.write() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_migrations_match_the_models(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.db import Base

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert alembic_config(db.url).get_main_option("script_location").endswith("migrations")


def test_a_job_is_claimed_once_and_only_its_owner_can_finish_it(db):
    new_job(db)
    first = lifecycle.claim(db, "j1", "w1", 30)
    assert first is not None and first.state == "running" and first.attempts == 1
    assert lifecycle.claim(db, "j1", "w2", 30) is None  # a duplicate delivery does nothing
    assert lifecycle.report_progress(db, "j1", "w1", stage="fitting", step=2, total=5, loss=3.5, loss_history=[[2, 3.5]])
    assert not lifecycle.report_progress(db, "j1", "w2", stage="fitting", step=9, total=9, loss=0.0)
    assert not lifecycle.finish(db, "j1", "w2", "succeeded", manifest={})
    assert lifecycle.finish(db, "j1", "w1", "succeeded", manifest={"files": []})
    job = state(db)
    assert (job.state, job.lease_owner, job.manifest, job.loss_history) == ("succeeded", None, {"files": []}, [[2, 3.5]])
    assert not lifecycle.finish(db, "j1", "w1", "failed", error_type="x")  # terminal is final


def test_the_fast_row_reader_matches_the_orm(db):
    from app.schemas import job_json

    new_job(db, callback="https://example.com/hook")
    lifecycle.claim(db, "j1", "w1", 30)
    lifecycle.report_progress(db, "j1", "w1", stage="fitting", step=1, total=2, loss=None, loss_history=[[1, 2.5]])
    fast, orm = db.jobs.get("j1"), state(db)
    assert job_json(fast) == job_json(orm) and fast.lease_expires_at == orm.lease_expires_at
    assert fast.started_at.tzinfo is not None and fast.cancel_requested is False
    assert db.jobs.get("nope") is None


def test_an_expired_lease_requeues_then_fails_after_max_attempts(db):
    new_job(db)
    for attempt in (1, 2):
        assert lifecycle.claim(db, "j1", f"w{attempt}", 30).attempts == attempt
        assert lifecycle.requeue_expired(db, max_attempts=2) == []  # lease still valid
        expire_lease(db)
        requeued = lifecycle.requeue_expired(db, max_attempts=2)
        if attempt == 1:
            assert requeued == ["j1"] and state(db).state == "queued"
            assert not lifecycle.heartbeat(db, "j1", "w1", 30)  # the old owner has lost it
    job = state(db)
    assert (job.state, job.error_type, job.attempts) == ("failed", "worker_lost", 2)


def test_cancel_queued_is_immediate_and_running_is_cooperative(db):
    new_job(db, "q", callback="https://example.com/hook")
    job = lifecycle.request_cancel(db, "alice", "q")
    assert (job.state, job.cancel_requested) == ("cancelled", True)
    assert lifecycle.claim(db, "q", "w", 30) is None
    new_job(db, "r")
    lifecycle.claim(db, "r", "w", 30)
    job = lifecycle.request_cancel(db, "alice", "r")
    assert (job.state, job.cancel_requested) == ("running", True)
    assert lifecycle.cancel_requested(db, "r")
    assert lifecycle.request_cancel(db, "bob", "r").tenant == "alice"  # row unchanged for another tenant
    with db.read() as s:
        hooks = s.query(WebhookDelivery).all()
    assert [(h.job_id, h.event_type) for h in hooks] == [("q", "job.cancelled")]


def test_idempotency_key_returns_the_first_job(db):
    a = Job(id="a", tenant="alice", checkpoint_id="c1", target="t", target_config={}, strategy="ligo", fit={},
            plan={}, idempotency_key="k", loss_history=[], created_at=utcnow())
    b = Job(id="b", tenant="alice", checkpoint_id="c1", target="t", target_config={}, strategy="ligo", fit={},
            plan={}, idempotency_key="k", loss_history=[], created_at=utcnow())
    assert lifecycle.create_job(db, a) == (a, True)
    job, created = lifecycle.create_job(db, b)
    assert (job.id, created) == ("a", False)


def test_api_keys_are_stored_hashed(db):
    key = create_key(db, "alice")
    with db.read() as s:
        from app.db import ApiKey

        rows = s.query(ApiKey).all()
    assert key.startswith("ligo_") and len(key) > 40
    assert all(key not in (r.key_hash, r.prefix) for r in rows)
    with pytest.raises(ValueError):
        ensure_tenant(db, "bad tenant/name")


def test_local_storage_commits_or_leaves_nothing(tmp_path):
    storage = LocalStorage(tmp_path / "objects", b"secret")
    w = storage.open_writer("checkpoints/a/model.tar.gz")
    w.write(b"abc")
    w.finish()
    assert w.local_path.name.endswith("model.tar.gz") and w.local_path.read_bytes() == b"abc"
    w.abort()
    assert storage.list("") == []
    w = storage.open_writer("checkpoints/a/model.tar.gz")
    w.write(b"abc")
    w.commit()
    storage.put_bytes("jobs/j/output/config.json", b"{}")
    assert [(o.key, o.size) for o in storage.list("")] == [("checkpoints/a/model.tar.gz", 3),
                                                          ("jobs/j/output/config.json", 2)]
    assert storage.delete_prefix("jobs/j/") == 1
    assert not (tmp_path / "objects" / "jobs").exists()  # emptied folders go too
    for bad in ("../x", "/etc/passwd", "a//b", "a/../b"):
        with pytest.raises(StorageError):
            storage.path_of(bad)


def test_putting_a_file_closes_it_and_hashing_reads_all_of_it(tmp_path):
    import gc
    import hashlib
    import warnings

    from app.storage import file_sha256

    source = tmp_path / "model.safetensors"
    source.write_bytes(bytes(range(256)) * 40_000)  # ~10 MiB: more than one read
    storage = LocalStorage(tmp_path / "objects", b"secret")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage.put_file("jobs/j/output/model.safetensors", source)
        gc.collect()
    assert [w.message for w in caught if issubclass(w.category, ResourceWarning)] == []  # an unclosed file
    assert file_sha256(storage.path_of("jobs/j/output/model.safetensors")) == (
        10_240_000, hashlib.sha256(source.read_bytes()).hexdigest())


def test_signed_links_expire_and_resist_tampering():
    token = sign_token(b"k1", "jobs/j/output/model.safetensors", "model.safetensors", ttl=60, now=1000)
    assert verify_token(b"k1", token, now=1059) == ("jobs/j/output/model.safetensors", "model.safetensors")
    with pytest.raises(StorageError, match="expired"):
        verify_token(b"k1", token, now=1061)
    with pytest.raises(StorageError, match="invalid"):
        verify_token(b"k2", token, now=1000)
    body, mac = token.split(".")
    forged = sign_token(b"other", "checkpoints/x/secret.tar", "x", ttl=60, now=1000).split(".")[0]
    with pytest.raises(StorageError):
        verify_token(b"k1", f"{forged}.{mac}", now=1000)


def test_webhook_signature_matches_the_standard_webhooks_test_vector():
    # From the Standard Webhooks reference libraries' tests.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    msg_id, ts, body = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}'
    assert sign(secret, msg_id, ts, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    now = int(time.time())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(now), "webhook-signature": sign(secret, msg_id, now, body)}
    assert verify(secret, headers, body)
    assert not verify(secret, headers, body + " ")
    assert [backoff(n, 5, 3600) for n in (1, 2, 3, 12)] == [5, 10, 20, 3600]


def test_the_worker_parent_never_imports_torch():
    # ligo_core's catalog and errors (names, bounds) may load: they are torch-free; nothing else may.
    code = ("import sys, worker.celery_app, worker.tasks, worker.runner, app.lifecycle, app.storage; "
            "print(sorted(m for m in sys.modules if m in ('torch', 'transformers') or "
            "m.startswith('ligo_core.') and m not in ('ligo_core.catalog', 'ligo_core.errors', 'ligo_core.version')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_engine_errors_carry_the_field_they_are_about():
    import pickle

    import ligo_core
    from ligo_core.cost import EstimateError, estimate

    source = ligo_core.resolve_target("gpt2")
    cases = {"layers=6": "layers", "hidden=700,heads=12": "hidden", "family=bert,layers=24": "family",
             "depth=24,colour=3": "colour", "layers=24,hidden=lots": "hidden"}
    for spec, field in cases.items():
        with pytest.raises(ligo_core.TargetError) as caught:
            ligo_core.resolve_target(spec, source)
        assert caught.value.field == field, spec
    target = ligo_core.resolve_target("gpt2-medium", source)
    for option, value in {"fit_steps": -1, "fit_batch": 0, "seq_len": 10**6, "tokens": 0, "gpu": "abacus",
                          "utilisation": 2.0, "price_per_gpu_hour": -1.0, "strategy": "magic",
                          "convention": "mine"}.items():
        with pytest.raises(EstimateError) as caught:
            estimate(source, target, **{option: value})
        assert caught.value.field == option
    again = pickle.loads(pickle.dumps(caught.value))  # a worker's error crosses processes intact
    assert (type(again), str(again), again.field) == (EstimateError, str(caught.value), "convention")


def test_a_ligo_error_becomes_a_problem_for_the_field_it_names():
    from app.problems import Problem, fields_of_ligo_errors
    from ligo_core.errors import LigoError

    def problem(error, *mapping):
        with pytest.raises(Problem) as caught, fields_of_ligo_errors(*mapping):
            raise error
        return caught.value.errors, caught.value.status

    fields = {"gpu": "plan.gpu"}
    assert problem(LigoError("tokens: unknown GPU", field="gpu"), "plan", fields) == (
        [{"field": "plan.gpu", "message": "tokens: unknown GPU"}], 422)
    assert problem(LigoError("hidden is odd", field="hidden"), "plan", fields)[0][0]["field"] == "plan"
    assert problem(LigoError("no field"), "target")[0][0]["field"] == "target"
    with pytest.raises(KeyError), fields_of_ligo_errors("target"):  # not the engine's: not the client's fault
        raise KeyError("x")


def _imports(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` -> the project modules it imports (lazy imports inside functions too)."""
    modules = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    floors = {"app", "worker", "ligo_core", "ligo_client", "bench"}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from app import x`: x may be a module
                names = {f"{node.module}.{alias.name}" for alias in node.names}
                imported |= (names & modules.keys()) or {node.module}
        graph[name] = {m for m in imported if m in modules or m.split(".")[0] in floors - {package}} - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def visit(name, path):
        for dep in sorted(graph.get(name, ())):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done and dep in graph:
                visit(dep, path + [dep])
        done.add(name)

    for name in graph:
        visit(name, [name])
    return cycles


def _reaching(graph: dict[str, set[str]], floors: tuple[str, ...]) -> dict[str, list[str]]:
    return {name: sorted(m for m in imports if m.split(".")[0] in floors) for name, imports in graph.items()
            if any(m.split(".")[0] in floors for m in imports)}


def test_the_app_imports_no_worker_module_and_has_no_import_cycle():
    graph = _imports("app")
    assert {"app.lifecycle", "app.broker", "app.presigned"} <= graph.keys()
    assert _reaching(graph, ("worker",)) == {}
    assert _cycles(graph) == []


@pytest.mark.parametrize("package, above", [
    ("ligo_core", ("app", "worker", "bench")),  # the engine is a library: nothing above it
    ("ligo_client", ("ligo_core", "app", "worker", "bench")),  # httpx only
    ("worker", ("bench",)),
])
def test_each_floor_imports_only_below_it_and_has_no_cycle(package, above):
    graph = _imports(package)
    assert _reaching(graph, above) == {}
    assert _cycles(graph) == []


def test_celery_is_configured_for_long_gpu_jobs():
    from app.broker import GROW_TASK, make_celery
    from app.settings import Settings

    conf = make_celery(Settings(broker_url="redis://127.0.0.1:6379/0", job_time_limit_seconds=7200)).conf
    assert conf.task_routes[GROW_TASK] == {"queue": "gpu"}
    assert (conf.worker_prefetch_multiplier, conf.task_acks_late, conf.task_reject_on_worker_lost) == (1, True, True)
    assert (conf.worker_max_tasks_per_child, conf.worker_concurrency) == (1, 1)
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit > 7200


def test_long_fits_keep_an_evenly_thinned_loss_history():
    import threading

    from worker.runner import MAX_HISTORY, Progress

    class Quiet(Progress):
        def _write(self, *args):
            pass

    p = Quiet(None, "j", "owner", 0.5, threading.Event())
    for step in range(1, 5001):
        p({"stage": "fitting", "step": step, "total": 5000, "loss": 1.0 / step})
    steps = [s for s, _ in p.history]
    assert len(steps) <= MAX_HISTORY and steps[-1] == 5000
    assert len({b - a for a, b in zip(steps, steps[1:])}) == 1  # one stride throughout
    assert p.fitting == (5000, 5000, 1.0 / 5000)
