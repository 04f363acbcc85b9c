"""Alembic environment: the URL comes from LIGO_DATABASE_URL (or the caller's config)."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import text

from app.db import Base, make_engine

config = context.config
url = config.attributes.get("url") or os.environ.get("LIGO_DATABASE_URL") or config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                # Several API replicas may start at once: one migrates, the others wait.
                connection.execute(text("SELECT pg_advisory_lock(7419021)"))
                connection.commit()
            context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_unlock(7419021)"))
                connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
