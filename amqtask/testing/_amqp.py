"""AMQP connections and channels on the in-memory broker, for code that speaks AMQP itself.

The scheduler (`amqtask._scheduler`), `amqtask schedules` (`amqtask._schedule_admin`) and the
workers' control listener and `inspect_workers` (`amqtask._control`) do not go through the
`Transport` seam: they hold a connection of their own and use the AMQP methods on it
(`basic.qos`, `basic.consume`, `basic.ack`, `basic.publish` with confirms, direct reply-to, an
exclusive queue bound to a fanout exchange),
since which connection holds the scheduler queue's single active consumer is what makes one
scheduler active. `AmqpConnection` gives them those methods with aio-pika's and aiormq's names
and types (`Basic.Properties`, `DeliveredMessage`), acting on the `MemoryBroker`: a channel that
closes returns its unacked deliveries to their queues, and the next consumer in line of a
single-active-consumer queue gets them, as on RabbitMQ.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import aiormq.abc
import aiormq.exceptions
from pamqp import commands as spec
from pamqp.header import ContentHeader

from amqtask._codec import Outgoing
from amqtask._exceptions import TopologyMissing
from amqtask._resource import AsyncResource
from amqtask.testing._broker import MemoryBroker, _Consumer
from amqtask.testing._messages import DIRECT_REPLY_TO, MemoryDelivery, StoredMessage

Callback = Callable[[aiormq.abc.DeliveredMessage], Coroutine[Any, Any, Any]]
_consumer_tags = itertools.count(1)


class _Callbacks:
    """aio-pika's callback collections, as far as amqtask uses them: `add`, called with the
    sender and the exception that closed it (None for a normal close)."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[..., Any]] = []

    def add(self, callback: Callable[..., Any]) -> None:
        self._callbacks.append(callback)

    def discard(self, callback: Callable[..., Any]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def __call__(self, *args: Any) -> None:
        for callback in list(self._callbacks):
            callback(*args)


def _properties(message: StoredMessage, headers: dict[str, Any]) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=headers or None,
        delivery_mode=2,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        message_type=message.type,
    )


