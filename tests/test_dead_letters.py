"""Unit tests of what the dead-letter tools read from a message (`amqtask._dead_letters`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from amqtask._codec import ATTEMPT, ERROR, FIRST_FAILED_AT, REASON, TASK, sendable_header
from amqtask._dead_letters import (
    PREVIEW_BYTES,
    DeadLetter,
    Selection,
    last_death_reason,
    letter_digest,
)


@dataclass
class FakeDelivery:
    """The fields of an incoming message the dead-letter tools read."""

    body: bytes = b'{"n":1}'
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = "m-1"
    content_type: str | None = "application/json"
    correlation_id: str | None = None
    reply_to: str | None = None
    redelivered: bool | None = False


def x_death(*reasons: str) -> list[dict[str, Any]]:
    """An `x-death` header as the broker writes it: one entry per queue and reason, newest first."""
    return [{"reason": reason, "queue": f"q{i}", "count": 1} for i, reason in enumerate(reasons)]


def test_the_reason_is_amqtasks_own_header_when_there_is_one() -> None:
    headers = {REASON: "handler_error", "x-death": x_death("rejected")}
    assert last_death_reason(headers) == "handler_error"


def test_without_amqtasks_reason_the_newest_broker_death_counts_not_the_first() -> None:
    headers = {
        "x-death": x_death("rejected", "expired"),
        "x-first-death-reason": "expired",
    }
    assert last_death_reason(headers) == "rejected"


@pytest.mark.parametrize(
    "deaths", ["rejected", [], ["rejected"], [42], None, {"reason": "rejected"}]
)
def test_a_malformed_x_death_gives_no_reason_instead_of_an_error(deaths: Any) -> None:
    assert last_death_reason({"x-death": deaths, "x-first-death-reason": "expired"}) is None


def test_a_broker_reason_of_any_type_reads_as_text() -> None:
    assert last_death_reason({"x-death": [{"reason": b"maxlen"}]}) == "maxlen"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (3, 3),
        ("4", 4),
        (b"5", 5),
        (bytearray(b"6"), 6),
        ("abc", "abc"),
        (1.5, "1.5"),
        ({"a": 1}, "{'a': 1}"),
        ([1, 2], "[1, 2]"),
        (True, "True"),
        (None, None),
    ],
)
def test_an_attempt_header_shows_as_a_number_or_else_as_its_text(value: Any, shown: Any) -> None:
    letter = DeadLetter.of(FakeDelivery(headers={ATTEMPT: value}))
    assert letter.attempts == shown


def test_headers_of_every_amqp_type_read_as_text() -> None:
    when = datetime(2024, 5, 1, tzinfo=UTC)
    letter = DeadLetter.of(
        FakeDelivery(
            headers={
                TASK: bytearray(b"users.notify"),
                REASON: [1, "two"],
                ERROR: b"caf\xe9",
                FIRST_FAILED_AT: when,
                "amqtask-failed-at": Decimal("1.25"),
            }
        )
    )
    assert letter.task == "users.notify"
    assert letter.reason == "[1, 'two']"
    assert letter.error == "caf\ufffd"
    assert letter.first_failed_at == str(when)
    assert letter.failed_at == "1.25"


def test_headers_that_are_not_a_table_read_as_none() -> None:
    letter = DeadLetter.of(FakeDelivery(headers="junk", message_id=None))  # type: ignore[arg-type]
    assert (letter.task, letter.reason, letter.attempts, letter.message_id) == (
        None,
        None,
        None,
        None,
    )


def test_a_large_body_is_kept_as_a_preview_with_its_size() -> None:
    letter = DeadLetter.of(FakeDelivery(body=b"x" * 5_000_000))
    assert letter.body_size == 5_000_000
    assert letter.body_preview == b"x" * PREVIEW_BYTES
    assert letter.body_truncated
    shown = letter.to_dict()
    assert shown["body"] == "x" * PREVIEW_BYTES
    assert (shown["body_size"], shown["body_truncated"]) == (5_000_000, True)


def test_a_small_body_is_kept_whole() -> None:
    letter = DeadLetter.of(FakeDelivery(body=b'{"n":1}'))
    assert (letter.body_preview, letter.body_size, letter.body_truncated) == (b'{"n":1}', 7, False)


def test_a_huge_header_is_clipped() -> None:
    letter = DeadLetter.of(FakeDelivery(headers={TASK: "t" * 100_000, ERROR: "e" * 100_000}))
    assert len(letter.task or "") < 300
    assert len(letter.error or "") < 4100


def test_replayed_headers_are_encodable_again_and_keep_their_bytes() -> None:
    headers = {
        "text": b"\xffbad",
        "nested": {"list": [b"\xfe", 1.5, 1e300]},
        "kept": Decimal("1.25"),
    }
    assert sendable_header(headers) == {
        "text": bytearray(b"\xffbad"),
        "nested": {"list": [bytearray(b"\xfe"), 1.5, "1e+300"]},
        "kept": Decimal("1.25"),
    }


def test_a_selection_takes_one_copy_per_letter_named_and_the_id_is_never_clipped() -> None:
    first = FakeDelivery(body=b"a", message_id="same")
    twin = FakeDelivery(body=b"a", message_id="same", headers={"x-delivery-count": 3})
    other = FakeDelivery(body=b"b", message_id="same")
    assert letter_digest(first) == letter_digest(twin)  # a quorum queue's count is not the letter
    assert letter_digest(first) != letter_digest(other)
    selection = Selection([("same", letter_digest(first))])
    assert not selection.take(other)  # type: ignore[arg-type]
    assert selection.take(twin)  # type: ignore[arg-type]
    assert not selection.take(first)  # type: ignore[arg-type]
    assert selection.done
    long_id = "x" * 255  # the longest an AMQP message id can be
    letter = DeadLetter.of(FakeDelivery(message_id=long_id))  # type: ignore[arg-type]
    assert letter.message_id == long_id
    assert letter.to_dict()["digest"] == letter_digest(FakeDelivery(message_id=long_id))  # type: ignore[arg-type]
