"""The transactional database layer (seed pattern 1): usable in any app's own database.

Database                      engine + sessions from Settings (asyncpg or aiosqlite)
transactional                 one function, one transaction; network failures rolled
                              back, counted and raised as DatabaseTransactionError
claim_message                 the inbox: an effect happens once per message id
DatabaseInbox                 its read side, for resilient_task(inbox=...)
aura.db.outbox                the transactional outbox: messages committed with a change
aura.db.statement             one statement, atomic on its own (PostgreSQL's fast path)
aura.db.tables                the inbox, outbox and DLQ tables in your own metadata
apply_migrations              an Alembic script directory run on a Database

The platform's catalog (tenants, products, imports, their writes and migrations) is
``aura.catalog``; nothing here knows of it.
"""

from aura.db.engine import Database, database_url
from aura.db.inbox import DatabaseInbox, already_processed, claim_message
from aura.db.migrate import apply_migrations, current_revision
from aura.db.models import OutboxMessage, ProcessedMessage
from aura.db.transactional import is_network_error, transactional
from aura.errors import DatabaseTransactionError, TransactionAbortedError

__all__ = [
    "Database",
    "DatabaseInbox",
    "DatabaseTransactionError",
    "OutboxMessage",
    "ProcessedMessage",
    "TransactionAbortedError",
    "already_processed",
    "apply_migrations",
    "claim_message",
    "current_revision",
    "database_url",
    "is_network_error",
    "transactional",
]
