"""The transport seam: what the app and the worker need of a broker, and its aio-pika version.

Publishing and consuming use separate channels of one robust connection: a slow consumer never
holds up publishes, and a channel closed by a consume-side error does not fail in-flight confirms.
Calls have a channel of their own (see `ReplyChannel`).

Given several URLs (a cluster's nodes), the robust connection moves to the next one each time a
node fails (`amqtask._failover`); channels and consumers are restored on the new node.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

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

from amqtask import _consume, _wire
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
from amqtask._failover import RECONNECT_BACKOFF, Failover, HostCycle
from amqtask._startup import Backoff
from amqtask._urls import (
    password_of,
    safe_url,
    safe_urls,
    split_urls,
    url_problem,
    user_of,
    vhost_of,
)

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
# Told why the broker refused a request whose confirm nobody waited for (`ReplyChannel.request`).
OnRefused = Callable[[BaseException], None]


class ReplyChannel(Protocol):
    """Publishes call requests and receives their replies, addressed to `reply_to`.

    `on_reply` gets every reply; `on_lost` is told when replies to requests already published
    can no longer arrive (the channel or connection closed). Later requests work again.

    `request` returns once the broker confirmed the request; given `on_refused`, once it is
    published, and the error the confirm would have raised goes to `on_refused` instead.
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
        on_refused: OnRefused | None = None,
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
    async def reply(self, reply_to: str, message: Outgoing, *, task: str) -> None:
        """Publish the reply to a call, addressed to the request's `reply_to`: not mandatory,
        not confirmed (at most once)."""
        ...

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


async def _publish(
    channel: AbstractChannel,
    exchange: str,
    routing_key: str,
    message: Outgoing,
    *,
    task: str,
    timeout: float | None,
    mandatory: bool,
    underlay: aiormq.Channel | None = None,
) -> None:
    """Publish on `channel` (on `underlay`, its AMQP channel, when given) and wait for the
    broker's confirm.

    What aio-pika's `Exchange.publish` does, through `_wire.Publisher`: frames encoded in one
    pass, a loop turn's publishes written together once the batch before them is in the
    socket's buffer. The timeout covers a connection the broker blocks, the write and the
    confirm.
    """
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    try:
        if underlay is None:
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        await _wire.publisher(underlay).publish(
            exchange, routing_key, message, mandatory=mandatory, timeout=timeout
        )
    except _REFUSALS as exc:
        if not _refuses(exc, exchange):
            raise  # cut off with its channel: the callers' "may or may not be stored"
        raise _refusal(exc, channel, exchange, routing_key, message, task, timeout) from None


# How the broker refuses a publish (returned, no such exchange, nacked) and a publish timing out.
_REFUSALS = (
    aio_pika.exceptions.PublishError,
    aiormq.exceptions.ChannelNotFoundEntity,
    aio_pika.exceptions.DeliveryError,
    TimeoutError,
)

# RabbitMQ's text for a publish to an exchange that does not exist (404).
_MISSING_EXCHANGE = re.compile(r"no exchange '([^']*)'")


def _refuses(exc: BaseException, exchange: str) -> bool:
    """Whether `exc`, the failure of a publish to `exchange`, refuses that publish.

    A publish to an exchange that does not exist makes the broker close the channel, and every
    send on it then fails with that 404: only the one to the exchange it names was refused, the
    others were cut off with the channel (stored or not).
    """
    if not isinstance(exc, _REFUSALS):
        return False
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
        named = _MISSING_EXCHANGE.search(str(exc.args[0]) if exc.args else "")
        return named is None or named.group(1) == exchange
    return True


