"""The job store's tables (SQLAlchemy 2) and engine set-up for SQLite and PostgreSQL.

The schema itself is created by the Alembic migrations in ``app/migrations``; these classes
must match them (``tests/test_service_units.py`` checks that they do).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

UTC = timezone.utc

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
JOB_STAGES = ("downloading", "loading", "evaluating", "fitting", "materialising", "saving", "uploading")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """32 hex digits, time-ordered (48-bit milliseconds, then 80 random bits), like UUIDv7."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on both SQLite (stored naive) and PostgreSQL (timestamptz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    webhook_secret: Mapped[str] = mapped_column(String(512))  # Fernet-sealed (app.sealing)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_tenant_sha256", "tenant", "sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    family: Mapped[str] = mapped_column(String(32))
    model_type: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict] = mapped_column(JSON)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    has_tokenizer: Mapped[bool] = mapped_column(Boolean)
    # "archive": one object (tar/zip); "directory": objects under object_key (a prefix).
    layout: Mapped[str] = mapped_column(String(16))
    # A key in our storage, or an s3:// URI of a registered object we do not own.
    object_key: Mapped[str] = mapped_column(String(1024))
    external: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Upload(Base):
    """A presigned multipart upload to S3 in progress."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    object_key: Mapped[str] = mapped_column(String(1024))
    s3_upload_id: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    part_size: Mapped[int] = mapped_column(BigInteger)
    config: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_state_id", "tenant", "state", "id"),
        Index("ix_jobs_state_lease", "state", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"))
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(16))
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_loss: Mapped[float | None] = mapped_column(Float)
    loss_history: Mapped[list] = mapped_column(JSON, default=list)
    target: Mapped[object] = mapped_column(JSON)  # the spec as given: a string or a dict
    target_config: Mapped[dict] = mapped_column(JSON)  # the resolved large config
    strategy: Mapped[str] = mapped_column(String(32))
    fit: Mapped[dict] = mapped_column(JSON)
    growth: Mapped[dict] = mapped_column(JSON, default=dict, server_default="{}")  # GrowthOptions; {} = defaults
    plan: Mapped[dict] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    manifest: Mapped[dict | None] = mapped_column(JSON)


class WebhookDelivery(Base):
    """The outbox: one row per terminal-state event, written in the same transaction."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_due", "delivered_at", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the webhook-id header, msg_...
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"))
    url: Mapped[str] = mapped_column(String(2048))
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# --- engines and sessions ---------------------------------------------------------------------

def normalise_url(url: str) -> str:
    """PostgreSQL URLs without a driver use psycopg 3 (the one the service installs)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _create_private(sqlite_url: str) -> None:
    """Create the SQLite file readable by its owner only (it holds tenants' webhook secrets and
    jobs); SQLite gives its -wal and -shm files the same mode."""
    path = make_url(sqlite_url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    p = Path(path)
    if not p.exists() and p.parent.is_dir():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        _create_private(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # Writers take the lock up front: a deferred transaction that read first cannot
            # wait for the lock later (SQLITE_BUSY_SNAPSHOT) and would fail instead.
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _json_loads(text: str):
    """orjson, fast; the json module for what orjson refuses (NaN, written by json.dumps)."""
    import json

    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


class RowReader:
    """Whole-row reads by primary key straight through the DB-API: the status-poll hot path.

    The ORM costs several times the query itself for a single-row read; this runs the same
    SELECT, precompiled for the dialect, and decodes the values as the column types would.
    """

    def __init__(self, engine: Engine, table):
        from sqlalchemy import bindparam, select

        compiled = select(table).where(table.c.id == bindparam("id")).compile(dialect=engine.dialect)
        self.engine, self.sql, self.positional = engine, compiled.string, compiled.positional
        self.names = [c.name for c in table.columns]
        sqlite = engine.dialect.name == "sqlite"
        self.decoders = [self._decoder(c.type, sqlite) for c in table.columns]
        self._local = threading.local()

    @staticmethod
    def _decoder(type_, sqlite: bool):
        if isinstance(type_, JSON):
            # SQLite hands back the JSON text; psycopg has already decoded it (a JSON string
            # arrives as a str, so there is no telling the two apart by value).
            return (lambda v: None if v is None else _json_loads(v)) if sqlite else None
        if isinstance(type_, UTCDateTime):
            def dt(v):
                if v is None:
                    return None
                if isinstance(v, str):
                    v = datetime.fromisoformat(v)
                return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
            return dt
        if isinstance(type_, Boolean):
            return lambda v: None if v is None else bool(v)
        return None

    def _fetch(self, conn, key: str):
        cur = conn.cursor()
        try:
            cur.execute(self.sql, (key,) if self.positional else {"id": key})
            return cur.fetchone()
        finally:
            cur.close()

    def get(self, key: str):
        if self.engine.dialect.name == "sqlite":
            # One autocommit connection per thread, kept out of the pool: a pool checkout
            # costs more than the read.
            conn = getattr(self._local, "conn", None)
            if conn is None:
                fairy = self.engine.raw_connection()
                fairy.detach()
                conn = self._local.conn = fairy.dbapi_connection
            row = self._fetch(conn, key)
        else:
            conn = self.engine.raw_connection()
            try:
                row = self._fetch(conn, key)
            finally:
                conn.close()  # back to the pool, which ends the read transaction
        if row is None:
            return None
        from types import SimpleNamespace

        return SimpleNamespace(**{n: (d(v) if d else v) for n, d, v in zip(self.names, self.decoders, row)})


class Database:
    """An engine with read and write session factories."""

    def __init__(self, url: str, secret_key: bytes | None = None):
        """``secret_key``: the service's (Settings.signing_key), to seal and open webhook secrets."""
        from app.sealing import box

        self.url = url
        self.fernet = box(secret_key) if secret_key else None
        self.engine = make_engine(url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE") if url.startswith("sqlite") else self.engine
        self._write = sessionmaker(writer, expire_on_commit=False)
        self.jobs = RowReader(self.engine, Job.__table__)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on error."""
        with self._write() as session, session.begin():
            yield session

    @property
    def is_local(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    async def call(self, fn, *args):
        """Run a short database function from async code.

        SQLite is a local file: a primary-key read takes microseconds, less than handing the
        call to a worker thread, so it runs inline. Network databases go to the thread pool.
        """
        if self.is_local:
            return fn(*args)
        import anyio

        return await anyio.to_thread.run_sync(fn, *args)

    def dispose(self) -> None:
        self.engine.dispose()
