"""outbox rows held for fair dispatch: the dispatcher reads an index, not the table

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

The fair dispatcher (``aura.gateway.dispatch``) counts the held rows by queue and tenant
and claims each tenant's oldest, four times a second per gateway while an import waits:
without this partial index each look was a scan of every held row (20,000 for one large
import). Only held rows are in it, so it is empty when nothing waits.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HELD = sa.text("claimed_by = 'aura:held-for-dispatch'")


def upgrade() -> None:
    op.create_index(
        "ix_outbox_held",
        "outbox",
        ["queue", "tenant_id", "created_at", "message_id"],
        unique=False,
        postgresql_where=_HELD,
        sqlite_where=_HELD,
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_held", table_name="outbox")
