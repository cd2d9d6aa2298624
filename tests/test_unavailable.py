"""What sends and commands say when a queue is unavailable (a quorum queue without a leader or
without quorum) or a node closed the connection: no broker needed, the transport is a stub."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiormq.exceptions
import pytest
from pydantic import BaseModel

import amqtask
from amqtask._transport import _why_unconfirmed, broker_closed


class Job(BaseModel):
    n: int


class NackingTransport:
    """Publishes by answering with nacks `nacks` times (forever for None), then confirms."""

    def __init__(self, nacks: int | None) -> None:
        self.nacks = nacks
        self.attempts: list[float | None] = []  # each publish's timeout

    async def publish(self, exchange: str, routing_key: str, message: Any, **kw: Any) -> None:
        self.attempts.append(kw["timeout"])
        if self.nacks is None or len(self.attempts) <= self.nacks:
            raise amqtask.PublishNacked("nack", task=kw["task"], message_id=message.message_id)

    def reply_channel(self, *args: Any) -> Any:
        raise NotImplementedError


def app_on(transport: NackingTransport, **contract: Any) -> tuple[amqtask.App, Any]:
    job = amqtask.contract("jobs.run", Job, **contract)
    return amqtask.App("amqp://localhost/", [job], transport=transport), job  # type: ignore[arg-type]


async def test_a_send_refused_while_its_queue_elects_a_leader_is_retried_and_stored() -> None:
    transport = NackingTransport(nacks=3)
    app, job = app_on(transport)

    await app.send(job, Job(n=1), timeout=5)

    assert len(transport.attempts) == 4
    # The retries share the one timeout.
    assert all(t is not None and t <= 5 for t in transport.attempts)
    assert transport.attempts == sorted(transport.attempts, reverse=True)


async def test_a_send_refused_until_its_timeout_says_the_queue_is_unavailable() -> None:
    transport = NackingTransport(nacks=None)
    app, job = app_on(transport)
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(amqtask.PublishNacked) as raised:
        await app.send(job, Job(n=1), timeout=0.5)

    assert loop.time() - started < 2
    message = str(raised.value)
    assert "refused message" in message
    assert "at every try for 0.5 s" in message
    assert "its queue is unavailable (a quorum queue without a leader" in message
    assert "nothing was stored" in message


async def test_a_full_bounded_queue_is_still_queue_full_at_once() -> None:
    transport = NackingTransport(nacks=None)
    app, job = app_on(transport, max_length=10)

    with pytest.raises(amqtask.QueueFull):
        await app.send(job, Job(n=1), timeout=5)

    assert len(transport.attempts) == 1


async def test_a_delayed_send_to_a_bounded_queue_is_retried_not_called_full() -> None:
    # Delayed sends wait in unbounded queues: a nack there is no full queue.
    transport = NackingTransport(nacks=2)
    app, job = app_on(transport, max_length=10)

    await app.send(job, Job(n=1), delay=5, timeout=5)

    assert len(transport.attempts) == 3


def channel_blocked(blocked: bool | None) -> Any:
    """A stand-in for an aio-pika channel, down to aiormq's private unblocked event."""
    if blocked is None:
        return SimpleNamespace()
    unblocked = asyncio.Event()
    if not blocked:
        unblocked.set()
    connection = SimpleNamespace(_Connection__connection_unblocked=unblocked)
    return SimpleNamespace(
        _connection=SimpleNamespace(transport=SimpleNamespace(connection=connection))
    )


def test_no_confirm_on_a_blocked_connection_names_the_alarm() -> None:
    said = _why_unconfirmed(channel_blocked(True))

    assert said.startswith("the broker is blocking publishers (a memory or disk alarm")
    assert "unavailable" not in said


def test_no_confirm_on_an_open_connection_names_the_unavailable_queue_not_an_alarm() -> None:
    said = _why_unconfirmed(channel_blocked(False))

    assert said.startswith("its queue may be unavailable (a quorum queue without a leader")
    assert "blocking" not in said


def test_no_confirm_where_blocking_cannot_be_read_names_both() -> None:
    said = _why_unconfirmed(channel_blocked(None))

    assert "unavailable" in said
    assert "blocking publishers" in said


def test_an_internal_error_from_a_node_is_not_an_unreachable_broker() -> None:
    said = broker_closed(aiormq.exceptions.ConnectionInternalError("INTERNAL_ERROR"))

    assert said is not None
    assert said.startswith("the broker closed the connection with 541 INTERNAL_ERROR")
    assert "lost its quorum" in said
    assert "cannot reach" not in said


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        aiormq.exceptions.AMQPConnectionError("Server connection reset"),
        aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED - shutdown"),
        OSError("no route"),
    ],
)
def test_a_lost_or_refused_connection_is_left_to_the_connect_errors(exc: BaseException) -> None:
    assert broker_closed(exc) is None


def test_other_codes_a_node_closes_with_are_named() -> None:
    said = broker_closed(aiormq.exceptions.ConnectionNotAllowed("NOT_ALLOWED - access refused"))

    assert said == (
        "the broker closed the connection: ConnectionNotAllowed: NOT_ALLOWED - access refused"
    )
