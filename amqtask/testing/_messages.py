"""What the in-memory broker holds and hands out: stored messages, deliveries, views for tests.

Headers go through the AMQP field-table encoding both ways (`wire_headers`), so a handler reads
exactly the types it would read from RabbitMQ, and a value AMQP cannot carry fails the publish.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import orjson
from pamqp import decode, encode

if TYPE_CHECKING:
    from amqtask.testing._broker import MemoryBroker, _Consumer, _Queue

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def wire_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """`headers` as a consumer would read them: encoded as an AMQP field table and decoded.

    Raises what the AMQP client raises for a value it cannot encode (`TypeError`).
    """
    if not headers:
        return {}
    _, decoded = decode.field_table(encode.field_table(dict(headers)))
    return decoded


@dataclass(slots=True)
class StoredMessage:
    """A message as the broker holds it: body, properties, and where it was last published."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    exchange: str
    routing_key: str
    content_type: str | None = None
    content_encoding: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None  # milliseconds, as AMQP carries it
    type: str | None = None  # the AMQP `type` property
    redelivered: bool = False
    returns: int = 0  # times it went back to its queue unacked (quorum: x-delivery-count)
    expires_at: float | None = None  # loop time; set while it waits in a queue with a TTL


@dataclass(frozen=True, slots=True)
class Message:
    """A message as a test sees it: what a consumer would read, and where it was."""

    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None
    exchange: str
    routing_key: str
    content_type: str | None = None
    content_encoding: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    type: str | None = None  # the AMQP `type` property (a task message's task name)
    redelivered: bool = False
    queue: str | None = None  # the queue it waits in, or was taken from

    @classmethod
    def of(cls, stored: StoredMessage, queue: str | None = None) -> Message:
        return cls(
            body=stored.body,
            headers=dict(stored.headers),
            message_id=stored.message_id,
            exchange=stored.exchange,
            routing_key=stored.routing_key,
            content_type=stored.content_type,
            content_encoding=stored.content_encoding,
            correlation_id=stored.correlation_id,
            reply_to=stored.reply_to,
            type=stored.type,
            redelivered=stored.redelivered,
            queue=queue,
        )

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


class Stage(Enum):
    """Where a delivery is between the broker and its settle (for `TestApp.drain`)."""

    HANDED_OVER = "handed_over"  # on its way to the handler, or refused without running
    ON_LOOP = "on_loop"  # an `async def` handler runs it (it may wait on the clock)
    IN_THREAD = "in_thread"  # a plain `def` handler runs it in a worker thread
    SETTLING = "settling"  # the handler is done; the worker settles it


@dataclass(frozen=True, slots=True)
class Crash:
    """An armed crash: the worker dies while running the task (see `TestApp.crash_next`)."""

    before_handler: bool


CURRENT_DELIVERY: contextvars.ContextVar[MemoryDelivery | None] = contextvars.ContextVar(
    "amqtask_testing_delivery", default=None
)
"""The delivery a handler runs for: set in the context the worker's task for it is created in."""


class MemoryDelivery:
    """A delivery to a consumer: what the worker reads, acks or rejects."""

    def __init__(
        self,
        broker: MemoryBroker,
        queue: _Queue,
        consumer: _Consumer,
        tag: int,
        message: StoredMessage,
    ) -> None:
        self._broker, self._queue, self._consumer = broker, queue, consumer
        self.tag = tag
        self.message = message
        headers = dict(message.headers)
        if queue.quorum and message.returns:
            headers["x-delivery-count"] = message.returns
        self.headers: Mapping[str, Any] = headers
        self.body = message.body
        self.message_id = message.message_id
        self.content_type = message.content_type
        self.content_encoding = message.content_encoding
        self.correlation_id = message.correlation_id
        self.reply_to = message.reply_to
        self.type = message.type
        self.redelivered: bool | None = message.redelivered
        self.exchange, self.routing_key = message.exchange, message.routing_key
        self.queue = queue.name
        self.stage = Stage.HANDED_OVER
        self.crash: Crash | None = None
        self.worker_task: asyncio.Task[Any] | None = None  # found only for an armed crash
        self.settled = False
        self.void = False  # its consumer's channel "closed": settling it fails

    @property
    def owner(self) -> object:
        """Who consumes it: the transport (connection) its consumer belongs to."""
        return self._consumer.owner

    async def ack(self) -> None:
        self._broker.settle(self, "ack")

    async def reject(self, requeue: bool = False) -> None:
        self._broker.settle(self, "requeue" if requeue else "reject")

    def __repr__(self) -> str:
        return f"<MemoryDelivery {self.queue} #{self.tag} {self.message_id} {self.stage.value}>"