def _refusal(
    exc: BaseException,
    channel: AbstractChannel,
    exchange: str,
    routing_key: str,
    message: Outgoing,
    task: str,
    timeout: float | None,
) -> BaseException:
    """What `_publish` raises for one of `_REFUSALS`."""
    message_id = message.message_id
    match exc:
        case aio_pika.exceptions.PublishError():
            return Unroutable(
                f"task {task!r}: no queue is bound to exchange {exchange!r} with routing key "
                f"{routing_key!r}; the message was returned, not stored. "
                "Run `amqtask declare MODULE:APP` to create the topology.",
                task=task,
                message_id=message_id,
            )
        case aiormq.exceptions.ChannelNotFoundEntity():
            # The broker closed the channel (404); the robust channel reopens it for the next send.
            return Unroutable(
                f"task {task!r}: exchange {exchange!r} does not exist; the message was not "
                "stored. Run `amqtask declare MODULE:APP` to create the topology.",
                task=task,
                message_id=message_id,
            )
        case aio_pika.exceptions.DeliveryError():
            return PublishNacked(
                f"task {task!r}: the broker refused message {message_id} "
                f"({type(exc.frame).__name__})",
                task=task,
                message_id=message_id,
            )
    return PublishTimeout(
        f"task {task!r}: no confirm for message {message_id} within {timeout} s: "
        f"{_why_unconfirmed(channel)}; it may still be delivered",
        task=task,
        message_id=message_id,
    )


def _why_unconfirmed(channel: AbstractChannel) -> str:
    """Why a publish got no confirm: the broker blocks this connection (an alarm), or not."""
    blocked = _blocked(channel)
    if blocked:
        return (
            "the broker is blocking publishers (a memory or disk alarm: `rabbitmqctl status` "
            "shows it)"
        )
    unavailable = (
        "its queue may be unavailable (a quorum queue without a leader, e.g. one that lost "
        "the majority of its nodes: `amqtask status` shows it), or the broker is overloaded"
    )
    if blocked is None:
        return unavailable + ", or it is blocking publishers (a memory or disk alarm)"
    return unavailable


def _blocked(channel: AbstractChannel) -> bool | None:
    """Whether the broker blocks `channel`'s connection (`connection.blocked`); None if unknown.

    aiormq tracks the state in a private event and offers no public reading of it; should that
    change, this says "unknown" rather than something wrong.
    """
    transport = getattr(channel, "_connection", None)
    transport = getattr(transport, "transport", None)
    unblocked = getattr(
        getattr(transport, "connection", None), "_Connection__connection_unblocked", None
    )
    if not isinstance(unblocked, asyncio.Event):
        return None
    return not unblocked.is_set()


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


