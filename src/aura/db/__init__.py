"""The transactional database layer (seed pattern 1) and the platform's tables.

Database                      engine + sessions from Settings (asyncpg or aiosqlite)
transactional                 one function, one transaction; network failures rolled
                              back, counted and raised as DatabaseTransactionError
claim_message                 the inbox: an effect happens once per message id
DatabaseInbox                 its read side, for resilient_task(inbox=...)
create_product_with_variants  the seed's example, on create_product/create_variants
upgrade                       Alembic migrations (``aura db upgrade``)
"""

from aura.db.engine import Database, database_url
from aura.db.imports import (
    add_import,
    add_import_records,
    create_import,
    import_counts,
    mark_record,
)
from aura.db.inbox import DatabaseInbox, already_processed, claim_message
from aura.db.migrate import current_revision, upgrade
from aura.db.models import (
    Base,
    Enrichment,
    Import,
    ImportRecord,
    OutboxMessage,
    ProcessedMessage,
    Product,
    Tenant,
    Variant,
)
from aura.db.products import (
    create_product,
    create_product_with_message,
    create_product_with_variants,
    create_tenant,
    create_variants,
)
from aura.db.transactional import is_network_error, transactional
from aura.errors import DatabaseTransactionError, TransactionAbortedError

__all__ = [
    "Base",
    "Database",
    "DatabaseInbox",
    "DatabaseTransactionError",
    "Enrichment",
    "Import",
    "ImportRecord",
    "OutboxMessage",
    "ProcessedMessage",
    "Product",
    "Tenant",
    "TransactionAbortedError",
    "Variant",
    "add_import",
    "add_import_records",
    "already_processed",
    "claim_message",
    "create_import",
    "create_product",
    "create_product_with_message",
    "create_product_with_variants",
    "create_tenant",
    "create_variants",
    "current_revision",
    "database_url",
    "import_counts",
    "is_network_error",
    "mark_record",
    "transactional",
    "upgrade",
]