def _observed(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # the close callbacks report the error, not the loop's handler


def _outgoing(body: bytes, properties: spec.Basic.Properties | None) -> Outgoing:
    props = properties or spec.Basic.Properties()
    expiration = props.expiration
    return Outgoing(
        body=bytes(body),
        message_id=props.message_id or "",
        headers=dict(props.headers or {}),
        content_type=props.content_type,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=None if expiration is None else int(expiration) / 1000,
        content_encoding=props.content_encoding,
        type=props.message_type,
        persistent=props.delivery_mode != 1,
    )


class AmqpChannel(AsyncResource):
    """One channel: aio-pika's channel (`await connection.channel()`, `async with`) and its
    aiormq channel (`get_underlay_channel()`) in one object."""

    def __init__(self, connection: AmqpConnection, *, publisher_confirms: bool) -> None:
        self.connection = connection
        self.broker = connection.broker
        self.publisher_confirms = publisher_confirms
        self.close_callbacks = _Callbacks()
        self.on_consumer_cancel_callbacks = _Callbacks()
        self.prefetch = 0
        self.is_closed = False
        self._reply_address: str | None = None
        self._deliveries: dict[int, MemoryDelivery] = {}
        self._consumers: list[_Consumer] = []
        self._callbacks: set[asyncio.Task[Any]] = set()  # consumer callbacks running

    def __await__(self) -> Generator[Any, None, AmqpChannel]:
        if False:  # pragma: no cover - makes this a generator: opening takes no round trip
            yield
        return self

    async def get_underlay_channel(self) -> AmqpChannel:
        return self

    def _check_open(self) -> None:
        if self.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{self!r} closed")

    def _fail(self, error: BaseException) -> BaseException:
        """An AMQP channel error closes the channel."""
        self._closed(error)
        return error

    async def close(self) -> None:
        self._closed(None)

    def _closed(self, exc: BaseException | None) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        self.broker.disconnect(self)  # unacked deliveries go back to their queues
        if not self.closing.done():
            if exc is None:
                self.closing.set_result(None)
            else:
                self.closing.set_exception(exc)
        self.close_callbacks(self, exc)

    _closing: asyncio.Future[None] | None = None

    @property
    def closing(self) -> asyncio.Future[None]:
        """aiormq's `closing`: done once the channel closed, with the error that closed it."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
            self._closing.add_done_callback(_observed)
        return self._closing

    # --- queues ------------------------------------------------------------------------------

    async def declare_queue(self, name: str, *, passive: bool = False, **_: Any) -> Any:
        """Passive declares only (what amqtask's AMQP code does): 404 when it does not exist."""
        self._check_open()
        if not passive:
            raise NotImplementedError("the in-memory broker declares only through App.declare")
        if name not in self.broker.queues:
            raise self._fail(
                aiormq.exceptions.ChannelNotFoundEntity(f"NOT_FOUND - no queue '{name}'")
            )
        return self.broker.queues[name]

    async def queue_declare(
        self, queue: str, *, exclusive: bool = False, auto_delete: bool = False, **_: Any
    ) -> None:
        """An exclusive, auto-delete queue of this channel's (a worker's queue on the control
        exchange), gone when the channel closes: the only kind declared outside App.declare."""
        self._check_open()
        if not (exclusive and auto_delete):
            raise NotImplementedError("the in-memory broker declares only through App.declare")
        self.broker.declare_exclusive(queue, None, owner=self)

    async def queue_bind(self, queue: str, exchange: str, routing_key: str = "", **_: Any) -> None:
        """Bind an exclusive queue of this channel's to a fanout exchange; 404 when the exchange
        does not exist (the channel closes)."""
        self._check_open()
        try:
            self.broker.bind_exclusive(queue, exchange)
        except TopologyMissing as exc:
            raise self._fail(
                aiormq.exceptions.ChannelNotFoundEntity(f"NOT_FOUND - no {exc.missing[0]}")
            ) from None

    async def basic_qos(self, *, prefetch_count: int = 0, **_: Any) -> None:
        self._check_open()
        self.prefetch = prefetch_count

    async def basic_consume(
        self, queue: str, consumer_callback: Callback, *, no_ack: bool = False, **_: Any
    ) -> None:
        self._check_open()
        loop = asyncio.get_running_loop()
        tag = f"amq.ctag-memory-{next(_consumer_tags)}"

        def frame(message: StoredMessage, headers: dict[str, Any], delivery_tag: int) -> Any:
            return aiormq.abc.DeliveredMessage(
                delivery=spec.Basic.Deliver(
                    consumer_tag=tag,
                    delivery_tag=delivery_tag,
                    redelivered=message.redelivered,
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                ),
                header=ContentHeader(
                    body_size=len(message.body), properties=_properties(message, headers)
                ),
                body=message.body,
                channel=self,  # type: ignore[arg-type]  # this channel stands for aiormq's
            )

        if queue == DIRECT_REPLY_TO:

            def reply(message: StoredMessage) -> None:
                self.broker.activity += 1
                self._run(loop, consumer_callback(frame(message, message.headers, 0)))

            self._reply_address = self.broker.open_reply(reply, owner=self)
            return

        def deliver(delivery: MemoryDelivery) -> None:
            if no_ack:
                loop.call_soon(self.broker.settle, delivery, "ack")
            else:
                self._deliveries[delivery.tag] = delivery
            message = frame(delivery.message, dict(delivery.headers), delivery.tag)
            self._run(loop, consumer_callback(message))

        try:
            consumer = self.broker.consume(queue, deliver, prefetch=self.prefetch, owner=self)
        except TopologyMissing:
            raise self._fail(
                aiormq.exceptions.ChannelNotFoundEntity(f"NOT_FOUND - no queue '{queue}'")
            ) from None
        self._consumers.append(consumer)

    def _run(self, loop: asyncio.AbstractEventLoop, callback: Coroutine[Any, Any, Any]) -> None:
        # In delivery order, as aiormq runs a consumer's callbacks.
        task = loop.create_task(callback)
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, **_: Any) -> None:
        self._check_open()
        if multiple:
            tags = sorted(tag for tag in self._deliveries if tag <= delivery_tag)
        else:
            tags = [delivery_tag]
        for tag in tags:
            delivery = self._deliveries.pop(tag, None)
            if delivery is None:
                raise self._fail(
                    aiormq.exceptions.ChannelPreconditionFailed(
                        f"PRECONDITION_FAILED - unknown delivery tag {tag}"
                    )
                )
            self.broker.settle(delivery, "ack")

    async def basic_publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: spec.Basic.Properties | None = None,
        mandatory: bool = False,
        timeout: float | None = None,
        **_: Any,
    ) -> None:
        """Route and store at once; raises `Unroutable` or `PublishNacked` as amqtask's publish
        does for a returned or refused message, or the failure `TestApp.fail_next_publish`
        armed for a task message."""
        self._check_open()
        message = _outgoing(body, properties)
        reply_to = message.reply_to
        if reply_to == DIRECT_REPLY_TO:
            if self._reply_address is None:
                raise self._fail(
                    aiormq.exceptions.ChannelPreconditionFailed(
                        "PRECONDITION_FAILED - fast reply consumer does not exist"
                    )
                )
            reply_to = self._reply_address
        if exchange and exchange not in self.broker.exchanges and not self.publisher_confirms:
            # Nothing waits for a confirm: RabbitMQ closes the channel (404) after the publish.
            self._fail(
                aiormq.exceptions.ChannelNotFoundEntity(f"NOT_FOUND - no exchange '{exchange}'")
            )
            return
        task = message.headers.get("amqtask-task")
        name = task if isinstance(task, str) else "amqp"
        failure = self.broker.take_failure(name) if isinstance(task, str) else None
        if failure is not None:
            if failure.stored:
                self.broker.publish(exchange, routing_key, message, task=name, mandatory=mandatory)
            raise failure.make(name, message.message_id)
        self.broker.publish(
            exchange, routing_key, message, task=name, mandatory=mandatory, reply_to=reply_to
        )
        await asyncio.sleep(0)  # a confirmed publish waits for the broker


class AmqpConnection:
    """A connection to the in-memory broker: channels, and closing them all at once."""

    def __init__(self, broker: MemoryBroker, *, name: str) -> None:
        self.broker = broker
        self.name = name
        self.close_callbacks = _Callbacks()
        self.is_closed = False
        self._channels: list[AmqpChannel] = []

    def channel(self, *, publisher_confirms: bool = True, **_: Any) -> AmqpChannel:
        if self.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the connection is closed")
        channel = AmqpChannel(self, publisher_confirms=publisher_confirms)
        self._channels.append(channel)
        return channel

    async def close(self, exc: BaseException | None = None) -> None:
        """Close every channel (their unacked deliveries go back to their queues), then the
        connection."""
        if self.is_closed:
            return
        self.is_closed = True
        for channel in self._channels:
            channel._closed(exc)
        self.close_callbacks(self, exc)

    def __repr__(self) -> str:
        return f"<AmqpConnection {self.name!r} on the in-memory broker>"
