"""Webhook secrets are sealed at rest (Fernet, app.sealing): a wider column, existing rows sealed.

The service passes its secret key (``app.migrate.upgrade(..., secret_key=...)``); run by hand
without it, the column is widened and the rows are sealed at the next API start instead.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from app.sealing import box, open_sealed, seal_plaintext

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.alter_column("webhook_secret", existing_type=sa.String(length=128), type_=sa.String(length=512),
                              existing_nullable=False)
    key = context.config.attributes.get("secret_key")
    if key:
        seal_plaintext(op.get_bind(), box(key))


def downgrade() -> None:
    key = context.config.attributes.get("secret_key")
    if key:  # back to plaintext, which the old column holds; without the key a sealed value would not fit
        open_sealed(op.get_bind(), box(key))
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.alter_column("webhook_secret", existing_type=sa.String(length=512), type_=sa.String(length=128),
                              existing_nullable=False)
