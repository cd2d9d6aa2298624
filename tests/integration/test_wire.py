"""amqtask's own publish path (`amqtask._wire`) on a real connection: what aiormq's publish
guarantees about a channel being closed holds for it too."""

from __future__ import annotations

import asyncio

import aiormq
import pytest
from aio_pika.abc import AbstractConnection

from amqtask import _wire
from amqtask._codec import Outgoing, new_message_id

from .conftest import queue_depth


async def test_sends_during_a_close_of_their_channel_fail_and_the_connection_lives_on(
    broker_url: str, amqp: AbstractConnection, unique: str
) -> None:
    # Nothing may go out on a channel after its channel.close: the broker would close the whole
    # connection (504 CHANNEL_ERROR), every channel and consumer on it with it.
    queue = f"{unique}.q"
    connection = await aiormq.connect(broker_url)
    try:
        admin = await connection.channel(publisher_confirms=False)
        await admin.queue_declare(queue, auto_delete=False)
        channel = await connection.channel()
        publisher = _wire.publisher(channel)

        async def send() -> str:
            message = Outgoing(body=b"{}", message_id=new_message_id())
            try:
                await publisher.publish("", queue, message, mandatory=True, timeout=10)
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
                return type(exc).__name__
            return "confirmed"

        assert await send() == "confirmed"
        closing = asyncio.ensure_future(channel.close())
        sends = []
        while not channel.is_closed:  # a send in every loop turn of the close
            sends.append(asyncio.ensure_future(send()))
            await asyncio.sleep(0)
        await closing
        outcomes = await asyncio.gather(*sends)

        assert len(outcomes) > 1
        assert set(outcomes) <= {"confirmed", "ChannelClosed", "ChannelInvalidStateError"}
        await asyncio.sleep(0.5)  # time for the broker to refuse a stray frame
        assert not connection.is_closed
        other = await connection.channel()
        await _wire.publisher(other).publish(
            "", queue, Outgoing(b"{}", new_message_id()), mandatory=True, timeout=10
        )
        # Every confirmed send is stored; one that failed with the close may be too (the broker
        # drops the confirms still due when a channel closes).
        depth = await queue_depth(amqp, queue)
        assert 2 + outcomes.count("confirmed") <= depth <= 2 + len(outcomes)
    finally:
        async with amqp.channel() as cleanup:
            await cleanup.queue_delete(queue)
        await connection.close()


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


async def test_sends_after_the_broker_closed_their_channel_fail_and_the_connection_lives_on(
    broker_url: str, amqp: AbstractConnection, unique: str
) -> None:
    # A send to an exchange that does not exist makes the broker close the channel (404). Until
    # aiormq has finished closing it, the channel still looks open; a frame written after its
    # close-ok would make the broker close the whole connection (504 CHANNEL_ERROR).
    queue = f"{unique}.q"
    connection = await aiormq.connect(broker_url)
    try:
        admin = await connection.channel(publisher_confirms=False)
        await admin.queue_declare(queue, auto_delete=False)
        channel = await connection.channel()
        publisher = _wire.publisher(channel)

        async def send(exchange: str) -> str:
            message = Outgoing(body=b"{}", message_id=new_message_id())
            try:
                await publisher.publish(exchange, queue, message, mandatory=True, timeout=10)
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
                return type(exc).__name__
            return "confirmed"

        assert await send("") == "confirmed"
        refused = asyncio.ensure_future(send(f"{unique}.missing"))
        sends = []
        while not refused.done() or not channel.is_closed:  # a send in every loop turn
            sends.append(asyncio.ensure_future(send("")))
            await asyncio.sleep(0)
        outcomes = await asyncio.gather(*sends)

        assert refused.result() == "ChannelNotFoundEntity"
        assert len(outcomes) > 1
        await asyncio.sleep(0.5)  # time for the broker to refuse a stray frame
        assert not connection.is_closed
        other = await connection.channel()
        await _wire.publisher(other).publish(
            "", queue, Outgoing(b"{}", new_message_id()), mandatory=True, timeout=10
        )
    finally:
        async with amqp.channel() as cleanup:
            await cleanup.queue_delete(queue)
        await connection.close()
