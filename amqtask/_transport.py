"""The transport seam: what the app and the worker need of a broker, and its aio-pika version.

Publishing and consuming use separate channels of one robust connection: a slow consumer never
holds up publishes, and a channel closed by a consume-side error does not fail in-flight confirms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from amqtask import topology as topo
from amqtask._codec import Delivery, Outgoing
from amqtask._exceptions import NotConnected, PublishNacked, PublishTimeout, Unroutable

log = structlog.get_logger("amqtask.transport")


class IncomingDelivery(Delivery, Protocol):
    """A delivery the worker settles: ack once done, or reject without requeue."""

    async def ack(self) -> None: ...
    async def reject(self, requeue: bool = False) -> None: ...


OnMessage = Callable[[IncomingDelivery], Awaitable[None]]


class Subscription(Protocol):
    async def cancel(self) -> None: ...


class Transport(Protocol):
    """What amqtask needs of a broker connection."""

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        *,
        task: str,
        timeout: float | None,
        mandatory: bool = True,
    ) -> None: ...
    async def consume(
        self, queue: str, on_message: OnMessage, *, prefetch: int
    ) -> Subscription: ...
    async def plan(self, topology: topo.Topology) -> topo.Plan: ...
    async def apply(self, plan: topo.Plan) -> None: ...
    async def ensure_exists(self, topology: topo.Topology, queues: Iterable[str]) -> None: ...


# Settling a delivery whose channel died fails with one of these; the broker redelivers it.
SETTLE_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.MessageProcessError,
    ConnectionError,
)


class _AioPikaSubscription:
    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, tag: str) -> None:
        self._channel, self._queue, self._tag = channel, queue, tag

    async def cancel(self) -> None:
        """Stop deliveries; the channel stays open so in-flight messages can still be acked."""
        try:
            await self._queue.cancel(self._tag)
        except SETTLE_ERRORS as exc:
            log.warning("consumer_cancel_failed", queue=self._queue.name, error=repr(exc))

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()


class AioPikaTransport:
    """`Transport` over one aio-pika robust connection (reconnects and restores consumers)."""

    def __init__(self, url: str, *, name: str = "amqtask") -> None:
        self.url = url
        self.name = name
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._subscriptions: list[_AioPikaSubscription] = []

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise NotConnected("not connected: use `async with app:` (or `await app.connect()`)")
        return self._connection

    async def connect(self) -> None:
        if self._connection is not None:
            return
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": self.name}
        )
        self._publish_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._publish_channel = None
        self._exchanges.clear()
        self._subscriptions.clear()
        if connection is not None:
            await connection.close()

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            if self._publish_channel is None:
                raise NotConnected("not connected: use `async with app:` first")
            # Not declared here: `amqtask declare` owns the topology; a missing exchange surfaces
            # as a channel error on publish.
            exchange = await self._publish_channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        *,
        task: str,
        timeout: float | None,
        mandatory: bool = True,
    ) -> None:
        """Publish persistent and wait for the broker's confirm.

        Raises `Unroutable` (returned by `mandatory`), `PublishNacked`, or `PublishTimeout`.
        """
        target = await self._exchange(exchange)
        amqp_message = aio_pika.Message(
            message.body,
            headers=message.headers,
            content_type=message.content_type,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            expiration=message.expiration,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            async with asyncio.timeout(timeout):
                await target.publish(amqp_message, routing_key, mandatory=mandatory)
        except aio_pika.exceptions.PublishError:
            raise Unroutable(
                f"task {task!r}: no queue is bound to exchange {exchange!r} with routing key "
                f"{routing_key!r}; the message was returned, not stored. "
                "Run `amqtask declare MODULE:APP` to create the topology.",
                task=task,
                message_id=message.message_id,
            ) from None
        except aiormq.exceptions.ChannelNotFoundEntity:
            # The broker closed the channel (404); the robust channel reopens it for the next send.
            raise Unroutable(
                f"task {task!r}: exchange {exchange!r} does not exist; the message was not stored. "
                "Run `amqtask declare MODULE:APP` to create the topology.",
                task=task,
                message_id=message.message_id,
            ) from None
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishNacked(
                f"task {task!r}: the broker refused message {message.message_id} "
                f"({type(exc.frame).__name__})",
                task=task,
                message_id=message.message_id,
            ) from None
        except TimeoutError:
            raise PublishTimeout(
                f"task {task!r}: no confirm for message {message.message_id} within {timeout} s "
                "(is the broker blocking publishers or unreachable?); it may still be delivered",
                task=task,
                message_id=message.message_id,
            ) from None

    async def consume(self, queue: str, on_message: OnMessage, *, prefetch: int) -> Subscription:
        """Consume `queue` with manual acks on a channel of its own with `prefetch` in flight."""
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        # A passive declare registers the queue with the robust channel, which then re-consumes
        # it after a reconnect.
        amqp_queue = await channel.declare_queue(queue, passive=True)

        async def deliver(message: AbstractIncomingMessage) -> None:
            await on_message(message)

        tag = await amqp_queue.consume(deliver, no_ack=False)
        subscription = _AioPikaSubscription(channel, amqp_queue, tag)
        self._subscriptions.append(subscription)
        return subscription

    async def _plain_connection(self) -> AbstractConnection:
        # Topology probes close channels on purpose (404/406); a plain connection keeps that away
        # from the robust channels' restore logic.
        return await aio_pika.connect(self.url, client_properties={"connection_name": self.name})

    async def plan(self, topology: topo.Topology) -> topo.Plan:
        connection = await self._plain_connection()
        async with connection:
            return await topo.observe(connection, topology)

    async def apply(self, plan: topo.Plan) -> None:
        connection = await self._plain_connection()
        async with connection:
            await topo.apply(connection, plan)

    async def ensure_exists(self, topology: topo.Topology, queues: Iterable[str]) -> None:
        connection = await self._plain_connection()
        async with connection:
            await topo.ensure_exists(connection, topology, queues)
