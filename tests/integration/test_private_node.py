"""The private-node helper itself: a confirmed message survives kill -9 and a restart."""

from __future__ import annotations

import asyncio
import socket

import aio_pika
import pytest

from .private_node import QUORUM_REGISTRATION_SETTLE, PrivateNode

pytestmark = pytest.mark.integration

SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def _shared_node_answers() -> bool:
    try:
        connection = await aio_pika.connect(SHARED_URL, timeout=5)
    except Exception:
        return False
    async with connection:
        channel = await connection.channel()
        await channel.close()
    return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def _get_one(url: str, queue_name: str, timeout: float = 20) -> aio_pika.IncomingMessage:
    """basic.get with retries: a quorum queue needs a moment to elect its leader after boot."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: Exception | None = None
    while loop.time() < deadline:
        try:
            connection = await aio_pika.connect(url, timeout=5)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(queue_name, passive=True)
                message = await queue.get(no_ack=False, fail=False, timeout=5)
                if message is not None:
                    await message.ack()
                    return message
        except Exception as exc:
            last_error = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"no message in {queue_name} after restart (last error: {last_error!r})")


async def test_confirmed_message_survives_kill_9_and_restart() -> None:
    assert await _shared_node_answers(), "the shared node at 5672 must be up to begin with"
    queue_name = "amqtask-private-node-survivor"
    body = b"still here after kill -9"

    with PrivateNode() as node:
        assert node.port not in (5672, 25672)
        assert node.last_start_duration is not None

        connection = await aio_pika.connect(node.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.declare_queue(
                queue_name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            # With confirms on, publish() returns only once the broker has confirmed.
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue_name,
            )

        # Let the broker persist the new queue's Ra registration (see the constant).
        await asyncio.sleep(QUORUM_REGISTRATION_SETTLE)
        node.kill()
        assert not node.running
        assert not _port_open(node.port)

        node.restart()
        message = await _get_one(node.url, queue_name)
        assert message.body == body
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT

    assert not node.running
    assert not node.base_dir.exists()
    assert await _shared_node_answers(), "the shared node at 5672 must survive the private one"
