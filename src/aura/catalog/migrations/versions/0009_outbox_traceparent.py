"""outbox rows keep the trace context of the request that staged them

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-12

With tracing on (``aura.tracing``), a request stores its W3C ``traceparent`` with each
outbox row it stages; whoever publishes the row later (the request itself, the relay, the
fair dispatcher) starts its publish span as that request's child and sends the context on
in the message's headers, so the worker's spans join the request's trace. NULL when
tracing was off; nothing reads it then.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("traceparent", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox", "traceparent")
