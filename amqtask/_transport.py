"""The transport seam: what the app and the worker need of a broker, and its aio-pika version.

Publishing and consuming use separate channels of one robust connection: a slow consumer never
holds up publishes, and a channel closed by a consume-side error does not fail in-flight confirms.
Calls have a channel of their own (see `ReplyChannel`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Protocol

import aio_pika
import aio_pika.exceptions
import aiormq.abc
import aiormq.exceptions
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url

from amqtask import topology as topo
from amqtask._codec import Delivery, Outgoing
from amqtask._exceptions import (
    AuthenticationFailed,
    BrokerUnreachable,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    InvalidURL,
    NotConnected,
    PublishInterrupted,
    PublishNacked,
    PublishTimeout,
    Unroutable,
    VhostRefused,
)
from amqtask._urls import password_of, safe_url, url_problem, user_of, vhost_of

if TYPE_CHECKING:
    from yarl import URL

log = structlog.get_logger("amqtask.transport")


class IncomingDelivery(Delivery, Protocol):
    """A delivery the worker settles: ack once done, or reject without requeue."""

    async def ack(self) -> None: ...
    async def reject(self, requeue: bool = False) -> None: ...


OnMessage = Callable[[IncomingDelivery], Awaitable[None]]


class Subscription(Protocol):
    async def cancel(self) -> None: ...


OnReply = Callable[[Delivery], None]
OnLost = Callable[[BaseException | None], None]


class ReplyChannel(Protocol):
    """Publishes call requests and receives their replies, addressed to `reply_to`.

    `on_reply` gets every reply; `on_lost` is told when replies to requests already published
    can no longer arrive (the channel or connection closed). Later requests work again.
    """

    @property
    def reply_to(self) -> str: ...
    async def request(
        self,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        *,
        task: str,
        before_publish: Callable[[], None],
    ) -> None: ...


class Transport(Protocol):
    """What amqtask needs of a broker connection."""

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    @property
    def connected(self) -> bool:
        """Whether the broker connection is up now (False while it reconnects)."""
        ...

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
    @property
    def header_budget(self) -> int:
        """Bytes a published message's headers may take: they travel in one frame, and a frame
        over the negotiated `frame_max` makes the broker close the whole connection."""
        ...

    async def consume(
        self, queue: str, on_message: OnMessage, *, prefetch: int
    ) -> Subscription: ...
    async def plan(self, topology: topo.Topology) -> topo.Plan: ...
    async def apply(self, plan: topo.Plan) -> None: ...
    async def ensure_exists(self, topology: topo.Topology, queues: Iterable[str]) -> None: ...
    def reply_channel(self, on_reply: OnReply, on_lost: OnLost) -> ReplyChannel: ...


# Settling a delivery whose channel died fails with one of these; the broker redelivers it.
SETTLE_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.MessageProcessError,
    ConnectionError,
)


def _properties(message: Outgoing) -> aiormq.spec.Basic.Properties:
    """The AMQP properties of `message`, persistent."""
    expiration = message.expiration
    return aiormq.spec.Basic.Properties(
        content_type=message.content_type,
        headers=message.headers,
        delivery_mode=2,  # persistent
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=None if expiration is None else str(int(expiration * 1000)),  # milliseconds
        message_id=message.message_id,
        content_encoding=message.content_encoding,
        message_type=message.type,  # AMQP `type`
    )


async def _publish(
    channel: AbstractChannel,
    exchange: str,
    routing_key: str,
    message: Outgoing,
    *,
    task: str,
    timeout: float | None,
    mandatory: bool,
) -> None:
    """Publish persistent on `channel` and wait for the broker's confirm.

    What aio-pika's `Exchange.publish` does, without building an `aio_pika.Message` (which checks
    and copies every property again) on each send. The timeout is aiormq's own: it covers a
    connection the broker blocks, the write and the confirm.
    """
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    try:
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(
            message.body,
            exchange=exchange,
            routing_key=routing_key,
            properties=_properties(message),
            mandatory=mandatory,
            timeout=timeout,
        )
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


# A publish cut off by its channel or connection closing, whatever closed it: the message may or
# may not be stored.
_LOST_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.AMQPError,
)

_DEFAULT_FRAME_MAX = 131072  # RabbitMQ's default, also what "no limit" (0) falls back to here
_PROPERTIES_ROOM = 4096

_CANCEL_TIMEOUT = 5.0
_CANCEL_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *SETTLE_ERRORS)


class _AioPikaSubscription:
    def __init__(self, queue: AbstractQueue, tag: str) -> None:
        self._queue, self._tag = queue, tag

    async def cancel(self) -> None:
        """Stop deliveries; the channel stays open so in-flight messages can still be acked.

        Bounded: while the broker is unreachable a robust channel would wait for it forever;
        a consumer of a dead connection gets no deliveries anyway.
        """
        try:
            async with asyncio.timeout(_CANCEL_TIMEOUT):
                await self._queue.cancel(self._tag)
        except _CANCEL_ERRORS as exc:
            log.warning("consumer_cancel_failed", queue=self._queue.name, error=repr(exc))


# RabbitMQ's direct reply-to pseudo-queue: no queue to declare, replies go to the consuming channel.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class _AioPikaReplyChannel:
    """Direct reply-to: one channel with confirms consumes `amq.rabbitmq.reply-to` (no-ack) and
    publishes the requests, since the broker hands a reply to the channel that sent the request.

    Opened at the first request. Publishing with this `reply_to` on a channel that does not
    consume it is a channel error, so before each request we make sure the consumer runs on the
    current AMQP channel: after a reconnect the robust channel reopens as a new AMQP channel
    without it, and the next request starts it again. The old channel's replies are lost, which
    `on_lost` reports when it closes.
    """

    reply_to = DIRECT_REPLY_TO

    def __init__(self, transport: AioPikaTransport, on_reply: OnReply, on_lost: OnLost) -> None:
        self._transport = transport
        self._on_reply, self._on_lost = on_reply, on_lost
        self._channel: AbstractRobustChannel | None = None
        self._consuming: object = None  # the AMQP channel our reply consumer runs on
        self._opening = asyncio.Lock()  # taken only to open the channel or start the consumer

    async def request(
        self,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        *,
        task: str,
        before_publish: Callable[[], None],
    ) -> None:
        """Publish a request (mandatory, confirmed) once the reply consumer runs.

        Waits while the connection is being restored (the caller bounds the wait). Raises like
        `publish`, and `ConnectionLost` when the connection drops before the confirm.
        """
        channel = await self._ready()
        # Only now: a call still waiting for the channel is not among those a closing channel
        # fails, so it is never both failed and published.
        before_publish()
        try:
            await _publish(
                channel, exchange, routing_key, message, task=task, timeout=None, mandatory=True
            )
        except _LOST_ERRORS as exc:
            raise ConnectionLost(
                f"task {task!r}: the connection to the broker dropped before the request was "
                f"confirmed ({type(exc).__name__}); it may or may not have been processed",
                task=task,
                correlation_id=message.correlation_id or message.message_id,
            ) from exc

    async def _ready(self) -> AbstractRobustChannel:
        channel = self._channel
        if channel is not None:
            await channel.ready()  # waits while the connection is being restored
            if await channel.get_underlay_channel() is self._consuming:
                return channel
        async with self._opening:
            if self._channel is None:
                self._channel = await self._transport.connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._channel.close_callbacks.add(self._closed)
            channel = self._channel
            await channel.ready()
            underlay = await channel.get_underlay_channel()
            if underlay is not self._consuming:
                await underlay.basic_consume(DIRECT_REPLY_TO, self._deliver, no_ack=True)
                self._consuming = underlay
            return channel

    async def _deliver(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._on_reply(aio_pika.IncomingMessage(message, no_ack=True))

    def _closed(self, _channel: object, exc: BaseException | None) -> None:
        self._consuming = None
        self._on_lost(exc)


# --- connecting ---------------------------------------------------------------------------------

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds for TCP, TLS and the AMQP handshake together


def connect_error(exc: BaseException, url: str, timeout: float) -> ConnectError | None:
    """The typed error for `exc`, raised while connecting to `url`; None when it is not a
    connect failure (a cancellation, a bug). Its message never holds the URL's password."""
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, TimeoutError):  # before OSError, which it is too
        return ConnectTimeout(url=url, timeout=timeout)
    if isinstance(
        exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError
    ):
        return AuthenticationFailed(url=url, user=user_of(url))
    if isinstance(exc, aiormq.exceptions.ConnectionNotAllowed) or _refused_open(exc):
        return VhostRefused(url=url, user=user_of(url), vhost=vhost_of(url))
    if isinstance(exc, ConnectionError | OSError):
        return BrokerUnreachable(url=url, reason=_scrub(_reason(exc), url))
    if isinstance(exc, ValueError):  # aio-pika's and yarl's URL parsing
        return InvalidURL(url=url, reason=_scrub(str(exc), url))
    return None


