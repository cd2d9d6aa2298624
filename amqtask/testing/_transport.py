"""`MemoryTransport`: amqtask's `Transport` on the in-memory broker.

What the app and the worker call is the same as on RabbitMQ (publish, consume, direct reply-to,
plan/apply/ensure_exists), so the codec, the worker's pipeline and its settling run unchanged.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Iterable

from amqtask import topology as topo
from amqtask._codec import Outgoing
from amqtask._exceptions import ConnectionLost, NotConnected, PublishInterrupted
from amqtask._transport import (
    OnLost,
    OnMessage,
    OnRefused,
    OnReply,
    ReplyChannel,
    Subscription,
)
from amqtask.testing._amqp import AmqpConnection
from amqtask.testing._broker import HEADER_BUDGET, MemoryBroker, _Consumer
from amqtask.testing._messages import (
    CURRENT_DELIVERY,
    DIRECT_REPLY_TO,
    MemoryDelivery,
    Message,
    StoredMessage,
)


class _MemorySubscription:
    def __init__(self, broker: MemoryBroker, consumer: _Consumer) -> None:
        self._broker, self._consumer = broker, consumer

    async def cancel(self) -> None:
        self._broker.cancel(self._consumer)


class _FanoutSubscription:
    def __init__(self, broker: MemoryBroker, consumer: _Consumer) -> None:
        self._broker, self._consumer = broker, consumer

    async def cancel(self) -> None:
        self._broker.cancel(self._consumer)
        self._broker.delete_queue(self._consumer.queue.name)  # auto-delete: its last consumer


class _MemoryReplyChannel:
    """Direct reply-to in memory: the broker gives each channel an address of its own (as
    RabbitMQ rewrites `amq.rabbitmq.reply-to` for the channel that published)."""

    reply_to = DIRECT_REPLY_TO

    def __init__(self, transport: MemoryTransport, on_reply: OnReply, on_lost: OnLost) -> None:
        self._transport = transport
        self._on_reply, self._on_lost = on_reply, on_lost
        self._address: str | None = None

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
        # The in-memory broker answers a publish at once: a refusal is raised here, whether or
        # not the caller waits for the confirm (`on_refused`).
        transport = self._transport
        transport.require_connected()
        broker = transport.broker
        if self._address is None:
            self._address = broker.open_reply(self._deliver, owner=transport)
            transport.reply_channels.append(self)
        before_publish()
        failure = broker.take_failure(task)
        if failure is not None:
            if failure.stored:
                broker.publish(
                    exchange,
                    routing_key,
                    message,
                    task=task,
                    mandatory=True,
                    reply_to=self._address,
                )
            error = failure.make(task, message.message_id)
            if isinstance(error, PublishInterrupted):  # what a call sees of a dropped connection
                error = ConnectionLost(
                    f"task {task!r}: the connection to the broker dropped before the request was "
                    "confirmed (injected); it may or may not have been processed",
                    task=task,
                    correlation_id=message.correlation_id or message.message_id,
                )
            raise error
        broker.publish(
            exchange, routing_key, message, task=task, mandatory=True, reply_to=self._address
        )
        await asyncio.sleep(0)  # a confirmed publish waits for the broker

    def _deliver(self, reply: StoredMessage) -> None:
        self._transport.broker.activity += 1
        asyncio.get_running_loop().call_soon(self._on_reply, Message.of(reply))

    def closed(self) -> None:
        if self._address is not None:
            self._transport.broker.close_reply(self._address)
            self._address = None
            self._on_lost(None)


class MemoryTransport:
    """`Transport` on a `MemoryBroker`: several transports (apps) may share one broker."""

    def __init__(self, broker: MemoryBroker, *, name: str = "amqtask") -> None:
        self.broker = broker
        self.name = name
        self._connected = False
        self.reply_channels: list[_MemoryReplyChannel] = []
        self._handing_over: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self._connected

    def require_connected(self) -> None:
        if not self._connected:
            raise NotConnected("not connected: use `async with app:` (or `await app.connect()`)")

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        """Close the "connection": the deliveries its consumers held go back to their queues,
        and calls waiting on its reply channels fail (`ConnectionLost`)."""
        self._connected = False
        self.broker.disconnect(self)
        channels, self.reply_channels = self.reply_channels, []
        for channel in channels:
            channel.closed()

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
        """Route and store `message` at once. Raises what the aio-pika transport raises for the
        same broker state (`Unroutable`, `PublishNacked`), or the failure armed with
        `TestApp.fail_next_publish`."""
        self.require_connected()
        failure = self.broker.take_failure(task)
        if failure is not None:
            if failure.stored:
                self.broker.publish(exchange, routing_key, message, task=task, mandatory=mandatory)
            raise failure.make(task, message.message_id)
        self.broker.publish(exchange, routing_key, message, task=task, mandatory=mandatory)
        await asyncio.sleep(0)  # a confirmed publish waits for the broker

    async def reply(self, reply_to: str, message: Outgoing, *, task: str) -> None:
        """The reply to a call: a publish to the default exchange, not mandatory."""
        await self.publish("", reply_to, message, task=task, timeout=None, mandatory=False)

    @property
    def header_budget(self) -> int:
        return HEADER_BUDGET

    async def consume(self, queue: str, on_message: OnMessage, *, prefetch: int) -> Subscription:
        """Consume `queue` with manual acks and `prefetch` deliveries in flight."""
        self.require_connected()
        loop = asyncio.get_running_loop()

        def deliver(delivery: MemoryDelivery) -> None:
            # The worker creates the task that runs the handler inside `on_message`, so the
            # handler's context holds the delivery (see `TestApp`'s handler wrappers).
            context = contextvars.copy_context()
            context.run(CURRENT_DELIVERY.set, delivery)
            task = loop.create_task(_hand_over(on_message, delivery), context=context)
            self._handing_over.add(task)
            task.add_done_callback(self._handing_over.discard)

        consumer = self.broker.consume(queue, deliver, prefetch=prefetch, owner=self)
        return _MemorySubscription(self.broker, consumer)

    async def plan(self, topology: topo.Topology) -> topo.Plan:
        return self.broker.plan(topology)

    async def apply(self, plan: topo.Plan) -> None:
        self.broker.apply(plan)

    async def ensure_exists(self, topology: topo.Topology, queues: Iterable[str]) -> None:
        self.broker.ensure_exists(topology, queues)

    def reply_channel(self, on_reply: OnReply, on_lost: OnLost) -> ReplyChannel:
        return _MemoryReplyChannel(self, on_reply, on_lost)

    async def subscribe_fanout(
        self, exchange: str, queue: str, on_message: Callable[[bytes], None]
    ) -> Subscription:
        """Receive what is published to fanout `exchange` from now on, on an exclusive,
        auto-delete queue `queue` of this connection's, without acks (as on RabbitMQ)."""
        self.require_connected()
        broker = self.broker
        broker.declare_exclusive(queue, exchange, owner=self)
        loop = asyncio.get_running_loop()

        def hand_over(delivery: MemoryDelivery) -> None:
            if not delivery.settled and not delivery.void:
                broker.settle(delivery, "ack")  # no_ack: settled as it is delivered
                on_message(delivery.body)

        def deliver(delivery: MemoryDelivery) -> None:
            loop.call_soon(hand_over, delivery)

        return _FanoutSubscription(broker, broker.consume(queue, deliver, prefetch=0, owner=self))

    async def open_connection(self, *, name: str) -> AmqpConnection:
        """A connection of its own to the in-memory broker, for code that speaks AMQP itself
        (the scheduler, `amqtask schedules`): channels with `basic_consume`, `basic_ack`,
        `basic_publish`, confirms and direct reply-to."""
        return AmqpConnection(self.broker, name=name)


async def _hand_over(on_message: OnMessage, delivery: MemoryDelivery) -> None:
    if delivery.crash is None:
        await on_message(delivery)
        return
    # A crash must cancel the worker's task for this delivery: find the task it starts.
    before = asyncio.all_tasks()
    await on_message(delivery)
    started = asyncio.all_tasks() - before - {asyncio.current_task()}
    if len(started) == 1:
        delivery.worker_task = started.pop()
