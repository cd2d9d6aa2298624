"""A publish's AMQP frames, built in one pass, and a publisher that writes a loop turn's
publishes to the socket together.

aiormq's `basic_publish` builds pamqp objects for the method and the header, marshals them
through pamqp's generic encoders, takes the channel's lock and puts each message on the
connection's write queue (ten frames deep) on its own: with a hundred sends in flight that is
most of a send's CPU, a wake-up of the writer task and a `send()` system call per message.
`Publisher` encodes what amqtask sends (short-string properties, a header table of text and
numbers) straight to bytes, numbers the message as aiormq does (its delivery tag, its
confirmation future in the channel's table, so aiormq's reader settles it: acks, nacks,
returns and a closing channel alike) and appends it to a buffer that goes to the write queue
as one frame batch at the end of the loop turn. Everything else (a header value of another
type, a string too long for its field) is encoded by pamqp, byte for byte as before.

A batch goes to the writer under the channel's lock, as aiormq's publish does (a close holds
it: nothing goes out on a channel being closed, nor on one the broker closed and aiormq has
not finished closing), and only once the batch before it is in the socket's buffer: while the
broker does not read (a memory alarm blocks publishers), sends wait for their confirms and
what they wrote stays bounded by the sends in flight. A send that times out or is cancelled
once numbered still goes out (`PublishTimeout` says it may be delivered).

The delivery tag is taken when the message enters the buffer, so every publish on a channel
must go through its `Publisher`: the transport's publish and request channels and the
scheduler's records channel do.
"""

from __future__ import annotations

import asyncio
import struct
import weakref
from collections.abc import Mapping
from contextlib import suppress
from functools import partial
from typing import Any, cast

import aiormq
import aiormq.abc
import structlog
from pamqp import constants as pamqp_constants
from pamqp import encode as pamqp_encode
from pamqp import frame as pamqp_frame
from pamqp.header import ContentHeader

from amqtask._codec import Outgoing

log = structlog.get_logger("amqtask.transport")

_FRAME_END = b"\xce"
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME_OVERHEAD = _FRAME_HEAD.size + len(_FRAME_END)
_PUBLISH_METHOD = struct.pack(">HHH", 60, 40, 0)  # basic.publish, reserved ticket
_HEADER_START = struct.Struct(">HHQH")  # class basic, weight 0, body size, property flags
_LONG = struct.Struct(">I")
_EXCHANGE_NAME = pamqp_constants.DOMAIN_REGEX["exchange-name"]

# Property flags of basic.properties, in the order their values follow the flags.
_CONTENT_TYPE = 1 << 15
_CONTENT_ENCODING = 1 << 14
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_CORRELATION_ID = 1 << 10
_REPLY_TO = 1 << 9
_EXPIRATION = 1 << 8
_MESSAGE_ID = 1 << 7
_TYPE = 1 << 5


class _NotPlain(Exception):
    """A value the short path does not encode: pamqp encodes the whole header frame."""


def _short(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise _NotPlain
    return bytes((len(data),)) + data


def _table(headers: Mapping[str, Any]) -> bytes:
    """A field table of text and integer values, as pamqp encodes it (keys sorted)."""
    parts = []
    for key in sorted(headers):
        value = headers[key]
        name = key.encode()
        if len(name) > 128:  # pamqp cuts it, with a warning
            raise _NotPlain
        parts.append(bytes((len(name),)) + name)
        if type(value) is str:
            data = value.encode()
            parts.append(b"S" + _LONG.pack(len(data)) + data)
        elif type(value) is int:
            parts.append(pamqp_encode.table_integer(value))
        else:
            raise _NotPlain
    data = b"".join(parts)
    return _LONG.pack(len(data)) + data


def _encoded_properties(message: Outgoing) -> tuple[int, bytes]:
    """The property flags and values of `message`, or `_NotPlain`."""
    flags, parts = 0, []
    if message.content_type:
        flags |= _CONTENT_TYPE
        parts.append(_short(message.content_type))
    if message.content_encoding:
        flags |= _CONTENT_ENCODING
        parts.append(_short(message.content_encoding))
    if message.headers is not None:
        flags |= _HEADERS
        parts.append(_table(message.headers))
    flags |= _DELIVERY_MODE
    parts.append(b"\x02" if message.persistent else b"\x01")
    if message.correlation_id:
        flags |= _CORRELATION_ID
        parts.append(_short(message.correlation_id))
    if message.reply_to:
        flags |= _REPLY_TO
        parts.append(_short(message.reply_to))
    if message.expiration is not None:
        flags |= _EXPIRATION
        parts.append(_short(expiration_text(message.expiration)))
    if message.message_id:
        flags |= _MESSAGE_ID
        parts.append(_short(message.message_id))
    if message.type:
        flags |= _TYPE
        parts.append(_short(message.type))
    return flags, b"".join(parts)


def expiration_text(seconds: float) -> str:
    """The AMQP `expiration` property: whole milliseconds, as text."""
    return str(int(seconds * 1000))


def properties(message: Outgoing) -> aiormq.spec.Basic.Properties:
    """The AMQP properties of `message` as pamqp's object: persistent unless it says otherwise."""
    expiration = message.expiration
    return aiormq.spec.Basic.Properties(
        content_type=message.content_type,
        headers=message.headers,
        delivery_mode=2 if message.persistent else 1,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=None if expiration is None else expiration_text(expiration),
        message_id=message.message_id,
        content_encoding=message.content_encoding,
        message_type=message.type,  # AMQP `type`
    )


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(kind, channel, len(payload)) + payload + _FRAME_END


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    message: Outgoing,
    *,
    mandatory: bool,
    frame_max: int,
) -> bytes:
    """The method, header and body frames of a basic.publish of `message`, as bytes.

    Raises `ValueError` for a routing key over 255 bytes or an exchange name pamqp refuses,
    and pamqp's `TypeError` for a header value AMQP cannot carry.
    """
    exchange_name, key = exchange.encode(), routing_key.encode()
    if len(key) > 255:
        raise ValueError(f"routing key over 255 bytes: {routing_key[:40]!r}...")
    if len(exchange_name) > 127 or not _EXCHANGE_NAME.fullmatch(exchange):
        raise ValueError(f"invalid exchange name {exchange[:140]!r}")  # as pamqp checks it
    method = b"".join(
        (
            _PUBLISH_METHOD,
            bytes((len(exchange_name),)),
            exchange_name,
            bytes((len(key),)),
            key,
            b"\x01" if mandatory else b"\x00",
        )
    )
    body = message.body
    try:
        flags, values = _encoded_properties(message)
        header = _frame(_HEADER, channel, _HEADER_START.pack(60, 0, len(body), flags) + values)
    except _NotPlain:
        header = pamqp_frame.marshal(ContentHeader(0, len(body), properties(message)), channel)
    frames = [_frame(_METHOD, channel, method), header]
    room = frame_max - _FRAME_OVERHEAD
    frames.extend(_frame(_BODY, channel, body[at : at + room]) for at in range(0, len(body), room))
    return b"".join(frames)


