"""The platform's catalog: what a product must look like, where it is stored, how the
worker writes it.

    schema     ``parse_product(data)`` validates raw data (a dict from JSON) into a
               ``ProductIn``, or raises ``InvalidInputError`` naming every bad field
               (``variants.0.price: expected a number greater than 0``)
    models     the tables: tenants, products, variants, enrichments, imports and their
               records (and the patterns' inbox, outbox and DLQ tables beside them)
    products   tenants, products and variants written all or nothing
               (``create_product_with_variants`` is the seed's ``@transactional`` example)
    imports    bulk imports and each record's fate
    pipeline   the worker's one-statement writes of a record and its enrichment
    migrate    the migrations that make all of it (``aura db upgrade``)
    workload   each tenant's work at each stage, counted in one snapshot (``aura tenants``)

Built on the patterns (``aura.db``); they know nothing of it.
"""

from aura.catalog.imports import (
    RECORD_STATUSES,
    add_import,
    add_import_records,
    create_import,
    create_import_with_messages,
    import_counts,
    mark_record,
)
from aura.catalog.migrate import MIGRATIONS, current_revision, upgrade
from aura.catalog.models import Base, Enrichment, Import, ImportRecord, Product, Tenant, Variant
from aura.catalog.products import (
    create_product,
    create_product_with_message,
    create_product_with_variants,
    create_tenant,
    create_variants,
)
from aura.catalog.schema import MAX_RECORD_CHARS, ProductIn, VariantIn, parse_product, parse_record

__all__ = [
    "MAX_RECORD_CHARS",
    "MIGRATIONS",
    "RECORD_STATUSES",
    "Base",
    "Enrichment",
    "Import",
    "ImportRecord",
    "Product",
    "ProductIn",
    "Tenant",
    "Variant",
    "VariantIn",
    "add_import",
    "add_import_records",
    "create_import",
    "create_import_with_messages",
    "create_product",
    "create_product_with_message",
    "create_product_with_variants",
    "create_tenant",
    "create_variants",
    "current_revision",
    "import_counts",
    "mark_record",
    "parse_product",
    "parse_record",
    "upgrade",
]