def _lost_request(exc: BaseException, message: Outgoing, task: str) -> ConnectionLost:
    return ConnectionLost(
        f"task {task!r}: the connection to the broker dropped before the request was "
        f"confirmed ({type(exc).__name__}); it may or may not have been processed",
        task=task,
        correlation_id=message.correlation_id or message.message_id,
    )


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
        on_refused: OnRefused | None = None,
    ) -> None:
        """Publish a request (mandatory, confirmed) once the reply consumer runs.

        Waits while the connection is being restored (the caller bounds the wait). Raises like
        `publish`, and `ConnectionLost` when the connection drops before the confirm. Given
        `on_refused`, returns without waiting for the confirm, and hands it what would have
        been raised (`Unroutable`, `PublishNacked`, `ConnectionLost`).
        """
        channel, underlay = await self._ready()
        # Only now, and with no await before the publish: a call still waiting for the channel
        # is not among those a closing channel fails, so it is never both failed and published,
        # and a request never goes out on a channel without the reply consumer.
        before_publish()
        if on_refused is not None:
            try:
                confirmation = _wire.publisher(underlay).start(
                    exchange, routing_key, message, mandatory=True
                )
            except _LOST_ERRORS as exc:
                raise _lost_request(exc, message, task) from exc
            confirmation.add_done_callback(
                partial(
                    self._confirm_done, on_refused, channel, exchange, routing_key, message, task
                )
            )
            return
        pause = 0.05
        while True:
            try:
                await self._confirmed(channel, underlay, exchange, routing_key, message, task=task)
                return
            except PublishNacked:
                # In a cluster a queue refuses requests while it has no leader (its node died a
                # moment ago), and a channel opened in that moment goes on refusing: try again,
                # on a new channel, until the caller's timeout.
                await self._renew(channel)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            channel, underlay = await self._ready()

    async def _renew(self, refused: AbstractRobustChannel) -> None:
        """Publish requests on a new channel from now on; `refused` keeps consuming the replies
        of its calls in flight for `_RETIRE_AFTER` seconds, then closes without failing any."""
        async with self._opening:
            if self._channel is not refused:
                return  # renewed already
            self._channel, self._consuming = None, None
        refused.close_callbacks.discard(self._closed)
        self._transport.retire(refused, after=_RETIRE_AFTER)

    @staticmethod
    def _confirm_done(
        on_refused: OnRefused,
        channel: AbstractRobustChannel,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        task: str,
        confirmation: asyncio.Future[Any],
    ) -> None:
        if confirmation.cancelled() or (exc := confirmation.exception()) is None:
            return
        if _refuses(exc, exchange):
            on_refused(_refusal(exc, channel, exchange, routing_key, message, task, None))
        elif isinstance(exc, ValueError | TypeError):
            on_refused(exc)  # a message AMQP cannot carry (raised late by in-memory channels)
        else:
            # Its channel or connection closed: aiormq fails the confirmations still due with
            # the reason, or `CancelledError` or a bare `Exception` when none was given.
            on_refused(_lost_request(exc, message, task))

    async def _confirmed(
        self,
        channel: AbstractRobustChannel,
        underlay: aiormq.Channel,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        *,
        task: str,
    ) -> None:
        try:
            await _publish(
                channel,
                exchange,
                routing_key,
                message,
                task=task,
                timeout=None,
                mandatory=True,
                underlay=underlay,
            )
        except _LOST_ERRORS as exc:
            raise _lost_request(exc, message, task) from exc

    async def _ready(self) -> tuple[AbstractRobustChannel, aiormq.Channel]:
        """The request channel and the AMQP channel under it, on which the reply consumer runs."""
        channel = self._channel
        if channel is not None:
            await channel.ready()  # waits while the connection is being restored
            underlay = await channel.get_underlay_channel()
            if underlay is self._consuming:
                return channel, cast(aiormq.Channel, underlay)
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
            return channel, cast(aiormq.Channel, underlay)

    async def _deliver(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._on_reply(_Reply(message.body, message.header.properties))

    def _closed(self, _channel: object, exc: BaseException | None) -> None:
        self._consuming = None
        self._on_lost(exc)


class _Reply:
    """A reply as the caller reads it (a `Delivery`): its properties are read from the frame's
    when asked for. aio-pika's `IncomingMessage` would parse and check every one of them again,
    on every call, for the two or three that `decode_reply` reads."""

    __slots__ = ("_properties", "body")

    redelivered = False

    def __init__(self, body: bytes, properties: aiormq.spec.Basic.Properties) -> None:
        self.body = body
        self._properties = properties

    @property
    def headers(self) -> Mapping[str, Any]:
        return self._properties.headers or {}

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self._properties.content_encoding

    @property
    def correlation_id(self) -> str | None:
        return self._properties.correlation_id

    @property
    def reply_to(self) -> str | None:
        return self._properties.reply_to


_RETIRE_AFTER = 30.0  # seconds a refused channel stays open for its other confirms or replies
_BACKGROUND_ERRORS: tuple[type[BaseException], ...] = (*_LOST_ERRORS, TimeoutError)


async def _close_when_idle(channel: AbstractRobustChannel, after: float | None = None) -> None:
    """Close `channel` once no confirm is pending on it (at most `_RETIRE_AFTER` seconds), or
    after `after` seconds."""
    with suppress(*_LOST_ERRORS, TimeoutError):
        if after is not None:
            await asyncio.sleep(after)
        else:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), 1)
            confirmations = getattr(underlay, "confirmations", {})
            pending = [f for f in confirmations.values() if isinstance(f, asyncio.Future)]
            if pending:
                await asyncio.wait(pending, timeout=_RETIRE_AFTER)
        await channel.close()


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


def broker_closed(exc: BaseException) -> str | None:
    """`exc` in words when the broker itself closed the connection with an error code (it was
    reachable: this is not a connect failure); None for anything else."""
    if not isinstance(exc, aiormq.exceptions.ConnectionClosed) or type(exc) in (
        aiormq.exceptions.ConnectionClosed,  # aiormq's own, also for a normal close
    ):
        return None
    text = " ".join(str(exc.args[-1] if exc.args else exc).split())
    if isinstance(exc, aiormq.exceptions.ConnectionInternalError):
        return (
            f"the broker closed the connection with 541 {text}: in a cluster, a node answers so "
            "when a quorum queue has lost its quorum (most of its nodes down) and cannot serve "
            "it; `amqtask status APP --management-url URL` shows each queue's members online"
        )
    return f"the broker closed the connection: {type(exc).__name__}: {text}"


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


