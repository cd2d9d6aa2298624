"""Unit tests of the message codec (`amqtask._codec`): encoding, decoding and dead letters."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ValidationError

from amqtask import Contract, DecodeError, contract
from amqtask._codec import (
    CONTENT_TYPE,
    ERROR,
    ERROR_TYPE,
    FAILED_AT,
    ORIGIN_QUEUE,
    REASON,
    TASK,
    TRACEBACK,
    VERSION,
    Reasons,
    dead_letter,
    decode_task,
    encode_task,
    header_text,
    new_message_id,
    trimmed_traceback,
)


class Resize(BaseModel):
    url: str
    width: int


RESIZE = contract("images.resize", Resize)
RESIZE_V2 = contract("images.resize", Resize, version=2)
CONTRACTS: dict[tuple[str, int], Contract[Any, Any]] = {
    RESIZE.key: RESIZE,
    RESIZE_V2.key: RESIZE_V2,
}


@dataclass
class FakeDelivery:
    """The fields of an incoming message the codec reads, as aio-pika's message has them."""

    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = "m-1"
    content_type: str | None = CONTENT_TYPE
    content_encoding: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    redelivered: bool | None = False


def task_delivery(
    body: bytes = b'{"url":"u","width":3}', headers: Mapping[str, Any] | None = None
) -> FakeDelivery:
    """A delivery of an `images.resize` v1 task; `headers` add to or replace its headers."""
    return FakeDelivery(body=body, headers={TASK: "images.resize", VERSION: 1, **(headers or {})})


def decode_error(delivery: FakeDelivery) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode_task(delivery, CONTRACTS)
    return caught.value


def raised(exc: BaseException) -> BaseException:
    """`exc` with a traceback, as a handler's failure has one."""
    try:
        raise exc
    except BaseException as caught:
        return caught


# --- encode_task ----------------------------------------------------------------------------


def test_encode_task_serializes_a_dict_payload_as_json() -> None:
    outgoing = encode_task(RESIZE, {"url": "u", "width": 3})

    assert orjson.loads(outgoing.body) == {"url": "u", "width": 3}
    assert outgoing.content_type == "application/json"


def test_encode_task_serializes_a_model_payload_as_json() -> None:
    outgoing = encode_task(RESIZE, Resize(url="u", width=3))

    assert outgoing.body == b'{"url":"u","width":3}'


def test_encode_task_coerces_the_payload_through_the_input_model() -> None:
    outgoing = encode_task(RESIZE, {"url": "u", "width": "3"})

    assert orjson.loads(outgoing.body) == {"url": "u", "width": 3}


@pytest.mark.parametrize(
    "payload",
    [{"url": "u"}, {"url": "u", "width": "wide"}, {}],
    ids=["missing-field", "wrong-type", "empty"],
)
def test_encode_task_raises_pydantic_validation_error_for_a_bad_payload(payload: Any) -> None:
    with pytest.raises(ValidationError):
        encode_task(RESIZE, payload)


def test_encode_task_headers_name_the_task_and_its_version() -> None:
    assert encode_task(RESIZE_V2, {"url": "u", "width": 3}).headers == {
        "amqtask-task": "images.resize",
        "amqtask-version": 2,
    }


def test_encode_task_gives_each_message_a_new_id() -> None:
    ids = {encode_task(RESIZE, {"url": "u", "width": 3}).message_id for _ in range(50)}

    assert len(ids) == 50
    assert all(message_id for message_id in ids)


def test_encode_task_keeps_a_message_id_given_by_the_caller() -> None:
    assert encode_task(RESIZE, {"url": "u", "width": 3}, message_id="fixed").message_id == "fixed"


def test_an_encoded_task_decodes_back_to_its_contract_and_payload() -> None:
    outgoing = encode_task(RESIZE_V2, Resize(url="u", width=3))
    delivery = FakeDelivery(body=outgoing.body, headers=outgoing.headers)

    assert decode_task(delivery, CONTRACTS) == (RESIZE_V2, Resize(url="u", width=3))


# --- decode_task ----------------------------------------------------------------------------


def test_decode_task_finds_the_contract_by_name_and_version() -> None:
    found, payload = decode_task(task_delivery(headers={VERSION: 2}), CONTRACTS)

    assert found is RESIZE_V2
    assert payload == Resize(url="u", width=3)


def test_decode_task_reads_header_values_sent_as_bytes() -> None:
    delivery = FakeDelivery(
        body=b'{"url":"u","width":3}', headers={TASK: b"images.resize", VERSION: b"2"}
    )

    found, _ = decode_task(delivery, CONTRACTS)

    assert found is RESIZE_V2


def test_decode_task_takes_a_missing_version_header_as_version_one() -> None:
    delivery = FakeDelivery(body=b'{"url":"u","width":3}', headers={TASK: "images.resize"})

    assert decode_task(delivery, CONTRACTS)[0] is RESIZE


