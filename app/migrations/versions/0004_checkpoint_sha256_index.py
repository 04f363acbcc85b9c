"""Checkpoints are found by their file's SHA-256 within a tenant (GET /v1/checkpoints?sha256=).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_checkpoints_tenant_sha256", "checkpoints", ["tenant", "sha256"])


def downgrade() -> None:
    op.drop_index("ix_checkpoints_tenant_sha256", table_name="checkpoints")
