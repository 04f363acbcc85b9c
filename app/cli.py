"""``ligo serve`` and ``ligo keys``: the service on one machine, and its API keys.

``ligo serve`` runs the API (uvicorn) and one Celery worker with no outside services: SQLite,
a local object directory and Celery's filesystem broker, all under ``--data-dir``. With
``LIGO_DATABASE_URL``, ``LIGO_BROKER_URL`` or ``LIGO_STORAGE_BACKEND`` set it uses those
instead. Also usable without the ``ligo`` command: ``python -m app.cli serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal

# subprocess runs our own Celery worker with fixed arguments, nothing a request names (bandit B404, B603).
import subprocess  # nosec B404
import sys
import threading
import time
from pathlib import Path


def _example(command: str) -> dict:
    return {"epilog": f"example:\n  {command}", "formatter_class": argparse.RawDescriptionHelpFormatter}


DATA_DIR_HELP = ("the service's data directory: give the same one to `ligo serve` and `ligo keys` "
                 "(default ./ligo-data, or LIGO_DATA_DIR; e.g. /srv/ligo-data)")


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the growth service (API and a worker) on this machine",
                                  **_example("ligo serve --data-dir /srv/ligo-data --host 0.0.0.0 --port 8000"))
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1, this machine only; e.g. 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; e.g. 9000)")
    serve.add_argument("--data-dir", help="database, objects and queue live here; " + DATA_DIR_HELP)
    serve.add_argument("--no-worker", action="store_true", help="run the API only (workers run elsewhere)")
    serve.add_argument("--workers", type=int, default=1, help="API processes (uvicorn workers; default 1; e.g. 4)")
    serve.add_argument("--log-level", default="info", help="debug, info, warning or error (default info; e.g. warning)")
    serve.set_defaults(func=cmd_serve)

    keys = subparsers.add_parser("keys", help="create, list and revoke API keys",
                                 **_example("ligo keys create --tenant my-team --data-dir /srv/ligo-data"))
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="print a new API key for a tenant (stored hashed)",
                             **_example("ligo keys create --tenant my-team --data-dir /srv/ligo-data"))
    create.add_argument("--tenant", required=True, help="who the key acts for: its jobs and checkpoints "
                                                        "(e.g. my-team)")
    create.add_argument("--name", help="a note to recognise the key by (e.g. 'CI pipeline')")
    create.add_argument("--data-dir", help=DATA_DIR_HELP)
    create.set_defaults(func=cmd_keys_create)
    lst = ksub.add_parser("list", help="list keys (prefixes only)", **_example("ligo keys list --tenant my-team"))
    lst.add_argument("--tenant", help="only this tenant's keys (e.g. my-team)")
    lst.add_argument("--data-dir", help=DATA_DIR_HELP)
    lst.set_defaults(func=cmd_keys_list)
    revoke = ksub.add_parser("revoke", help="revoke the key(s) with this prefix",
                             **_example("ligo keys revoke ligo_3f9a2c"))
    revoke.add_argument("prefix", help="the key's first characters, as `ligo keys list` shows them (e.g. ligo_3f9a2c)")
    revoke.add_argument("--data-dir", help=DATA_DIR_HELP)
    revoke.set_defaults(func=cmd_keys_revoke)
    secret = ksub.add_parser("webhook-secret", help="print the tenant's webhook signing secret (whsec_...)",
                             **_example("ligo keys webhook-secret --tenant my-team"))
    secret.add_argument("--tenant", required=True, help="whose secret (e.g. my-team)")
    secret.add_argument("--data-dir", help=DATA_DIR_HELP)
    secret.set_defaults(func=cmd_keys_secret)


# What `ligo serve` and `ligo keys` import: the service extra (pyproject.toml), by module name.
SERVICE_MODULES = ("uvicorn", "fastapi", "fastapi_offline", "python_multipart", "sqlalchemy", "alembic", "celery",
                   "pydantic_settings")


def require_service_extra(command: str) -> None:
    """A one-line error naming the install command, instead of a traceback about uvicorn."""
    missing = [m for m in SERVICE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        from ligo_core.cli import service_extra_missing

        raise service_extra_missing(command, ", ".join(missing))


def _settings(args):
    require_service_extra(args.command)
    if getattr(args, "data_dir", None):
        os.environ["LIGO_DATA_DIR"] = str(Path(args.data_dir).resolve())  # children read it too
    from app.settings import Settings

    settings = Settings()
    settings.make_data_dir()
    return settings


def _database(settings):
    from app.db import Database
    from app.migrate import upgrade

    key = settings.signing_key()
    upgrade(settings.resolved_database_url, secret_key=key)
    return Database(settings.resolved_database_url, key)


def cmd_keys_create(args) -> int:
    from app.auth import create_key

    try:
        key = create_key(_database(_settings(args)), args.tenant, args.name)
    except ValueError as exc:
        print(f"ligo: error: {exc}", file=sys.stderr)
        return 2
    print(key)
    return 0


def cmd_keys_list(args) -> int:
    from sqlalchemy import select

    from app.db import ApiKey

    db = _database(_settings(args))
    query = select(ApiKey).order_by(ApiKey.tenant, ApiKey.created_at)
    if args.tenant:
        query = query.where(ApiKey.tenant == args.tenant)
    with db.read() as s:
        for k in s.scalars(query):
            state = "revoked" if k.revoked_at else "active"
            print(f"{k.prefix}...  {k.tenant}  {state}  {k.created_at:%Y-%m-%d %H:%M}  {k.name or ''}".rstrip())
    return 0


def cmd_keys_revoke(args) -> int:
    from app.auth import revoke_key

    n = revoke_key(_database(_settings(args)), args.prefix)
    print(f"revoked {n} key(s)", file=sys.stderr)
    return 0 if n else 1


def cmd_keys_secret(args) -> int:
    from app.auth import webhook_secret

    print(webhook_secret(_database(_settings(args)), args.tenant))
    return 0


def _die_with_parent() -> None:
    """In the worker child (Linux): get SIGTERM when `ligo serve` dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class WorkerProcess:
    """A Celery worker child, restarted if it dies, stopped with the server."""

    def __init__(self, log_level: str, queue: str):
        self.cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queue,
                    "-c", "1", "--loglevel", log_level.upper(), "--hostname", f"ligo-serve-{os.getpid()}@%h",
                    "--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="ligo-worker-supervisor", daemon=True)

    def start(self) -> None:
        self.proc = self._spawn()
        self._thread.start()

    def _spawn(self) -> subprocess.Popen:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        return subprocess.Popen(self.cmd, start_new_session=True, env=env,  # nosec B603
                                preexec_fn=_die_with_parent)

    def _supervise(self) -> None:
        delay = 1.0
        while not self._stopping.wait(1.0):
            if self.proc.poll() is not None and not self._stopping.is_set():
                print(f"ligo serve: the worker exited ({self.proc.returncode}); restarting", file=sys.stderr)
                time.sleep(delay)
                delay = min(delay * 2, 60)
                self.proc = self._spawn()

    def stop(self, grace: float = 10.0) -> None:
        self._stopping.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        # Celery's cold shutdown (SIGQUIT to its main process): a running job would hold a warm
        # shutdown for hours, so it stops now; its message goes back to the queue and the job runs
        # again at the next start. (A SIGTERM to the whole group made the main process log an
        # ERROR about its pool child's signal on every normal shutdown.)
        os.kill(self.proc.pid, signal.SIGQUIT)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _has_keys(settings) -> bool:
    from sqlalchemy import func, select

    from app.db import ApiKey, Database

    db = Database(settings.resolved_database_url)
    try:
        with db.read() as s:
            return bool(s.scalar(select(func.count()).select_from(ApiKey)))
    finally:
        db.dispose()


def cmd_serve(args) -> int:
    settings = _settings(args)
    import uvicorn

    from app.main import create_app
    from app.migrate import upgrade

    upgrade(settings.resolved_database_url, secret_key=settings.signing_key())  # once, before any API process starts
    if not _has_keys(settings):
        print("ligo serve: no API keys yet; make one with `ligo keys create --tenant NAME"
              + (f" --data-dir {args.data_dir}`" if args.data_dir else "`"), file=sys.stderr)
    worker = None if args.no_worker else WorkerProcess(args.log_level, settings.gpu_queue)
    if worker is not None:
        worker.start()
    print(f"ligo serve: http://{args.host}:{args.port}/v1/docs  (data in {settings.data_dir.resolve()})",
          file=sys.stderr)
    # uvicorn re-raises SIGTERM once it has shut down; make that an exit that runs `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if args.workers > 1:  # each process builds its app from the same LIGO_* environment
            uvicorn.run("app.main:create_app", factory=True, workers=args.workers, host=args.host,
                        port=args.port, log_level=args.log_level)
        else:
            uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if worker is not None:
            worker.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    from ligo_core.errors import LigoError

    parser = argparse.ArgumentParser(prog="ligo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LigoError as exc:
        print(f"ligo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
