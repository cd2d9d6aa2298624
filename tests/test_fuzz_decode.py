"""Fuzzing the decode-and-settle path: whatever arrives (any body, headers of every AMQP type,
any content type and encoding, a call or not), nothing escapes, and the delivery ends processed
or dead-lettered with a reason in headers the client can send."""

from __future__ import annotations

import gzip
from datetime import UTC
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amqtask import _codec
from amqtask._codec import open_envelope
from amqtask._execution import Outcome, Refused, Succeeded
from amqtask._settle import Settler

from .test_settle import CONTRACTS, NAMES, FakeDelivery, FakeTransport

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),  # lone surrogates included
    st.binary(max_size=64),
    st.binary(max_size=64).map(bytearray),
    st.decimals(allow_nan=False, allow_infinity=False, places=2).map(Decimal),
    st.datetimes(timezones=st.just(UTC)),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
task_names = st.sampled_from(["jobs.run", "jobs.ask", "no.such.task", "", "jobs.run\x00"])
headers = st.fixed_dictionaries(
    {},
    optional={
        _codec.TASK: task_names | values,
        _codec.VERSION: st.sampled_from([1, 2, "1", b"1", -1, 2**70]) | values,
        _codec.ATTEMPT: st.sampled_from([1, 2, 5, "abc", b"3", None]) | values,
        _codec.DEADLINE: st.sampled_from([0, 2**62, "soon", float("inf")]) | values,
        _codec.FIRST_FAILED_AT: values,
        "x-death": values,
        "traceparent": values,
    },
).flatmap(
    lambda fixed: st.dictionaries(st.text(max_size=12), values, max_size=4).map(
        lambda extra: {**extra, **fixed}
    )
)
good_bodies = st.integers(min_value=-(2**63), max_value=2**63 - 1).map(
    lambda n: orjson.dumps({"n": n})
)
bodies = st.one_of(
    good_bodies,
    good_bodies.map(gzip.compress),
    st.binary(max_size=200),
    st.just(b'{"n": "seven"}'),
    st.just(b"[" * 5000),  # deep nesting
)
content_types = st.sampled_from(
    [None, "", "application/json", "application/json; charset=utf-8", "text/plain", ";;=", "a/b;c"]
) | st.text(max_size=30)
encodings = st.sampled_from([None, "", "identity", "gzip", "deflate", "br"]) | st.text(max_size=10)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=bodies,
    headers=headers,
    content_type=content_types,
    encoding=encodings,
    is_call=st.booleans(),
)
async def test_any_message_ends_processed_or_dead_lettered_with_a_reason(
    body: bytes,
    headers: dict[str, Any],
    content_type: str | None,
    encoding: str | None,
    is_call: bool,
) -> None:
    delivery = FakeDelivery(
        body=body,
        headers=headers,
        content_type=content_type,
        content_encoding=encoding,
        reply_to="amq.rabbitmq.reply-to.x" if is_call else None,
        correlation_id="c" if is_call else None,
    )
    envelope = open_envelope(delivery, "jobs.run", CONTRACTS)  # must not raise
    # A handler that returns what its contract promises (None, or an `Out` for a call of ask).
    result = {"doubled": 2} if envelope.contract is not None and envelope.contract.output else None
    outcome: Outcome = Refused(envelope.problem) if envelope.problem else Succeeded(result)
    transport = FakeTransport()
    settler = Settler(transport, NAMES, publish_timeout=1.0, settle_timeout=1.0)  # type: ignore[arg-type]
    settled = await settler.settle(envelope, outcome)

    assert delivery.settled == ["ack"]
    letters = transport.to(NAMES.dead_letter_exchange)
    if envelope.problem is None:
        assert settled.outcome == "succeeded"
        assert letters == []
    else:
        (letter,) = letters
        assert letter.headers[_codec.REASON] == envelope.problem.reason
        assert letter.body == body  # kept byte for byte
        _codec.field_table(letter.headers)  # every header can be sent
    for _, _, message in transport.published:
        _codec.field_table(message.headers)


def test_a_decompression_bomb_is_refused_without_expanding_it_whole() -> None:
    bomb = gzip.compress(b"{" + b" " * (_codec.MAX_BODY_BYTES + 10) + b"}")
    delivery = FakeDelivery(body=bomb, content_encoding="gzip")
    envelope = open_envelope(delivery, "jobs.run", CONTRACTS)
    assert envelope.problem is not None
    assert envelope.problem.reason == "undecodable_body"
    assert "expands beyond" in envelope.problem.detail
