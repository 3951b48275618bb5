"""The transactional database layer (seed pattern 1): usable in any app's own database.

Database                      engine + sessions from Settings (asyncpg or aiosqlite)
transactional                 one function, one transaction; network failures rolled
                              back, counted and raised as DatabaseTransactionError
claim_message                 the inbox: an effect happens once per message id
DatabaseInbox                 its read side, for resilient_task(inbox=...)
stage_messages, Claim, ...    the transactional outbox: messages committed with a change
execute_atomically            one statement, atomic on its own (PostgreSQL's fast path)
aura.db.tables                the inbox, outbox and DLQ tables in your own metadata
apply_migrations              an Alembic script directory run on a Database

The platform's catalog (tenants, products, imports, their writes and migrations) is
``aura.catalog``; nothing here knows of it.
"""

from aura.db._engine import Database, database_url, reach
from aura.db._inbox import DatabaseInbox, already_processed, claim_message
from aura.db._migrate import apply_migrations, current_revision
from aura.db._models import NAMING_CONVENTION, OutboxMessage, ProcessedMessage
from aura.db._outbox import (
    HELD,
    Claim,
    Staged,
    claim_due,
    claim_held,
    clear_outbox,
    delete_sent,
    extend_claim,
    held_backlog,
    release_claim,
    renew_claim,
    stage_messages,
    take_held,
)
from aura.db._statement import execute_atomically, fetch_row
from aura.db._transactional import (
    describe_error,
    is_network_error,
    is_outage,
    is_unavailable,
    transactional,
    while_out,
)
from aura.errors import DatabaseTransactionError, TransactionAbortedError

__all__ = [
    "HELD",
    "NAMING_CONVENTION",
    "Claim",
    "Database",
    "DatabaseInbox",
    "DatabaseTransactionError",
    "OutboxMessage",
    "ProcessedMessage",
    "Staged",
    "TransactionAbortedError",
    "already_processed",
    "apply_migrations",
    "claim_due",
    "claim_held",
    "claim_message",
    "clear_outbox",
    "current_revision",
    "database_url",
    "delete_sent",
    "describe_error",
    "execute_atomically",
    "extend_claim",
    "fetch_row",
    "held_backlog",
    "is_network_error",
    "is_outage",
    "is_unavailable",
    "reach",
    "release_claim",
    "renew_claim",
    "stage_messages",
    "take_held",
    "transactional",
    "while_out",
]