def _refused_open(exc: BaseException) -> bool:
    """Whether the broker answered `connection.open` (the vhost) with `connection.close`.

    RabbitMQ does so (530 NOT_ALLOWED) for a vhost that does not exist, one the user has no
    permissions on, or one at its connection limit; aiormq reports it as an unexpected frame and
    drops the broker's text.
    """
    text = str(exc)
    return (
        isinstance(exc, aiormq.exceptions.InvalidFrameError)
        and "Connection.OpenOk" in text
        and "Connection.Close" in text
    )


def _reason(exc: BaseException) -> str:
    """A socket error in words: aiormq wraps them as `(errno, text)`."""
    args = exc.args
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        return os.strerror(args[0]) if args[0] > 0 else args[1]
    return " ".join(str(exc).split()) or type(exc).__name__


def _describe(exc: BaseException | None) -> str:
    return "closed" if exc is None else f"{type(exc).__name__}: {_reason(exc)}"


def _scrub(text: str, url: str) -> str:
    """`text` without `url`'s password, should a library have quoted the URL."""
    password = password_of(url)
    return text.replace(password, "***") if password else text


def _amqp_url(url: str) -> URL:
    problem = url_problem(url)
    if problem is None:
        try:
            return make_url(url)
        except ValueError as exc:
            problem = _scrub(str(exc), url)
    raise InvalidURL(url=url, reason=problem)


