"""enrichments by tenant: counting a tenant's enriched products reads an index, not the table

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10

``aura tenants`` counts each tenant's enrichments (``aura.catalog.workload``); without this
index that is a scan of every enrichment's row, description included. Building it holds
writes to ``enrichments`` for as long as the build takes (seconds per million rows): on a
large table, build it first by hand, ``CREATE INDEX CONCURRENTLY ix_enrichments_tenant_id
ON enrichments (tenant_id)``, and this migration finds it there.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_enrichments_tenant_id"),
        "enrichments",
        ["tenant_id"],
        unique=False,
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_enrichments_tenant_id"), table_name="enrichments")