class Publisher:
    """Publishes on one aiormq channel, a loop turn's messages in one write.

    The channel must publish through this alone (see the module's docstring).
    """

    def __init__(self, channel: aiormq.Channel) -> None:
        # A weak reference: `_PUBLISHERS` keeps this as long as the channel lives, no longer.
        self._channel_ref = weakref.ref(channel)
        self._frame_max = channel.connection.connection_tune.frame_max or 131072
        self._pending: list[bytes] = []
        self._flushing = False  # a flush is scheduled or under way
        self._written: asyncio.Future[None] | None = None  # the last batch's

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        *,
        mandatory: bool,
        timeout: float | None,
    ) -> None:
        """Publish `message` and wait (up to `timeout`) for the broker's confirm; on a channel
        without confirms, return once the frames are queued for the socket.

        Raises as aiormq's `basic_publish` does: `PublishError` (returned), `DeliveryError`
        (nacked), `TimeoutError`, the channel's or connection's closing error.
        """
        channel = self._channel_ref()
        if channel is not None and not channel.publisher_confirms:
            frames = self._frames(channel, exchange, routing_key, message, mandatory)
            # At once, not at the end of the turn: a reply goes out ahead of its request's ack.
            await self._write_now(frames)
            return
        confirmation = self.start(exchange, routing_key, message, mandatory=mandatory)
        async with asyncio.timeout(timeout):
            await confirmation

    def start(
        self, exchange: str, routing_key: str, message: Outgoing, *, mandatory: bool
    ) -> asyncio.Future[Any]:
        """Publish `message` on this confirming channel without waiting: it goes out at the end
        of the loop turn. Returns its confirmation, which aiormq's reader settles: the broker's
        ack, or `PublishError` (returned), `DeliveryError` (nacked), the closing error.

        Raises `ChannelInvalidStateError` on a closed channel, `ValueError` and `TypeError` for
        a message AMQP cannot carry (see `publish_frames`).
        """
        channel = self._channel_ref()
        if channel is None or not channel.publisher_confirms:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed or unconfirmed")
        if not message.message_id:
            # A returned message finds its send by its id.
            raise ValueError("a confirmed publish needs a message id")
        frames = self._frames(channel, exchange, routing_key, message, mandatory)
        confirmation = channel.create_future()
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        message_id = message.message_id
        channel.confirmations[tag] = confirmation
        # Where a returned (mandatory, unroutable) message finds its confirmation.
        channel.message_id_delivery_tag[message_id] = tag
        confirmation.add_done_callback(partial(_forget, self._channel_ref, message_id, tag))
        self._write(frames)
        return confirmation

    def _frames(
        self,
        channel: aiormq.Channel,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        mandatory: bool,
    ) -> bytes:
        if _ended(channel):
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        return publish_frames(
            channel.number,
            exchange,
            routing_key,
            message,
            mandatory=mandatory,
            frame_max=self._frame_max,
        )

    async def _write_now(self, frames: bytes) -> None:
        channel = self._channel_ref()
        if channel is None or _ended(channel):
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        batch = aiormq.abc.ChannelFrame(frames, should_close=False)
        if not _lock_of(channel).locked():
            with suppress(asyncio.QueueFull):
                channel.write_queue.put_nowait(batch)
                return
        async with channel.lock:  # raises once the channel is closed
            await _queue(channel, batch)

    def _write(self, frames: bytes) -> None:
        self._pending.append(frames)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _batch(self, channel: aiormq.Channel) -> aiormq.abc.ChannelFrame:
        """What is pending, as one frame batch whose writing `_written` tells."""
        # Set by the writer once the batch is in the socket's buffer (never failed: a closing
        # channel ends `_flush_later`, which waits for it).
        self._written = asyncio.get_running_loop().create_future()
        batch = aiormq.abc.ChannelFrame(
            b"".join(self._pending), should_close=False, drain_future=self._written
        )
        self._pending.clear()
        return batch

    def _flush(self) -> None:
        channel = self._channel_ref()
        if channel is None or _ended(channel):
            # Its confirmations are failed by its closing; nothing may go out on it now.
            self._pending.clear()
            self._flushing = False
            return
        written = self._written
        if (
            (written is not None and not written.done())  # the broker reads slowly
            or _lock_of(channel).locked()  # the channel is closing (or in another call)
            or channel.write_queue.full()  # the writer is behind
        ):
            channel.create_task(self._flush_later(channel))  # its closing ends the wait
            return
        channel.write_queue.put_nowait(self._batch(channel))
        self._flushing = False

    async def _flush_later(self, channel: aiormq.Channel) -> None:
        """Hand what is pending to the writer once the last batch is in the socket's buffer,
        holding the channel's lock as aiormq's publish does. A close takes that lock too: what
        is pending then never goes out, and the closing fails its confirmations."""
        try:
            while self._pending:
                if self._written is not None:
                    await self._written
                async with channel.lock:  # raises once the channel is closed
                    await _queue(channel, self._batch(channel))
        except Exception as exc:  # the channel closed: thrown in by its closing, or seen above
            self._pending.clear()
            log.debug("publish_flush_ended", error=repr(exc))
        finally:
            self._flushing = False


