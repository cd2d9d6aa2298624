"""The calling side of RPC: publish a request, wait for the reply with its correlation id.

Replies come over RabbitMQ direct reply-to: one consumer on the channel that publishes the
requests, no reply queue. Each call in flight has a future in a map keyed by correlation id, so any
number of calls share the channel without a lock between them.

A contract with transient calls (`calls="transient"`) sends its requests as transient messages to
its call queue and waits for the reply without first waiting for the broker's confirm: the
confirm arrives while the worker runs the task. A refusal it brings (returned: no call queue; a
nack: the queue is full) fails the call at once, unless the reply came first; so does a
connection lost before the reply, as for any call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel

from amqtask import _codec, _tracing
from amqtask._contract import Calls, Contract
from amqtask._exceptions import CallTimeout, ConnectionLost
from amqtask._transport import ReplyChannel, Transport
from amqtask.routing import call_queue_name, call_routing_key

log = structlog.get_logger("amqtask.rpc")


@dataclass(frozen=True, slots=True)
class _Pending:
    task: str
    reply: asyncio.Future[_codec.Delivery]


class Caller:
    """Calls the contracts of one app over one transport and matches the replies."""

    def __init__(self, transport: Transport, exchange: str) -> None:
        self._transport = transport
        self._exchange = exchange
        self._channel: ReplyChannel | None = None
        self._pending: dict[str, _Pending] = {}

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def call(
        self,
        contract: Contract[Any, Any],
        payload: BaseModel | Mapping[str, Any],
        *,
        timeout: float,
    ) -> Any:
        """Publish a request for `contract` and return its decoded result. See `App.call`."""
        if not timeout > 0:
            raise ValueError(f"a call's timeout must be positive, got {timeout!r}")
        channel = self._channel
        if channel is None:
            channel = self._channel = self._transport.reply_channel(self._on_reply, self._on_lost)
        message = _codec.encode_call(contract, payload, reply_to=channel.reply_to, timeout=timeout)
        correlation_id = message.message_id
        pending = _Pending(contract.name, asyncio.get_running_loop().create_future())
        transient = contract.calls is Calls.TRANSIENT
        if transient:
            routing_key = call_routing_key(contract.name, contract.version)
            queue = call_queue_name(contract.queue)
        else:
            routing_key, queue = contract.routing_key, contract.queue

        def register() -> None:
            # Just before the publish: the reply can arrive before the publish is confirmed.
            self._pending[correlation_id] = pending

        def refused(exc: BaseException) -> None:
            # A transient request's confirm came back a refusal: no reply will come. A reply that
            # came first has answered the call already.
            if not pending.reply.done():
                pending.reply.set_exception(exc)

        span = None
        if _tracing.ENABLED:
            # One PRODUCER span for the whole call: the request's publish and the wait for its
            # reply (the worker's process span is its child).
            span = _tracing.start_send(
                message.headers,
                exchange=self._exchange,
                routing_key=routing_key,
                destination=contract.routing_key,
                message_id=message.message_id,
                correlation_id=correlation_id,
                task=contract.name,
                version=contract.version,
                body_size=len(message.body),
            )
        try:
            async with asyncio.timeout(timeout):
                await channel.request(
                    self._exchange,
                    routing_key,
                    message,
                    task=contract.name,
                    before_publish=register,
                    on_refused=refused if transient else None,
                )
                reply = await pending.reply
            result = _codec.decode_reply(contract, reply)
        except TimeoutError:
            error: BaseException = CallTimeout(
                f"task {contract.name!r}: no reply within {timeout} s (is a worker consuming "
                f"queue {queue!r}?). The request expires unprocessed if no worker took it "
                "in time; a worker that already had it may still finish it.",
                task=contract.name,
                correlation_id=correlation_id,
            )
            _tracing.end(span, error)
            raise error from None
        except BaseException as exc:
            _tracing.end(span, exc)
            raise
        else:
            _tracing.end(span)
        finally:
            self._pending.pop(correlation_id, None)
            if not pending.reply.done():
                pending.reply.cancel()
            elif not pending.reply.cancelled():
                pending.reply.exception()  # retrieved: a failure raised elsewhere is not logged
        return result

    def _on_reply(self, delivery: _codec.Delivery) -> None:
        pending = self._pending.get(delivery.correlation_id or "")
        if pending is None or pending.reply.done():
            # The caller gave up (timeout) or the reply is not ours: replies are at-most-once.
            log.debug("late_reply_discarded", correlation_id=delivery.correlation_id)
            return
        pending.reply.set_result(delivery)

    def _on_lost(self, exc: BaseException | None) -> None:
        """The channel the replies come over closed: none of the calls in flight can get one."""
        cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        self._fail_all(f"the connection to the broker (or its call channel) closed{cause}")

    def _fail_all(self, why: str) -> None:
        failed = 0
        for correlation_id, pending in self._pending.items():
            if not pending.reply.done():
                pending.reply.set_exception(
                    ConnectionLost(
                        f"task {pending.task!r}: {why} while the call was in flight; the request "
                        "may or may not have been processed",
                        task=pending.task,
                        correlation_id=correlation_id,
                    )
                )
                failed += 1
        if failed:
            log.warning("calls_failed_connection_lost", count=failed, reason=why)

    async def close(self) -> None:
        """Fail the calls in flight and forget the channel; a later call opens a new one."""
        self._fail_all("the app was closed")
        self._channel = None
