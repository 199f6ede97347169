"""0002 delivery claims: ``deliveries.claimed_by``, the sender (node identity) that put a delivery in
``sending``, so that several nodes can share one database (a node settles only its own in-flight
deliveries at restart, and another node's once their lease has ended).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table('deliveries') as batch:
        batch.add_column(sa.Column('claimed_by', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deliveries') as batch:
        batch.drop_column('claimed_by')
