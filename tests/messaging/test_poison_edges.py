"""PoisonPillDetector pinned where a user would notice a change (found by
scripts/mutation.py): every bound (chain, .orig hops, links, group depth, reason length),
SQLSTATE by class, which link of a chain counts, and the exact words of each reason."""

from __future__ import annotations

import pydantic
import pytest

from aura.errors import LLMTimeoutError
from aura.messaging._poison import DEFAULT_POISON_TYPES, PoisonPillDetector

detector = PoisonPillDetector()


class DriverError(Exception):
    def __init__(self, message: str = "refused", sqlstate: object = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def chain(length: int, innermost: BaseException) -> BaseException:
    """``innermost`` as link number ``length`` of a ``raise ... from`` chain."""
    current = innermost
    for _ in range(length - 1):
        outer = RuntimeError("wrapper")
        outer.__cause__ = current
        current = outer
    return current


def test_the_chain_is_read_ten_links_deep() -> None:
    assert detector.is_poison_pill(chain(10, ValueError("deep")))
    assert not detector.is_poison_pill(chain(11, ValueError("too deep")))


def test_the_cause_comes_before_the_context() -> None:
    outer = RuntimeError("wrapper")
    outer.__cause__ = LLMTimeoutError("slow")  # transient: retry it
    outer.__context__ = ValueError("bad")
    assert not detector.is_poison_pill(outer)
    only_context = RuntimeError("wrapper")
    only_context.__context__ = KeyError("k")
    assert detector.is_poison_pill(only_context)
    assert detector.get_poison_reason(only_context) == "missing required key 'k'"
    looped = RuntimeError("a")
    other = RuntimeError("b")
    looped.__cause__, other.__cause__ = other, looped
    assert not detector.is_poison_pill(looped)


def orig_chain(hops: int, sqlstate: str) -> BaseException:
    """An exception whose SQLSTATE sits ``hops`` objects along ``.orig``."""
    carrier: BaseException = DriverError("server said no", sqlstate)
    for _ in range(hops - 1):
        wrapper = RuntimeError("adapter")
        wrapper.orig = carrier  # type: ignore[attr-defined]
        carrier = wrapper
    return carrier


def test_the_sqlstate_is_read_four_hops_along_orig() -> None:
    found = orig_chain(4, "23502")
    assert detector.is_poison_pill(found)
    assert detector.get_poison_reason(found) == (
        "the database refused the data (SQLSTATE 23502): server said no"
    )
    assert not detector.is_poison_pill(orig_chain(5, "23502"))
    stopped = RuntimeError("adapter")
    stopped.orig = "not an exception"  # type: ignore[attr-defined]
    assert not detector.is_poison_pill(stopped)


@pytest.mark.parametrize(
    ("sqlstate", "poison"),
    [
        ("22ZZZ", True),  # class 22, a code not listed
        ("54ZZZ", True),
        ("22p02", True),  # read in upper case
        ("08ZZZ", False),
        ("40ZZZ", False),
        ("53ZZZ", False),
        ("57ZZZ", False),
        ("55P03", False),
        ("23505", False),
        ("23503", False),
        ("2350", None),  # not a SQLSTATE: the type decides
        ("235021", None),
        ("22-01", None),
        (22001, None),
        ("42P01", None),
    ],
)
def test_sqlstates_by_code_and_class(sqlstate: object, poison: bool | None) -> None:
    assert detector.is_poison_pill(DriverError("x", sqlstate)) is bool(poison)
    as_value_error = type("DriverValueError", (ValueError,), {"sqlstate": sqlstate})("x")
    assert detector.is_poison_pill(as_value_error) is (True if poison is None else poison)


def group_of(size: int) -> ExceptionGroup[ValueError]:
    return ExceptionGroup("many", [ValueError(str(n)) for n in range(size)])


def test_a_group_is_judged_within_256_links() -> None:
    assert detector.is_poison_pill(group_of(255))  # the group and 255 members: 256 links
    assert not detector.is_poison_pill(group_of(256))
    reason = detector.get_poison_reason(group_of(2))
    assert reason == "all 2 errors of a group are poison; first: invalid value: 0"
    assert not detector.is_poison_pill(ExceptionGroup("mixed", [ValueError("a"), OSError("b")]))


def nested(levels: int) -> BaseException:
    group: ExceptionGroup[Exception] = ExceptionGroup("leaf", [KeyError("k")])
    for _ in range(levels - 1):
        group = ExceptionGroup("level", [group])
    return group


def test_groups_are_judged_four_levels_deep() -> None:
    assert detector.is_poison_pill(nested(4))
    assert not detector.is_poison_pill(nested(5))


def test_the_list_of_types_can_grow_and_shrink() -> None:
    custom = PoisonPillDetector(())
    assert not custom.is_poison_pill(ValueError("x"))
    custom.add(ValueError, KeyError)
    assert custom.poison_types == (ValueError, KeyError)
    custom.add(KeyError)
    assert custom.poison_types == (ValueError, KeyError)
    custom.remove(ValueError)
    assert custom.poison_types == (KeyError,)
    assert not custom.is_poison_pill(ValueError("x"))
    assert custom.is_poison_pill(KeyError("x"))
    assert PoisonPillDetector().poison_types == DEFAULT_POISON_TYPES


def test_a_failure_that_is_not_poison_is_described_all_the_same() -> None:
    assert detector.get_poison_reason(OSError("disk on fire")) == "OSError: disk on fire"


def test_reasons_are_cut_at_exactly_300() -> None:
    reason = detector.get_poison_reason(ValueError("x" * 1000))
    assert reason == ("invalid value: " + "x" * 1000)[:300]
    assert len(reason) == 300


def test_the_reason_window_is_1200_characters_before_whitespace_is_folded() -> None:
    reason = detector.get_poison_reason(ValueError(" " * 1100 + "x" * 400))
    assert reason == "invalid value: " + "x" * 85
    late = DriverError("\n" * 1250 + "the message", "23502")
    assert detector.get_poison_reason(late) == ("the database refused the data (SQLSTATE 23502):")


@pytest.mark.parametrize(
    ("data", "position", "byte"),
    [(b"\xff", 0, "ff"), (b"hello\xfe", 5, "fe"), (b"ab\xc3(", 2, "c3")],
)
def test_decode_errors_name_the_byte_and_its_position(
    data: bytes, position: int, byte: str
) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = detector.get_poison_reason(exc)
    assert reason == f"invalid encoding: not utf-8 (byte 0x{byte} at position {position})"


def test_each_kind_of_reason() -> None:
    assert detector.get_poison_reason(KeyError()) == "missing required key '?'"
    assert detector.get_poison_reason(KeyError("a", "b")) == "missing required key 'a'"
    named = AttributeError("no such thing", name="price")
    assert detector.get_poison_reason(named) == "missing required attribute 'price'"
    anonymous = AttributeError("'NoneType' object has no attribute 'x'")
    assert detector.get_poison_reason(anonymous) == (
        "missing required attribute \"'NoneType' object has no attribute 'x'\""
    )
    assert detector.get_poison_reason(TypeError("t")) == "wrong type: t"
    assert detector.get_poison_reason(RecursionError("r")) == "nested too deep: r"


class Unprintable(ValueError):
    def __str__(self) -> str:
        raise RuntimeError("no")


class BadKey(KeyError):
    pass


class NoRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no")


def test_hostile_exceptions_get_a_reason() -> None:
    assert detector.get_poison_reason(Unprintable()) == "invalid value: <unprintable Unprintable>"
    assert detector.get_poison_reason(BadKey(NoRepr())) == (
        "missing required key <unprintable NoRepr>"
    )

    class Sneaky(LLMTimeoutError):
        @property
        def transient(self) -> bool:  # type: ignore[override]
            raise RuntimeError("no")

    sneaky = Sneaky("t")
    sneaky.__cause__ = ValueError("bad")
    assert detector.is_poison_pill(sneaky)  # a transient flag that raises says nothing

    class HostileOrig(Exception):
        @property
        def orig(self) -> object:
            raise RuntimeError("no")

    assert not detector.is_poison_pill(HostileOrig("x"))


class Order(pydantic.BaseModel):
    f0: int
    f1: int
    f2: int
    f3: int
    f4: int
    f5: int
    f6: int
    f7: int
    f8: int
    f9: int
    f10: int


class Whole(pydantic.BaseModel):
    a: int = 0

    @pydantic.model_validator(mode="after")
    def refuse(self) -> Whole:
        raise ValueError("the whole message is wrong")


def test_pydantic_reasons_name_ten_fields_at_most_and_the_message_as_a_whole() -> None:
    try:
        Order.model_validate({})
    except pydantic.ValidationError as exc:
        reason = detector.get_poison_reason(exc)
    assert reason == "invalid message: " + "; ".join(f"f{n}: Field required" for n in range(10))
    try:
        Whole.model_validate({})
    except pydantic.ValidationError as exc:
        whole = detector.get_poison_reason(exc)
    assert whole == "invalid message: message: Value error, the whole message is wrong"


def test_a_loop_in_a_chain_costs_its_links_once() -> None:
    """Within a group's budget of 256 links, thirty two-link loops fit; counted ten links
    each (the chain bound instead of the loop check) they would not."""
    members = []
    for n in range(30):
        first, second = ValueError(f"a{n}"), ValueError(f"b{n}")
        first.__cause__, second.__cause__ = second, first
        members.append(first)
    assert detector.is_poison_pill(ExceptionGroup("loops", members))


class HostileArgs(KeyError):
    @property
    def args(self) -> tuple[object, ...]:  # type: ignore[override]
        raise RuntimeError("no")


def test_a_reason_that_cannot_be_made_is_still_one() -> None:
    assert detector.get_poison_reason(HostileArgs()) == "HostileArgs: <unprintable>"


def test_code_run_without_a_module_name_is_not_a_transport() -> None:
    with pytest.raises(ValueError, match="from exec") as raised:
        exec("raise ValueError('from exec')", {})  # a frame whose globals have no __name__
    assert detector.is_poison_pill(raised.value)


def test_an_attribute_error_with_an_empty_name_uses_its_text() -> None:
    error = AttributeError("no attribute here", name="")
    assert detector.get_poison_reason(error) == "missing required attribute 'no attribute here'"


def test_invalid_input_is_named_as_such() -> None:
    from aura.errors import InvalidInputError

    assert detector.get_poison_reason(InvalidInputError("price must be > 0")) == (
        "invalid message: price must be > 0"
    )
