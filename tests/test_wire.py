"""The publish frames amqtask encodes itself are the bytes aiormq and pamqp would write."""

from __future__ import annotations

from datetime import UTC

import pytest
from aiormq.abc import ChannelFrame
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from amqtask import _wire
from amqtask._codec import Outgoing


def reference(
    channel: int, exchange: str, routing_key: str, message: Outgoing, mandatory: bool, size: int
) -> bytes:
    """What aiormq's `basic_publish` puts on the write queue for the same publish."""
    body = message.body
    room = size - 8
    chunks = [ContentBody(body[at : at + room]) for at in range(0, len(body), room)]
    frames = [
        commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(0, len(body), _wire.properties(message)),
        *chunks,
    ]
    return ChannelFrame.marshall(channel, frames).payload


short = st.text(max_size=40).filter(lambda text: len(text.encode()) <= 255)
exchanges = st.from_regex(r"[a-zA-Z0-9\-_.:@#,/+ ]{0,127}", fullmatch=True)
header_values = st.one_of(
    st.text(max_size=300),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.datetimes(timezones=st.just(UTC)).map(lambda moment: moment.replace(microsecond=0)),
    st.lists(st.text(max_size=5) | st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
messages = st.builds(
    Outgoing,
    body=st.binary(max_size=700),
    message_id=short,
    headers=st.dictionaries(st.text(max_size=140), header_values, max_size=5),
    content_type=st.none() | short,
    correlation_id=st.none() | short,
    reply_to=st.none() | short,
    expiration=st.none() | st.floats(min_value=0, max_value=10**6),
    content_encoding=st.none() | short,
    type=st.none() | short,
    persistent=st.booleans(),
)


@given(
    message=messages,
    channel=st.integers(1, 2047),
    exchange=exchanges,
    routing_key=short,
    mandatory=st.booleans(),
    frame_max=st.sampled_from([4096, 131072, 300]),
)
def test_publish_frames_are_the_bytes_aiormq_would_write(
    message: Outgoing,
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    frame_max: int,
) -> None:
    try:
        expected = reference(channel, exchange, routing_key, message, mandatory, frame_max)
    except Exception as exc:  # a value AMQP cannot carry: refused the same way
        with pytest.raises(type(exc)):
            _wire.publish_frames(
                channel, exchange, routing_key, message, mandatory=mandatory, frame_max=frame_max
            )
        return
    ours = _wire.publish_frames(
        channel, exchange, routing_key, message, mandatory=mandatory, frame_max=frame_max
    )
    assert ours == expected


def test_a_task_message_takes_the_short_path_and_matches() -> None:
    message = Outgoing(
        body=b'{"n":1}',
        message_id="a" * 32,
        headers={"amqtask-task": "jobs.resize", "amqtask-version": 2, "traceparent": "00-ab"},
        type="jobs.resize",
    )
    flags, _ = _wire._encoded_properties(message)  # not delegated to pamqp
    assert flags
    ours = _wire.publish_frames(
        1, "app.tasks", "jobs.resize", message, mandatory=True, frame_max=131072
    )
    assert ours == reference(1, "app.tasks", "jobs.resize", message, True, 131072)


def test_a_routing_key_over_255_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="255 bytes"):
        _wire.publish_frames(1, "x", "é" * 128, Outgoing(b"", "id"), mandatory=True, frame_max=4096)


@pytest.mark.parametrize("exchange", ["a" * 128, "tasks!", "täsks"])
def test_an_exchange_name_pamqp_refuses_is_refused(exchange: str) -> None:
    with pytest.raises(ValueError, match="exchange"):  # aiormq's path refuses it too
        commands.Basic.Publish(exchange=exchange)
    with pytest.raises(ValueError, match="invalid exchange name"):
        _wire.publish_frames(1, exchange, "k", Outgoing(b"", "id"), mandatory=True, frame_max=4096)
