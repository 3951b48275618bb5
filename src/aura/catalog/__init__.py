"""The catalog's input: what a product and its variants must look like before any write.

``parse_product(data)`` validates raw data (a dict from JSON) and returns a ``ProductIn``,
or raises ``InvalidInputError`` whose message names every bad field
(``variants.0.price: expected a number greater than 0``) and whose ``errors`` lists them.
"""

from aura.catalog.schema import MAX_RECORD_CHARS, ProductIn, VariantIn, parse_product, parse_record

__all__ = ["MAX_RECORD_CHARS", "ProductIn", "VariantIn", "parse_product", "parse_record"]
