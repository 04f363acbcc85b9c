"""Run the job store's Alembic migrations from code (the service does this at start-up)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

HERE = Path(__file__).parent


def alembic_config(url: str) -> Config:
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head", secret_key: bytes | None = None) -> None:
    """``secret_key`` (the service's) lets migration 0003 seal existing webhook secrets."""
    cfg = alembic_config(url)
    cfg.attributes["secret_key"] = secret_key
    command.upgrade(cfg, revision)


def downgrade(url: str, revision: str = "base", secret_key: bytes | None = None) -> None:
    cfg = alembic_config(url)
    cfg.attributes["secret_key"] = secret_key
    command.downgrade(cfg, revision)