@pytest.mark.parametrize("content_type", [None, ""])
def test_decode_task_accepts_a_message_without_content_type(content_type: str | None) -> None:
    delivery = task_delivery()
    delivery.content_type = content_type

    assert decode_task(delivery, CONTRACTS)[0] is RESIZE


def test_another_content_type_is_unsupported_and_keeps_the_body() -> None:
    delivery = task_delivery(body=b"<xml/>")
    delivery.content_type = "application/xml"

    error = decode_error(delivery)

    assert error.reason == Reasons.UNSUPPORTED_CONTENT_TYPE == "unsupported_content_type"
    assert "application/xml" in error.detail
    assert error.body == b"<xml/>"


@pytest.mark.parametrize("headers", [{}, {TASK: ""}, {TASK: None}, {TASK: b""}])
def test_a_message_without_a_task_header_is_reported_and_keeps_the_body(
    headers: dict[str, Any],
) -> None:
    error = decode_error(FakeDelivery(body=b"{}", headers=headers))

    assert error.reason == Reasons.MISSING_TASK_HEADER == "missing_task_header"
    assert error.body == b"{}"


def test_a_message_with_no_headers_at_all_misses_the_task_header() -> None:
    error = decode_error(FakeDelivery(body=b"{}", headers=None))  # type: ignore[arg-type]

    assert error.reason == Reasons.MISSING_TASK_HEADER


def test_a_task_not_handled_here_is_unknown_and_names_what_is_handled() -> None:
    error = decode_error(task_delivery(headers={TASK: "mail.send"}))

    assert error.reason == Reasons.UNKNOWN_TASK == "unknown_task"
    assert "'mail.send' v1" in error.detail
    assert "images.resize v1, images.resize v2" in error.detail
    assert error.body == b'{"url":"u","width":3}'


def test_a_known_task_in_a_version_not_handled_here_is_unknown() -> None:
    error = decode_error(task_delivery(headers={VERSION: 3}))

    assert error.reason == Reasons.UNKNOWN_TASK
    assert "v3" in error.detail


@pytest.mark.parametrize("version", ["two", b"x", None, 1.5j])
def test_an_unreadable_version_header_is_an_unknown_task(version: Any) -> None:
    error = decode_error(task_delivery(headers={VERSION: version}))

    assert error.reason == Reasons.UNKNOWN_TASK
    assert "invalid version header" in error.detail


def test_unknown_task_says_none_when_nothing_is_handled() -> None:
    with pytest.raises(DecodeError, match=r"handled: none"):
        decode_task(task_delivery(), {})


@pytest.mark.parametrize("body", [b"not json", b'{"url": "u",', b"", b"\xff\xfe"])
def test_a_body_that_is_not_json_is_undecodable_and_kept(body: bytes) -> None:
    error = decode_error(task_delivery(body=body))

    assert error.reason == Reasons.UNDECODABLE_BODY == "undecodable_body"
    assert error.body == body


@pytest.mark.parametrize(
    "body",
    [b'{"url":"u"}', b'{"url":"u","width":"wide"}', b"[1, 2]", b'"text"', b"null"],
)
def test_json_of_the_wrong_shape_is_an_invalid_payload_and_kept(body: bytes) -> None:
    error = decode_error(task_delivery(body=body))

    assert error.reason == Reasons.INVALID_PAYLOAD == "invalid_payload"
    assert "Resize" in error.detail
    assert error.body == body


def test_decode_error_message_starts_with_its_reason() -> None:
    error = decode_error(task_delivery(body=b"[]"))

    assert str(error).startswith("invalid_payload: ")


@pytest.mark.parametrize(
    ("value", "text"),
    [(b"caf\xc3\xa9", "café"), (b"\xff", "\ufffd"), ("plain", "plain"), (2, "2"), (None, None)],
)
def test_header_text_reads_bytes_as_utf8_and_other_values_as_text(
    value: Any, text: str | None
) -> None:
    assert header_text(value) == text


# --- dead_letter ----------------------------------------------------------------------------


def test_dead_letter_keeps_body_id_headers_and_properties_and_says_why() -> None:
    delivery = task_delivery(body=b"not json", headers={"trace": "abc"})
    delivery.correlation_id = "corr-1"
    before = datetime.now(UTC)

    letter = dead_letter(
        delivery, queue="images.resize", reason=Reasons.UNDECODABLE_BODY, error="bad json"
    )

    assert letter.body == b"not json"
    assert letter.message_id == "m-1"
    assert letter.content_type == CONTENT_TYPE
    assert letter.correlation_id == "corr-1"
    assert letter.headers[TASK] == "images.resize"
    assert letter.headers["trace"] == "abc"
    assert letter.headers[REASON] == "undecodable_body"
    assert letter.headers[ERROR] == "bad json"
    assert letter.headers[ORIGIN_QUEUE] == "images.resize"
    failed_at = datetime.fromisoformat(letter.headers[FAILED_AT])
    assert failed_at.utcoffset() == timedelta(0)
    assert before <= failed_at <= datetime.now(UTC)
    assert ERROR_TYPE not in letter.headers
    assert TRACEBACK not in letter.headers


