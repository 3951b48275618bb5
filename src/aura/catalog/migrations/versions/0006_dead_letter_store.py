"""dead-letter store: the DLQ's letters and their replays, made for browsing

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The tables as aura.db._dead_letters defines them; a reader may have made them
    # already (it creates them where they are missing), so only what is missing is made.
    from aura.db._dead_letters import metadata

    metadata.create_all(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    op.drop_table("aura_dead_letter_replays")
    op.drop_table("aura_dead_letters")
