"""Product input and message ids: open-ended input gets a named error, never a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aura.catalog import ProductIn, parse_product
from aura.errors import InvalidInputError
from aura.message_id import MESSAGE_ID_MAX_LENGTH, validate_message_id

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
product_like = st.fixed_dictionaries(
    {},
    optional={
        "title": json_values,
        "brand": json_values,
        "variants": st.lists(
            st.fixed_dictionaries(
                {}, optional={"sku": json_values, "price": json_values, "currency": json_values}
            ),
            max_size=3,
        ),
        "extra": json_values,
    },
)


@given(st.one_of(json_values, product_like))
def test_any_json_is_a_product_or_a_named_error(data: Any) -> None:
    try:
        product: ProductIn | InvalidInputError = parse_product(data)
    except InvalidInputError as exc:
        product = exc
    if isinstance(product, InvalidInputError):
        assert str(product).startswith("invalid product:")
        assert product.errors
        assert "\n" not in str(product)
    else:
        assert product.variants
        json.dumps(product.model_dump(mode="json"))  # what is accepted round-trips as JSON


def test_errors_list_every_bad_field() -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_product({"title": "", "variants": [{"sku": "A", "price": 0, "currency": "eur"}]})
    fields = [field for field, _ in caught.value.errors]
    assert fields == ["title", "variants.0.price", "variants.0.currency"]


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,254}", fullmatch=True))
def test_valid_message_ids_pass(message_id: str) -> None:
    assert validate_message_id(message_id) == message_id


@given(st.text(min_size=1, max_size=300))
def test_invalid_message_ids_are_refused_by_name(message_id: str) -> None:
    ok = (
        len(message_id) <= MESSAGE_ID_MAX_LENGTH
        and all(ch.isascii() and (ch.isalnum() or ch in ":._-") for ch in message_id)
        and message_id[0].isascii()
        and message_id[0].isalnum()
    )
    if ok:
        assert validate_message_id(message_id) == message_id
    else:
        with pytest.raises(InvalidInputError, match="message id"):
            validate_message_id(message_id)


@pytest.mark.parametrize(
    "bad", ["", "a" * 256, "retry_count:*", "id with space", "id\nnewline", 42]
)
def test_message_id_errors(bad: object) -> None:
    with pytest.raises(InvalidInputError) as caught:
        validate_message_id(bad)
    assert caught.value.field == "message_id"
