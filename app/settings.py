"""Every setting of the service, read from ``LIGO_*`` environment variables (pydantic-settings).

The embedded default needs none of them: SQLite, a local object directory and a filesystem
broker, all under ``LIGO_DATA_DIR``. The table in docs/SERVICE.md lists them all.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GiB = 2**30


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIGO_", extra="ignore")

    # Where the embedded defaults live (database, objects, broker queue, secret, worker scratch).
    data_dir: Path = Path("ligo-data")
    database_url: str | None = None
    broker_url: str | None = None
    auto_migrate: bool = True

    # Object storage.
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    s3_register_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    s3_multipart_threshold_bytes: int = 64 * 2**20
    s3_part_size_bytes: int = 64 * 2**20

    # Links, keys and uploads.
    secret_key: str | None = None
    public_url: str | None = None
    url_ttl_seconds: int = 3600
    max_upload_bytes: int = 20 * GiB
    max_extract_bytes: int | None = None  # default: the largest upload the storage backend takes
    max_target_parameters: int = 100_000_000_000
    presigned_max_bytes: int = 1024 * GiB
    upload_ttl_seconds: int = 24 * 3600
    validate_timeout_seconds: float = 900.0
    validator_processes: int = 1
    auth_cache_seconds: float = 10.0

    # Jobs.
    gpu_queue: str = "gpu"
    job_time_limit_seconds: int = 6 * 3600
    lease_seconds: float = 60.0
    max_attempts: int = 3
    maintenance_interval_seconds: float = 5.0
    redispatch_after_seconds: float = 30.0
    worker_device: str | None = None
    # The memory a job may use (GiB), checked against its plan (ligo_core/memory_plan.py) at submission
    # and by the worker; unset, the worker takes its device's memory and the API does not check.
    worker_memory_gb: float | None = Field(None, gt=0)
    # Processes (one per GPU; gloo CPU processes with LIGO_WORKER_DEVICE=cpu) that run each job's
    # LiGO fit together, data-parallel (ligo_core/parallel.py). Celery still hands out whole jobs.
    worker_gpus: int = Field(1, ge=1)
    worker_tmp_dir: Path | None = None
    progress_interval_seconds: float = 0.5
    cancel_poll_seconds: float = 0.5

    # Webhooks.
    webhook_max_attempts: int = 8
    webhook_backoff_seconds: float = 5.0
    webhook_backoff_max_seconds: float = 3600.0
    webhook_timeout_seconds: float = 10.0
    webhook_allow_private: bool = False

    log_level: str = "INFO"

    @field_validator("s3_register_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value):
        if isinstance(value, str):
            return [b.strip() for b in value.split(",") if b.strip()]
        return value

    # --- derived values ---------------------------------------------------------------------

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'ligo.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "objects").resolve()

    @property
    def resolved_tmp_dir(self) -> Path:
        return (self.worker_tmp_dir or self.data_dir / "tmp").resolve()

    @property
    def resolved_max_extract_bytes(self) -> int:
        """What an archive may expand to: at most what an upload may be, unless set."""
        if self.max_extract_bytes:
            return self.max_extract_bytes
        return self.presigned_max_bytes if self.storage_backend == "s3" else self.max_upload_bytes

    def make_data_dir(self) -> Path:
        """The data directory, created private (0700): it holds the database, the keys and uploads."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.data_dir

    @property
    def visibility_timeout_seconds(self) -> int:
        """Redis redelivers an unacknowledged task after this long: above the longest job."""
        return self.job_time_limit_seconds + 3600

    def signing_key(self) -> bytes:
        """The HMAC key for download links: LIGO_SECRET_KEY, or one kept in the data directory."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret.key"
        if not path.exists():
            self.make_data_dir()
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(secrets.token_urlsafe(32))  # private from its first byte
            try:
                os.link(tmp, path)  # first writer wins; others read its key
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return path.read_text().strip().encode()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