def test_dead_letter_does_not_change_the_delivery_headers() -> None:
    delivery = task_delivery()

    dead_letter(delivery, queue="q", reason=Reasons.HANDLER_ERROR, error="boom")

    assert delivery.headers == {TASK: "images.resize", VERSION: 1}


def test_dead_letter_of_a_handler_failure_records_the_error_type_and_traceback() -> None:
    exc = raised(ValueError("width must be positive"))

    letter = dead_letter(
        task_delivery(),
        queue="images.resize",
        reason=Reasons.HANDLER_ERROR,
        error=str(exc),
        exc=exc,
    )

    assert letter.headers[REASON] == "handler_error"
    assert letter.headers[ERROR_TYPE] == "builtins.ValueError"
    assert letter.headers[TRACEBACK].startswith("Traceback (most recent call last):")
    assert letter.headers[TRACEBACK].rstrip().endswith("ValueError: width must be positive")


def test_dead_letter_names_a_nested_exception_class_by_module_and_qualname() -> None:
    class Outer:
        class Failure(Exception):
            pass

    letter = dead_letter(
        task_delivery(), queue="q", reason=Reasons.HANDLER_ERROR, error="x", exc=Outer.Failure()
    )

    assert letter.headers[ERROR_TYPE] == (
        f"{__name__}.test_dead_letter_names_a_nested_exception_class_by_module_and_qualname"
        ".<locals>.Outer.Failure"
    )


def test_dead_letter_gives_a_message_without_id_a_new_one() -> None:
    delivery = task_delivery()
    delivery.message_id = None

    letter = dead_letter(delivery, queue="q", reason=Reasons.HANDLER_ERROR, error="x")

    assert letter.message_id


def test_dead_letter_of_a_message_without_headers_still_says_why() -> None:
    delivery = FakeDelivery(body=b"x", headers=None)  # type: ignore[arg-type]

    letter = dead_letter(delivery, queue="q", reason=Reasons.MISSING_TASK_HEADER, error="no task")

    assert letter.headers[REASON] == "missing_task_header"


def test_dead_letter_truncates_a_long_error_text() -> None:
    letter = dead_letter(task_delivery(), queue="q", reason=Reasons.HANDLER_ERROR, error="e" * 9000)

    assert letter.headers[ERROR] == "e" * 4000


# --- trimmed_traceback ----------------------------------------------------------------------


def test_a_short_traceback_is_kept_whole() -> None:
    exc = raised(RuntimeError("short"))

    text = trimmed_traceback(exc)

    assert text.startswith("Traceback (most recent call last):")
    assert text.endswith("RuntimeError: short\n")


def test_a_long_traceback_keeps_its_end_where_the_error_was_raised() -> None:
    exc = raised(RuntimeError("x" * 500 + " the end"))

    text = trimmed_traceback(exc, limit=100)

    assert text.startswith("...\n")
    assert text.endswith(" the end\n")
    assert "Traceback (most recent call last)" not in text
    assert len(text) <= 100


def test_message_ids_are_distinct_version_4_uuids_in_hex() -> None:
    ids = [new_message_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for message_id in ids:
        parsed = uuid.UUID(hex=message_id)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, message_id)


@pytest.mark.parametrize(
    "headers",
    [
        {"amqtask-task": "jobs.run", "amqtask-version": 1},
        {"k": "x" * 900, "big": 2**63 - 1, "neg": -(2**63), "flag": True},
        {"k" * 128: "v"},
    ],
)
def test_headers_said_to_fit_without_encoding_do_fit_once_encoded(headers: dict[str, Any]) -> None:
    from amqtask._codec import _surely_fits, field_table

    encoded = len(field_table(headers))
    assert _surely_fits(headers, encoded + 10 * len(headers))
    for budget in range(encoded - 20, encoded + 10 * len(headers)):
        assert not _surely_fits(headers, budget) or encoded <= budget


@pytest.mark.parametrize(
    "headers",
    [
        {"text": "café"},  # not ASCII: its size is measured, not guessed
        {"huge": 2**64},  # no 64-bit integer: pamqp cannot encode it
        {"k" * 129: "v"},  # a key pamqp would cut short
        {"when": 1.5},
        {"k": "x" * 2000},  # over the budget below
    ],
)
def test_headers_that_may_not_fit_are_measured(headers: dict[str, Any]) -> None:
    from amqtask._codec import _surely_fits

    assert not _surely_fits(headers, 1000)
