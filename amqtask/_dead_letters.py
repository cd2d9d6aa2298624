"""Operator tools for a work queue's dead-letter queue: list, replay, purge.

Replay publishes each message back to its work queue and waits for the broker's confirm before it
acks (removes) the dead letter, so a crash mid-replay can duplicate a message but never lose one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from amqtask import _codec
from amqtask._app import App
from amqtask._contract import Contract
from amqtask._exceptions import PublishError, TopologyMissing
from amqtask.routing import dead_letter_queue_name

# Headers of a failure that a replayed message must not carry into its fresh start.
_FAILURE_HEADERS = (
    _codec.REASON,
    _codec.ERROR,
    _codec.ERROR_TYPE,
    _codec.TRACEBACK,
    _codec.FAILED_AT,
    _codec.FIRST_FAILED_AT,
    _codec.ORIGIN_QUEUE,
    _codec.ATTEMPT,
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered message as an operator sees it."""

    message_id: str | None
    task: str | None
    reason: str | None
    error: str | None
    attempts: int | None
    first_failed_at: str | None
    failed_at: str | None
    body: bytes

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers: dict[str, Any] = dict(message.headers or {})
        text = _codec.header_text
        # A message the broker itself dead-lettered (expired, delivery limit) has x-death only.
        reason = text(headers.get(_codec.REASON)) or text(headers.get("x-first-death-reason"))
        attempts = headers.get(_codec.ATTEMPT)
        return cls(
            message_id=message.message_id,
            task=text(headers.get(_codec.TASK)),
            reason=reason,
            error=text(headers.get(_codec.ERROR)),
            attempts=int(attempts) if attempts is not None else None,
            first_failed_at=text(headers.get(_codec.FIRST_FAILED_AT)),
            failed_at=text(headers.get(_codec.FAILED_AT)),
            body=message.body,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "task": self.task,
            "reason": self.reason,
            "error": self.error,
            "attempts": self.attempts,
            "first_failed_at": self.first_failed_at,
            "failed_at": self.failed_at,
            "body": self.body.decode("utf-8", "replace"),
        }


async def _dead_letter_queue(
    channel: AbstractChannel, contract: Contract[Any, Any]
) -> AbstractQueue:
    name = dead_letter_queue_name(contract.queue)
    try:
        return await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise TopologyMissing([f"queue {name!r}"]) from None


async def list_dead_letters(
    app: App, contract: Contract[Any, Any], *, limit: int = 100
) -> tuple[int, list[DeadLetter]]:
    """The dead-letter queue's message count and up to `limit` of its messages. Removes nothing."""
    connection = await aio_pika.connect(app.url)
    async with connection:
        channel = await connection.channel()
        queue = await _dead_letter_queue(channel, contract)
        count = queue.declaration_result.message_count or 0
        letters = []
        for _ in range(min(limit, count)):
            message = await queue.get(fail=False)
            if message is None:
                break
            letters.append(DeadLetter.of(message))
        # Nothing is acked: closing the channel returns every message to the queue, in order.
        await channel.close()
    return count, letters


async def replay(
    app: App, contract: Contract[Any, Any], *, ids: Collection[str] | None = None
) -> int:
    """Move dead letters back to the work queue (all, or those whose message id is in `ids`).

    Each is published to the work queue, persistent, and confirmed before its dead letter is
    acked. Returns how many were replayed. Raises `PublishError` if a publish is refused; what was
    replayed until then stays replayed, the rest stays dead-lettered.
    """
    replayed = 0
    connection = await aio_pika.connect(app.url)
    async with connection:
        getter = await connection.channel()
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await _dead_letter_queue(getter, contract)
        count = queue.declaration_result.message_count or 0
        for _ in range(count):
            message = await queue.get(fail=False)
            if message is None:
                break
            if ids is not None and message.message_id not in ids:
                continue  # left unacked: back in the queue when the channel closes
            headers = {
                key: value
                for key, value in (message.headers or {}).items()
                if key not in _FAILURE_HEADERS and not key.startswith(("x-death", "x-first-death"))
            }
            try:
                # Straight to the work queue through the default exchange: not to other queues
                # that may be bound to the task's routing key.
                await publisher.default_exchange.publish(
                    aio_pika.Message(
                        message.body,
                        headers=headers,
                        content_type=message.content_type,
                        message_id=message.message_id,
                        correlation_id=message.correlation_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=contract.queue,
                    mandatory=True,
                )
            except aio_pika.exceptions.DeliveryError as exc:
                raise PublishError(
                    f"replay of {message.message_id} to queue {contract.queue!r} was refused "
                    f"({type(exc).__name__}); {replayed} replayed so far, the rest kept",
                    task=contract.name,
                    message_id=message.message_id or "",
                ) from None
            await message.ack()
            replayed += 1
        await getter.close()
    return replayed


async def purge(app: App, contract: Contract[Any, Any]) -> int:
    """Delete every message of the dead-letter queue; returns how many there were."""
    connection = await aio_pika.connect(app.url)
    async with connection:
        channel = await connection.channel()
        queue = await _dead_letter_queue(channel, contract)
        result = await queue.purge()
        return int(result.message_count or 0)
