"""The worker's consumers on aio-pika: deliveries read straight off aiormq, acks batched.

**Deliveries.** For each delivery aio-pika builds an `IncomingMessage` (every property parsed
and checked again) and runs the callback in a task of its own. The worker reads six properties
and runs each delivery in a task of its own anyway, so once aio-pika has registered the consumer
(and with it its reconnect, restore and recovery logic), `Consumer` puts its own callback on
the AMQP channel in place of aio-pika's: it wraps aiormq's message in a `Delivery` that reads
the properties it is asked for, and nothing else. A consumer aio-pika restores on a new channel
(after a reconnect) delivers through aio-pika again, and its first delivery puts ours back.
When the OpenTelemetry aio-pika instrumentation wraps `Queue.consume`, deliveries keep aio-pika's
path, so its span is still current around each one.

**Acks.** A delivery's `ack` does not write a frame: `AckBatch` (one per AMQP channel, so never
across a channel change) writes one `basic.ack` with `multiple` for each run of consecutive
delivery tags that are all finished, at most `ACK_DELAY` seconds after the first of them
finished, or at once when `threshold` are waiting. A finished delivery whose lower neighbour is
still running (a long task) is acked on its own at that moment, so a long task never holds back
the acks of the others, and the broker's prefetch window keeps moving. Rejects and releases are
written at once, in order with the acks, by the same single writer: an ack with `multiple` never
covers a delivery that is not finished, nor one rejected later. `flush` (at close) writes what
is left. Each write is bounded by `timeout`; a channel that died voids its tags, the broker
redelivers those messages, and the failure is logged as `settle_failed`.

The crash window: a worker process killed within `ACK_DELAY` (2 ms) of a task's end, before
its ack was written, has that task redelivered, as it would be had it died just before a
one-by-one ack. A graceful shutdown writes every pending ack first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, cast

import aio_pika
import aiormq.abc
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pamqp.commands import Basic

log = structlog.get_logger("amqtask.worker")

ACK_DELAY = 0.002
"""Seconds a finished delivery's ack may wait for its neighbours', to share one frame."""

WRITE_TIMEOUT = 10.0
"""Seconds one write of acks or a reject may take: the settle step's bound
(`amqtask._settle.SETTLE_TIMEOUT`). Past it the connection is dead and the broker redelivers."""


class AckBatch:
    """The acks, rejects and releases of one AMQP channel's deliveries, written in order.

    Delivery tags on a channel run 1, 2, 3, ... with no gaps (one consumer per channel here),
    so the acks that can be folded into one `multiple` ack are exactly those from the last
    tag written up to the first tag not finished yet.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, *, threshold: int, timeout: float):
        self.channel = channel
        self._threshold = max(1, threshold)
        self._timeout = timeout
        self._upto = 0  # every tag up to this one is settled (its frame written or queued)
        self._finished: set[int] = set()  # finished with an ack not written yet
        self._beyond: set[int] = set()  # settled on their own, above `_upto`
        self._rejects: list[tuple[int, bool, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._draining = False  # `flush` is waiting: write everything, no timer

    def ack(self, tag: int) -> None:
        """Ack `tag` within `ACK_DELAY` (at once when `threshold` acks wait). Does not wait.

        Raises `ChannelInvalidStateError` when the channel is closed: the tag is void.
        """
        if self.channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{self.channel!r} closed")
        self._finished.add(tag)
        if len(self._finished) >= self._threshold:
            self._write_now()
        elif self._timer is None and self._writing is None:
            self._timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._write_now)

    async def reject(self, tag: int, *, requeue: bool) -> None:
        """Reject (or, with `requeue`, release) `tag` now; returns once the frame is written."""
        if self.channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{self.channel!r} closed")
        written = asyncio.get_running_loop().create_future()
        self._rejects.append((tag, requeue, written))
        self._write_now()
        await written

    async def flush(self) -> None:
        """Write every pending settle now and wait for it (each write bounded by the timeout)."""
        self._draining = True
        try:
            while self._finished or self._rejects or self._writing is not None:
                self._write_now()
                assert self._writing is not None
                await asyncio.wait({self._writing})
        finally:
            self._draining = False

    def _write_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        """Write what is pending; again at once for what finished meanwhile if it is enough to
        fill a batch (or holds a reject), else it waits for the timer like any first ack."""
        try:
            while True:
                rejects, self._rejects = self._rejects, []
                count = len(self._finished)  # the deliveries these acks settle
                acks = self._take_acks([tag for tag, _, _ in rejects])
                if rejects or acks:
                    await self._send(rejects, acks, count)
                if self._rejects or len(self._finished) >= self._threshold:
                    continue
                if self._draining and self._finished:
                    continue
                if self._finished and self._timer is None:
                    loop = asyncio.get_running_loop()
                    self._timer = loop.call_later(ACK_DELAY, self._write_now)
                return
        finally:
            self._writing = None

    def _take_acks(self, rejected: list[int]) -> list[tuple[int, bool]]:
        """The ack frames for what finished: (tag, multiple). `rejected` are written first."""
        finished, beyond = self._finished, self._beyond
        beyond.update(rejected)
        upto, last = self._upto, 0
        while True:
            following = upto + 1
            if following in finished:
                finished.discard(following)
                upto = last = following
            elif following in beyond:
                beyond.discard(following)
                upto = following
            else:
                break
        self._upto = upto
        acks = [(last, True)] if last else []
        if finished:  # past a delivery still running: one by one, so none waits for it
            acks += [(tag, False) for tag in sorted(finished)]
            beyond.update(finished)
            finished.clear()
        return acks

    async def _send(
        self,
        rejects: list[tuple[int, bool, asyncio.Future[None]]],
        acks: list[tuple[int, bool]],
        count: int,
    ) -> None:
        channel = self.channel
        try:
            async with asyncio.timeout(self._timeout):
                for tag, requeue, _ in rejects:
                    await channel.basic_reject(tag, requeue=requeue)
                last = len(acks) - 1
                for i, (tag, multiple) in enumerate(acks):
                    # Queued in order; only the last waits for the socket to take them all.
                    await channel.basic_ack(tag, multiple=multiple, wait=i == last)
        except Exception as exc:
            # The channel died (a reconnect) or its connection is stuck: its tags are void and
            # the broker redelivers those messages. At-least-once: the handlers may see them again.
            if acks:
                log.warning("settle_failed", how="ack", deliveries=count, error=repr(exc))
            for _, _, written in rejects:
                if not written.done():
                    written.set_exception(exc)
            return
        for _, _, written in rejects:
            if not written.done():
                written.set_result(None)


class Delivery:
    """One delivery as the worker reads it (`IncomingDelivery`): its properties are read from
    the frame's when asked for; `ack` and `reject` go through the channel's `AckBatch`."""

    __slots__ = (
        "_acks",
        "_properties",
        "_settled",
        "body",
        "delivery_tag",
        "exchange",
        "redelivered",
        "routing_key",
    )

    acks_at_once: ClassVar[bool] = True
    """`ack` returns at once, whatever the connection does: it needs no bound of its own."""

    def __init__(
        self,
        body: bytes,
        properties: Any,  # pamqp's `Basic.Properties`: read lazily, only what is asked for
        delivery_tag: int,
        redelivered: bool | None,
        exchange: str | None,
        routing_key: str | None,
        acks: AckBatch,
    ) -> None:
        self.body = body
        self._properties = properties
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self._acks = acks
        self._settled = False

    @property
    def headers(self) -> Mapping[str, Any]:
        headers: Mapping[str, Any] | None = self._properties.headers
        return {} if headers is None else headers

    @property
    def message_id(self) -> str | None:
        value: str | None = self._properties.message_id
        return value

    @property
    def content_type(self) -> str | None:
        value: str | None = self._properties.content_type
        return value

    @property
    def content_encoding(self) -> str | None:
        value: str | None = self._properties.content_encoding
        return value

    @property
    def correlation_id(self) -> str | None:
        value: str | None = self._properties.correlation_id
        return value

    @property
    def reply_to(self) -> str | None:
        value: str | None = self._properties.reply_to
        return value

    @property
    def type(self) -> str | None:
        """The AMQP `type` (a task message's task name): retries and dead letters keep it."""
        value: str | None = self._properties.message_type
        return value

    def _settle(self) -> None:
        if self._settled:
            raise aio_pika.exceptions.MessageProcessError("Message already processed", self)
        self._settled = True

    async def ack(self) -> None:
        """Ack within `ACK_DELAY` (see the module doc); returns at once."""
        self._settle()
        self._acks.ack(self.delivery_tag)

    async def reject(self, requeue: bool = False) -> None:
        """Reject (dead-letter by the queue's own route) or, with `requeue`, release."""
        self._settle()
        await self._acks.reject(self.delivery_tag, requeue=requeue)


class Consumer:
    """One queue's consumer: hands each delivery to `on_message` as a `Delivery`."""

    def __init__(
        self,
        on_message: Callable[[Delivery], Awaitable[None]],
        *,
        prefetch: int,
        settle_timeout: float,
    ) -> None:
        self._on_message = on_message
        self._threshold = max(1, prefetch // 4)
        self._settle_timeout = settle_timeout
        self._batches: dict[aiormq.abc.AbstractChannel, AckBatch] = {}
        self._batch: AckBatch | None = None
        self._tag: str | None = None
        self._direct = self.on_delivered  # one bound method: compared by identity below
        # The aio-pika instrumentation wraps `Queue.consume` to put a span around each delivery.
        self._bypass = not hasattr(aio_pika.Queue.consume, "__wrapped__")

    async def start(self, queue: AbstractQueue) -> str:
        """Consume `queue` (manual acks); return the consumer tag."""
        self._tag = await queue.consume(self.on_incoming, no_ack=False)
        self._take_over(await queue.channel.get_underlay_channel())
        return self._tag

    def _take_over(self, channel: aiormq.abc.AbstractChannel) -> None:
        consumers: dict[str, Any] = getattr(channel, "consumers", {})
        if self._bypass and self._tag in consumers and consumers[self._tag] is not self._direct:
            consumers[self._tag] = self._direct

    def _acks(self, channel: aiormq.abc.AbstractChannel) -> AckBatch:
        batch = self._batch
        if batch is None or batch.channel is not channel:
            batch = self._batches.get(channel)
            if batch is None:
                batch = AckBatch(channel, threshold=self._threshold, timeout=self._settle_timeout)
                self._batches[channel] = batch
                for old in [c for c in self._batches if c is not channel and c.is_closed]:
                    del self._batches[old]  # a dead channel's tags are void: nothing to write
            self._batch = batch
        return batch

    async def on_delivered(self, message: aiormq.abc.DeliveredMessage) -> None:
        """aiormq's consumer callback, once `_take_over` put it on the channel."""
        frame = cast(Basic.Deliver, message.delivery)  # a consumer's delivery
        assert frame.delivery_tag is not None
        await self._on_message(
            Delivery(
                message.body,
                message.header.properties,
                frame.delivery_tag,
                frame.redelivered,
                frame.exchange,
                frame.routing_key,
                self._acks(message.channel),
            )
        )

    async def on_incoming(self, message: AbstractIncomingMessage) -> None:
        """aio-pika's consumer callback: before the take-over, or on a channel it restored."""
        channel = message.channel
        self._take_over(channel)
        assert message.delivery_tag is not None  # manual acks
        await self._on_message(
            Delivery(
                message.body,
                message.properties,
                message.delivery_tag,
                message.redelivered,
                message.exchange,
                message.routing_key,
                self._acks(channel),
            )
        )

    async def flush(self) -> None:
        """Write the acks still waiting, on every channel still open."""
        for batch in list(self._batches.values()):
            if not batch.channel.is_closed:
                await batch.flush()