@asynccontextmanager
async def _connecting(
    connection: AbstractConnection, url: str, timeout: float
) -> AsyncIterator[None]:
    """Bound the block to `timeout` seconds; on any failure close `connection` (a robust one
    would otherwise keep reconnecting in the background) and raise the typed `ConnectError`."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except BaseException as exc:
        with suppress(Exception):
            await connection.close()
        error = connect_error(exc, url, timeout)
        if error is None:
            raise
        raise error from exc


async def open_connection(url: str, *, name: str, timeout: float) -> AbstractConnection:
    """A plain (not robust) connection to `url`, open within `timeout` seconds.

    Raises a `ConnectError` (`BrokerUnreachable`, `ConnectTimeout`, `AuthenticationFailed`,
    `VhostRefused`, `InvalidURL`); none shows the URL's password.
    """
    connection = aio_pika.Connection(_amqp_url(url), client_properties={"connection_name": name})
    async with _connecting(connection, url, timeout):
        await connection.connect(timeout=timeout)
    return connection


class AioPikaTransport:
    """`Transport` over one aio-pika robust connection (reconnects and restores consumers).

    Connecting, and each reconnect, is bounded by `connect_timeout` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "amqtask",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        self.url = url
        self.name = name
        self.connect_timeout = connect_timeout
        self._down_since: float | None = None  # monotonic time the connection was lost
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise NotConnected("not connected: use `async with app:` (or `await app.connect()`)")
        return self._connection

    @property
    def connected(self) -> bool:
        connection = self._connection
        return connection is not None and connection.connected.is_set()

    async def connect(self) -> None:
        """Open the robust connection and its publish channel within `connect_timeout`.

        Raises a `ConnectError`, and leaves nothing running behind it.
        """
        if self._connection is not None:
            return
        connection = aio_pika.RobustConnection(
            _amqp_url(self.url), client_properties={"connection_name": self.name}
        )
        async with _connecting(connection, self.url, self.connect_timeout):
            # The timeout given here also bounds every later reconnect attempt.
            await connection.connect(timeout=self.connect_timeout)
            self._publish_channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        connection.close_callbacks.add(self._lost)
        connection.reconnect_callbacks.add(self._restored)
        self._down_since = None
        self._connection = connection

    def _lost(self, _connection: object, exc: BaseException | None = None) -> None:
        # aio-pika calls this again for each failed reconnect attempt: log the loss once.
        if self._connection is None or self._down_since is not None:
            return  # closed on purpose, or already down
        self._down_since = time.monotonic()
        log.warning(
            "connection_lost",
            url=safe_url(self.url),
            error=_scrub(_describe(exc), self.url),
            reconnect_in=getattr(self._connection, "reconnect_interval", None),
        )

    def _restored(self, _connection: object) -> None:
        since, self._down_since = self._down_since, None
        log.info(
            "connection_restored",
            url=safe_url(self.url),
            down_s=None if since is None else round(time.monotonic() - since, 3),
        )

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._publish_channel = None
        if connection is not None:
            await connection.close()

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

        While the connection is being restored, waits for it (within `timeout`) and publishes
        then. Raises `Unroutable` (returned by `mandatory`), `PublishNacked`, `PublishTimeout`
        (nothing published when the connection did not come back in time), or
        `PublishInterrupted` when the connection drops after the publish, before the confirm.
        """
        channel = self._publish_channel
        if channel is None:
            raise NotConnected("not connected: use `async with app:` first")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while channel.is_closed:
            # Nothing is published yet, so the outcome is known: wait for the robust channel to
            # be restored rather than fail a send that a reconnect a moment later would take.
            try:
                async with asyncio.timeout_at(deadline):
                    await channel.ready()
                    if channel.is_closed:  # restored and closed again at once: give it a moment
                        await asyncio.sleep(0.05)
            except TimeoutError:
                raise PublishTimeout(
                    f"task {task!r}: the connection to the broker was not restored within "
                    f"{timeout} s; message {message.message_id} was not published",
                    task=task,
                    message_id=message.message_id,
                ) from None
        remaining = None if deadline is None else max(deadline - loop.time(), 0.001)
        # Exchanges are not declared here: `amqtask declare` owns the topology; a missing one
        # surfaces as a channel error on publish.
        try:
            await _publish(
                channel,
                exchange,
                routing_key,
                message,
                task=task,
                timeout=remaining,
                mandatory=mandatory,
            )
        except _LOST_ERRORS as exc:
            raise PublishInterrupted(
                f"task {task!r}: the connection dropped before the broker confirmed message "
                f"{message.message_id} ({type(exc).__name__}); it may or may not be stored, and "
                "sending it again may make a duplicate",
                task=task,
                message_id=message.message_id,
            ) from exc

    @property
    def header_budget(self) -> int:
        connection = self._connection
        underlay = None if connection is None else connection.transport
        tune = None if underlay is None else getattr(underlay.connection, "connection_tune", None)
        frame_max = getattr(tune, "frame_max", 0) or _DEFAULT_FRAME_MAX
        # The header frame also holds the other properties (short strings) and frame overhead.
        return frame_max - _PROPERTIES_ROOM

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
        subscription = _AioPikaSubscription(amqp_queue, tag)
        return subscription

    def reply_channel(self, on_reply: OnReply, on_lost: OnLost) -> ReplyChannel:
        """A channel for calls; it opens (on this transport's connection) at the first request."""
        return _AioPikaReplyChannel(self, on_reply, on_lost)

    async def subscribe_fanout(
        self, exchange: str, queue: str, on_message: Callable[[bytes], None]
    ) -> Subscription:
        """Receive what is published to fanout `exchange` from now on, on `queue`: exclusive to
        this connection, auto-delete, not durable (RabbitMQ 4 accepts transient queues only
        when exclusive), declared again and bound by the robust channel after a reconnect.

        No acks, no redelivery: what arrives while the connection is down is lost, so what such
        messages carry must also be found elsewhere (the task store, for revocations).
        """
        channel = await self.connection.channel(publisher_confirms=False)
        declared = await channel.declare_queue(
            queue, durable=False, exclusive=True, auto_delete=True
        )
        await declared.bind(exchange)

        async def deliver(message: AbstractIncomingMessage) -> None:
            on_message(message.body)

        tag = await declared.consume(deliver, no_ack=True)
        return _AioPikaSubscription(declared, tag)

    async def _plain_connection(self) -> AbstractConnection:
        # Topology probes close channels on purpose (404/406); a plain connection keeps that away
        # from the robust channels' restore logic.
        return await open_connection(self.url, name=self.name, timeout=self.connect_timeout)

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