def _short(error: ConnectError) -> str:
    """What went wrong at one URL, in a few words."""
    if isinstance(error, BrokerUnreachable | InvalidURL):
        return error.reason
    if isinstance(error, ConnectTimeout):
        return f"no AMQP handshake within {error.timeout:g} s"
    if isinstance(error, AuthenticationFailed):
        return f"authentication failed for user {error.user!r}"
    if isinstance(error, VhostRefused):
        return f"virtual host {error.vhost!r} refused to user {error.user!r}"
    return type(error).__name__


def all_failed(errors: Sequence[ConnectError], urls: Sequence[str]) -> ConnectError:
    """One error for a connect that failed at each of `urls` (`errors`, in the order tried).

    With one URL, or when every URL refused for the same reason waiting cannot fix (credentials,
    vhost, a malformed URL), that error; otherwise a `BrokerUnreachable` naming each URL and its
    failure, caused by the first failure waiting may fix (so a starting worker keeps waiting).
    """
    if len(errors) == 1:
        return errors[0]
    kinds = {type(error) for error in errors}
    final = (AuthenticationFailed, VhostRefused, InvalidURL)
    if len(kinds) == 1 and issubclass(kinds.pop(), final):
        return errors[0]
    combined = BrokerUnreachable(
        url=safe_urls(urls),
        reason="; ".join(f"{error.url}: {_short(error)}" for error in errors),
    )
    retryable = [error for error in errors if not isinstance(error, final)]
    combined.__cause__ = (retryable or errors)[0].__cause__
    return combined


async def open_connection(
    url: str | Sequence[str], *, name: str, timeout: float
) -> AbstractConnection:
    """A plain (not robust) connection to the first of the URLs in `url` that answers (a URL,
    a list, or URLs separated by `,` or `;`), each tried in turn within `timeout` seconds.

    Raises a `ConnectError` (`BrokerUnreachable`, `ConnectTimeout`, `AuthenticationFailed`,
    `VhostRefused`, `InvalidURL`; see `all_failed` for several URLs); none shows a password.
    """
    urls = split_urls(url)
    errors: list[ConnectError] = []
    for candidate in urls:
        try:
            connection = aio_pika.Connection(
                _amqp_url(candidate), client_properties={"connection_name": name}
            )
            async with _connecting(connection, candidate, timeout):
                await connection.connect(timeout=timeout)
        except ConnectError as exc:
            errors.append(exc)
            continue
        return connection
    raise all_failed(errors, urls)


async def open_own_connection(
    transport: object, url: str | Sequence[str], *, name: str, timeout: float
) -> AbstractConnection:
    """A connection of its own, for code that speaks AMQP itself (the scheduler, `amqtask
    schedules`): from the app's transport when it opens such connections (the in-memory
    broker's `MemoryTransport`), else `open_connection(url, ...)`."""
    own = getattr(transport, "open_connection", None)
    if own is not None:
        connection: AbstractConnection = await own(name=name)
        return connection
    return await open_connection(url, name=name, timeout=timeout)


class _FailoverConnection(aio_pika.RobustConnection):
    """A robust connection that reconnects to the next URL of its `HostCycle` whenever its node
    fails, pausing as the cycle says.

    aio-pika's reconnect loop calls `_on_connection_close` for a lost connection and for every
    failed attempt, connects to `self.url` on each attempt, and sleeps `reconnect_interval`
    after a failed one: the cycle supplies the URL and the pause. Until `fail_over()` (the
    first connect), failures leave the cycle alone: the transport tries the URLs itself then.
    """

    def __init__(self, cycle: HostCycle, **kwargs: Any) -> None:
        self._cycle = cycle
        self._failing_over = False
        super().__init__(_amqp_url(cycle.current), **kwargs)

    @property
    def reconnect_interval(self) -> float:
        return self._cycle.pause

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        # A URL's `reconnect_interval` (aio-pika's fixed pause, 5 s unless given) caps the backoff.
        if value > 0:
            self._cycle.backoff = Backoff(first=min(RECONNECT_BACKOFF.first, value), cap=value)

    def fail_over(self) -> None:
        """Connected: from now on each failure moves to the next URL."""
        self._failing_over = True
        self._cycle.connected()

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        await super()._on_connection_close(closing)  # close callbacks still see the lost URL
        if self._failing_over and not (self.close_called or self.is_closed):
            self._cycle.failed()
            self.url = _amqp_url(self._cycle.current)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        if self._failing_over:
            self._cycle.connected()


