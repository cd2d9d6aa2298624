"""amqtask's own publish path (`amqtask._wire`) on a real connection: what aiormq's publish
guarantees about a channel being closed holds for it too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiormq
import aiormq.abc
import pytest
from aio_pika.abc import AbstractConnection

from amqtask import _wire
from amqtask._codec import Outgoing, new_message_id

from .conftest import queue_depth


class Sender:
    """A confirming aiormq channel, publishing through `_wire` to a queue of its own; a send
    returns "confirmed" or the name of the error it failed with."""

    channel: aiormq.abc.AbstractChannel  # once opened

    def __init__(self, connection: aiormq.abc.AbstractConnection, queue: str) -> None:
        self.connection, self.queue = connection, queue

    async def open(self) -> aiormq.abc.AbstractChannel:
        admin = await self.connection.channel(publisher_confirms=False)
        await admin.queue_declare(self.queue, auto_delete=False)
        self.channel = await self.connection.channel()
        return self.channel

    async def send(self, exchange: str = "") -> str:
        message = Outgoing(body=b"{}", message_id=new_message_id())
        try:
            await _wire.publisher(self.channel).publish(
                exchange, self.queue, message, mandatory=True, timeout=10
            )
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
            return type(exc).__name__
        return "confirmed"

    async def assert_connection_lives(self) -> None:
        await asyncio.sleep(0.5)  # time for the broker to refuse a stray frame
        assert not self.connection.is_closed
        other = await self.connection.channel()
        await _wire.publisher(other).publish(
            "", self.queue, Outgoing(b"{}", new_message_id()), mandatory=True, timeout=10
        )


@pytest.fixture
async def sender(broker_url: str, amqp: AbstractConnection, unique: str) -> AsyncIterator[Sender]:
    connection = await aiormq.connect(broker_url)
    sender = Sender(connection, f"{unique}.q")
    try:
        yield sender
    finally:
        async with amqp.channel() as cleanup:
            await cleanup.queue_delete(sender.queue)
        await connection.close()


async def test_sends_during_a_close_of_their_channel_fail_and_the_connection_lives_on(
    sender: Sender, amqp: AbstractConnection
) -> None:
    # Nothing may go out on a channel after its channel.close: the broker would close the whole
    # connection (504 CHANNEL_ERROR), every channel and consumer on it with it.
    channel = await sender.open()
    assert await sender.send() == "confirmed"
    closing = asyncio.ensure_future(channel.close())
    sends = []
    while not channel.is_closed:  # a send in every loop turn of the close
        sends.append(asyncio.ensure_future(sender.send()))
        await asyncio.sleep(0)
    await closing
    outcomes = await asyncio.gather(*sends)

    assert len(outcomes) > 1
    assert set(outcomes) <= {"confirmed", "ChannelClosed", "ChannelInvalidStateError"}
    await sender.assert_connection_lives()
    # Every confirmed send is stored; one that failed with the close may be too (the broker
    # drops the confirms still due when a channel closes).
    depth = await queue_depth(amqp, sender.queue)
    assert 2 + outcomes.count("confirmed") <= depth <= 2 + len(outcomes)


async def test_sends_after_the_broker_closed_their_channel_fail_and_the_connection_lives_on(
    sender: Sender, unique: str
) -> None:
    # A send to an exchange that does not exist makes the broker close the channel (404). Until
    # aiormq has finished closing it, the channel still looks open; a frame written after its
    # close-ok would make the broker close the whole connection (504 CHANNEL_ERROR).
    channel = await sender.open()
    assert await sender.send() == "confirmed"
    refused = asyncio.ensure_future(sender.send(f"{unique}.missing"))
    sends = []
    while not refused.done() or not channel.is_closed:  # a send in every loop turn
        sends.append(asyncio.ensure_future(sender.send()))
        await asyncio.sleep(0)
    outcomes = await asyncio.gather(*sends)

    assert refused.result() == "ChannelNotFoundEntity"
    assert len(outcomes) > 1
    await sender.assert_connection_lives()


async def test_a_confirmed_publish_without_a_message_id_is_refused(broker_url: str) -> None:
    # A returned message finds its send by its id: without one it would read as confirmed.
    connection = await aiormq.connect(broker_url)
    try:
        channel = await connection.channel()
        with pytest.raises(ValueError, match="message id"):
            await _wire.publisher(channel).publish(
                "", "nowhere", Outgoing(b"{}", ""), mandatory=True, timeout=10
            )
    finally:
        await connection.close()