def _forget(channel_ref: weakref.ref[aiormq.Channel], message_id: str, tag: int, _: object) -> None:
    """A settled send no longer needs its returned message to find it."""
    channel = channel_ref()
    if channel is not None and channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


async def _queue(channel: aiormq.Channel, batch: aiormq.abc.ChannelFrame) -> None:
    """Put `batch` on the connection's write queue unless `channel` has ended, both decided in
    one step: a put that waited for room could land after a close-ok queued meanwhile.

    Raises `ChannelInvalidStateError` (the batch is dropped) once the channel has ended.
    """
    pause = 0.001
    while not _ended(channel):
        try:
            channel.write_queue.put_nowait(batch)
            return
        except asyncio.QueueFull:  # the writer is behind: the socket's buffer is full
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
    if batch.drain_future is not None:
        batch.drain_future.cancel()  # never written
    raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")


def _ended(channel: aiormq.Channel) -> bool:
    """Whether `channel` is closed or closing. When the broker closes a channel (a send to an
    exchange that does not exist: 404), aiormq queues the close-ok at once but marks the channel
    closed only once it has finished closing it; a frame written after that close-ok would
    make the broker close the whole connection (504). aiormq's acks check the same event."""
    return (
        channel.is_closed
        or cast(
            asyncio.Event,
            channel._Channel__close_event,  # type: ignore[attr-defined]
        ).is_set()
    )


def _lock_of(channel: aiormq.Channel) -> asyncio.Lock:
    """The lock aiormq's publish and its channel calls (a close among them) hold: `lock` is a
    context manager that also refuses a closed channel."""
    return cast(asyncio.Lock, channel._Channel__lock)  # type: ignore[attr-defined]


_PUBLISHERS: weakref.WeakKeyDictionary[aiormq.Channel, Publisher] = weakref.WeakKeyDictionary()


def publisher(channel: aiormq.Channel) -> Publisher | BasicPublisher:
    """The `Publisher` of `channel` (made on first use); for a channel that is not aiormq's (the
    in-memory broker's of `amqtask.testing`), one that calls its `basic_publish`."""
    if not isinstance(channel, aiormq.Channel):
        return BasicPublisher(channel)
    found = _PUBLISHERS.get(channel)
    if found is None:
        found = _PUBLISHERS[channel] = Publisher(channel)
    return found


class BasicPublisher:
    """Publishes through the channel's own `basic_publish`."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        *,
        mandatory: bool,
        timeout: float | None,
    ) -> None:
        await self._channel.basic_publish(
            message.body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties(message),
            mandatory=mandatory,
            timeout=timeout,
        )

    def start(
        self, exchange: str, routing_key: str, message: Outgoing, *, mandatory: bool
    ) -> asyncio.Future[Any]:
        """`publish` in a task of its own, which settles as `Publisher.start`'s confirmation."""
        return asyncio.ensure_future(
            self.publish(exchange, routing_key, message, mandatory=mandatory, timeout=None)
        )