class AioPikaTransport:
    """`Transport` over one aio-pika robust connection (reconnects and restores consumers).

    `url` is one broker URL or several (a list, or separated by `,` or `;`): the nodes of one
    cluster, tried in the `failover` order at start and on every reconnect. Connecting, and each
    reconnect attempt, is bounded by `connect_timeout` seconds.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        name: str = "amqtask",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        failover: Failover | str = Failover.ORDER,
    ) -> None:
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        self.urls = split_urls(url)
        self.url = self.urls[0]
        self._cycle = HostCycle(self.urls, failover)
        self.name = name
        self.connect_timeout = connect_timeout
        self._down_since: float | None = None  # monotonic time the connection was lost
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._reply_channel: AbstractRobustChannel | None = None  # a worker's, without confirms
        self._renewing = asyncio.Lock()
        self._opening_replies = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()  # refused channels closing once idle
        self._consumers: list[_consume.Consumer] = []

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise NotConnected("not connected: use `async with app:` (or `await app.connect()`)")
        return self._connection

    @property
    def connected(self) -> bool:
        connection = self._connection
        return connection is not None and connection.connected.is_set()

    def use_urls(self, urls: Sequence[str]) -> None:
        """Connect to these URLs instead; only before `connect`."""
        if self._connection is not None:
            raise ValueError("the connection is open: change the URLs before connecting")
        self.urls = split_urls(urls)
        self.url = self.urls[0]
        self._cycle = HostCycle(self.urls, self._cycle.failover)

    @property
    def current_url(self) -> str:
        """The URL the connection uses now, or tries next while it reconnects."""
        return self._cycle.current

    async def connect(self) -> None:
        """Open the robust connection and its publish channel within `connect_timeout`, at the
        first URL (in the failover order) that answers.

        Raises a `ConnectError` (see `all_failed` for several URLs), and leaves nothing running
        behind it.
        """
        if self._connection is not None:
            return
        for url in self.urls:
            _amqp_url(url)  # a malformed URL fails now, not at a failover
        errors: list[ConnectError] = []
        for url in self._cycle.round():
            self._cycle.start_at(url)
            connection = _FailoverConnection(
                self._cycle, client_properties={"connection_name": self.name}
            )
            try:
                async with _connecting(connection, url, self.connect_timeout):
                    # The timeout given here also bounds every later reconnect attempt.
                    await connection.connect(timeout=self.connect_timeout)
                    self._publish_channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
            except ConnectError as exc:
                errors.append(exc)
                continue
            connection.fail_over()
            connection.close_callbacks.add(self._lost)
            connection.reconnect_callbacks.add(self._restored)
            self._down_since = None
            self._connection = connection
            return
        raise all_failed(errors, self.urls)

    def _lost(self, connection: object, exc: BaseException | None = None) -> None:
        # aio-pika calls this again for each failed reconnect attempt: log the loss once.
        if self._connection is None or self._down_since is not None:
            return  # closed on purpose, or already down
        self._down_since = time.monotonic()
        url = str(getattr(connection, "url", self.url))  # the node just lost
        log.warning(
            "connection_lost",
            url=safe_url(url),
            error=_scrub(_describe(exc), url),
            nodes=len(self.urls),
        )

    def _restored(self, connection: object) -> None:
        since, self._down_since = self._down_since, None
        url = str(getattr(connection, "url", self.url))  # where it reconnected
        log.info(
            "connection_restored",
            url=safe_url(url),
            down_s=None if since is None else round(time.monotonic() - since, 3),
        )

    async def close(self) -> None:
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.flush()  # the acks of the last tasks, before their channels close
        connection, self._connection = self._connection, None
        self._publish_channel = self._reply_channel = None
        for task in self._retiring:
            task.cancel()
        if connection is not None:
            await connection.close()

    async def _renew_publish_channel(self, refused: AbstractRobustChannel) -> None:
        """Publish on a new channel from now on, after `refused` got a nack or no confirm.

        RabbitMQ 3.10: a channel opened while a quorum queue had no leader (the second after its
        node died, when this connection had just failed over) nacks every publish to that queue
        for half a minute and more, while a new channel gets confirms once a leader is elected;
        and a channel whose publishes a queue without quorum never confirmed gets no confirm
        from it either once the quorum is back. The old channel is closed once its other
        confirms are in (or after 30 s), so that publishes in flight on it are not cut off.
        """
        async with self._renewing:
            if self._publish_channel is not refused or self._connection is None:
                return  # renewed already by a concurrent nack, or closing
            fresh = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._publish_channel = fresh
        self.retire(refused)

    def retire(self, channel: AbstractRobustChannel, after: float | None = None) -> None:
        """Close `channel` in the background once idle (see `_close_when_idle`); at `close`
        at the latest."""
        self._background(partial(_close_when_idle, channel, after))

    def _background(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work()` in a task that `close` cancels; its failure is only logged. (A callable,
        not a coroutine: a task cancelled before it starts would leave one never awaited.)"""

        async def run() -> None:
            try:
                async with asyncio.timeout(_RETIRE_AFTER + self.connect_timeout):
                    await work()
            except _BACKGROUND_ERRORS as exc:
                log.debug("channel_renewal_failed", error=repr(exc))

        task = asyncio.create_task(run())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

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
        except (PublishNacked, PublishTimeout):
            # A refused channel, or one whose publishes a leaderless queue never confirms, stays
            # so after the queue recovers: later sends go on a new one, opened in the background.
            # Not while the broker blocks the connection: a new channel would not help.
            if not _blocked(channel):
                self._background(partial(self._renew_publish_channel, channel))
            raise
        except _LOST_ERRORS as exc:
            raise PublishInterrupted(
                f"task {task!r}: the connection dropped before the broker confirmed message "
                f"{message.message_id} ({type(exc).__name__}); it may or may not be stored, and "
                "sending it again may make a duplicate",
                task=task,
                message_id=message.message_id,
            ) from exc

    async def reply(self, reply_to: str, message: Outgoing, *, task: str) -> None:
        """Publish the reply to a call: through the default exchange to the caller's direct
        reply-to address, on a channel without confirms, and returns once the frame is queued
        for the socket (ahead of the request's ack, which the same writer sends later).

        Not `mandatory` (RabbitMQ 3.10 returns those as unroutable) and not confirmed: a reply is
        at most once, and the broker drops one whose caller has gone and confirms it all the
        same, so the confirm would tell nothing and cost the worker a round trip per call.
        Raises `NotConnected`, or aiormq's `ChannelInvalidStateError` while the connection is
        down (the request's ack fails too, and the broker redelivers it).
        """
        channel = self._reply_channel
        if channel is None:
            async with self._opening_replies:
                if self._reply_channel is None:
                    self._reply_channel = await self.connection.channel(publisher_confirms=False)
            channel = self._reply_channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        await _wire.publisher(underlay).publish(
            "", reply_to, message, mandatory=False, timeout=None
        )

    @property
    def header_budget(self) -> int:
        connection = self._connection
        underlay = None if connection is None else connection.transport
        tune = None if underlay is None else getattr(underlay.connection, "connection_tune", None)
        frame_max = getattr(tune, "frame_max", 0) or _DEFAULT_FRAME_MAX
        # The header frame also holds the other properties (short strings) and frame overhead.
        return frame_max - _PROPERTIES_ROOM

    async def consume(self, queue: str, on_message: OnMessage, *, prefetch: int) -> Subscription:
        """Consume `queue` with manual acks on a channel of its own with `prefetch` in flight.

        Deliveries are `amqtask._consume.Delivery`s: acks are batched per channel and written
        within 2 ms; `close` writes those still pending before the connection closes.
        """
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        # A passive declare registers the queue with the robust channel, which then re-consumes
        # it after a reconnect.
        amqp_queue = await channel.declare_queue(queue, passive=True)
        consumer = _consume.Consumer(
            on_message, prefetch=prefetch, settle_timeout=_consume.WRITE_TIMEOUT
        )
        self._consumers.append(consumer)
        return _AioPikaSubscription(amqp_queue, await consumer.start(amqp_queue))

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
        return await open_connection(
            self._cycle.round(), name=self.name, timeout=self.connect_timeout
        )

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
