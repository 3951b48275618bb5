"""Pydantic models for incoming products and variants, and their one-line errors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from aura.errors import InvalidInputError

__all__ = [
    "MAX_RECORD_CHARS",
    "ProductIn",
    "VariantIn",
    "describe_validation_error",
    "parse_product",
    "parse_record",
    "parse_variant",
]

M = TypeVar("M", bound=BaseModel)
# The largest raw record (one catalog line) read at all: far above any valid product
# (100 variants x 50 attributes of 500 characters is ~2.5 M), and checked before parsing.
MAX_RECORD_CHARS = 4_000_000
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")

MAX_VARIANTS = 100
MAX_ATTRIBUTES = 50

Text200 = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Sku = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._/-]+$"
    ),
]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
AttributeValue = Annotated[str, StringConstraints(max_length=500)] | int | float | bool


class VariantIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sku: Sku
    price: Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=2, allow_inf_nan=False)]
    currency: Currency = "USD"
    attributes: Annotated[dict[Text200, AttributeValue], Field(max_length=MAX_ATTRIBUTES)] = {}


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    title: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
    description: Annotated[str, StringConstraints(max_length=5000)] | None = None
    brand: Text200 | None = None
    category: Text200 | None = None
    variants: Annotated[list[VariantIn], Field(min_length=1, max_length=MAX_VARIANTS)]

    @model_validator(mode="after")
    def _skus_unique(self) -> ProductIn:
        seen: set[str] = set()
        for variant in self.variants:
            if variant.sku in seen:
                raise ValueError(f"duplicate SKU {variant.sku!r} within the product")
            seen.add(variant.sku)
        return self


def _show_part(part: str | int) -> str:
    """A path element as it can be shown on one line (unknown keys come from the input)."""
    text = str(part)
    if not _PLAIN_KEY.fullmatch(text):
        text = repr(text[:40])
    return text


def describe_validation_error(exc: ValidationError) -> tuple[tuple[str, str], ...]:
    """(dotted field path, what is wrong) for each error pydantic found."""
    found: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False):
        field = ".".join(_show_part(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] == "extra_forbidden":
            message = "unknown field"
        # A model-level rule has no location; the only one (unique SKUs) is about variants.
        found.append((field or "variants", message))
    return tuple(found)


def _parse(model: type[M], data: Any, what: str, prefix: str = "") -> M:
    if not isinstance(data, Mapping):
        raise InvalidInputError(
            f"invalid {what}: expected a JSON object, got {type(data).__name__}",
            field=prefix.rstrip("."),
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = tuple(
            (prefix + field, problem) for field, problem in describe_validation_error(exc)
        )
        summary = "; ".join(f"{field}: {problem}" for field, problem in errors)
        raise InvalidInputError(
            f"invalid {what}: {summary}", field=errors[0][0], errors=errors
        ) from exc


def parse_product(data: Any) -> ProductIn:
    """Validate raw product data; raise ``InvalidInputError`` naming every bad field."""
    return _parse(ProductIn, data, "product")


def parse_variant(data: Any, index: int = 0) -> VariantIn:
    """Validate one raw variant (field paths read ``variants.{index}.…``)."""
    return _parse(VariantIn, data, "variant", prefix=f"variants.{index}.")


def parse_record(raw: str) -> ProductIn:
    """One raw catalog record (a JSON text) as a product; ``InvalidInputError`` if it is
    too large, nested too deep or not a valid product, ``json.JSONDecodeError`` if it is
    not JSON. Linear in its size."""
    if len(raw) > MAX_RECORD_CHARS:
        raise InvalidInputError(
            f"record is {len(raw)} characters, over the {MAX_RECORD_CHARS} limit", field=""
        )
    try:
        data = json.loads(raw)
    except RecursionError:  # a JSONDecodeError goes up as it is: the seed's poison pill
        raise InvalidInputError("record is nested too deep to parse", field="") from None
    return parse_product(data)
