"""Asking running workers how they are, over the broker: `amqtask status`'s Workers section.

A request is published once to the namespace's control exchange (fanout, `Names.control_exchange`,
declared by `amqtask declare`), so every worker of the namespace gets a copy:

    {"op": "inspect"}    reply_to = amq.rabbitmq.reply-to (direct reply-to), a correlation id

Each worker binds an exclusive, auto-delete queue of its own to that exchange, consumes it without
acks, and answers on the requester's direct reply-to with what it holds now (`worker_reply`): its
connection name, host, pid, start time, queues, concurrency and prefetch, the deliveries it holds,
the tasks it settled, and its process pool (`pool_reply`, null without one). The requester
collects answers until its timeout, since nothing says how many workers there are.

Only a worker's connection and event loop answer, never a handler: a worker whose loop is blocked
does not answer in time, and a worker whose connection is down misses the request (no acks, no
redelivery: the request expires after the requester's timeout anyway). A request that is not
`{"op": "inspect"}` with a direct reply-to is ignored (logged at debug level), so no message
makes a worker publish into a queue of its choosing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiormq
import aiormq.exceptions
import orjson
import structlog
from pamqp.commands import Basic

from amqtask import _operator
from amqtask._transport import DIRECT_REPLY_TO, AioPikaTransport, open_own_connection

if TYPE_CHECKING:
    from aio_pika.abc import (
        AbstractConnection,
        AbstractIncomingMessage,
        AbstractRobustChannel,
        AbstractRobustConnection,
    )

    from amqtask._app import App
    from amqtask._pool import ChildPool
    from amqtask._worker import Worker

log = structlog.get_logger("amqtask.control")

INSPECT = "inspect"
_CONTENT_TYPE = "application/json"


# --- the answer: pure ---------------------------------------------------------------------------


def pool_reply(pools: Iterable[ChildPool]) -> dict[str, int] | None:
    """The process pools' children, summed over the worker's environments; None without one.

    `size` children are wanted, `alive` run now (fewer while a replacement starts), `busy` run
    a task; `recycled`, `crashed` and `killed_time_limit` count since the worker started.
    """
    pools = list(pools)
    if not pools:
        return None
    return {
        "size": sum(pool.size for pool in pools),
        "alive": sum(pool.alive for pool in pools),
        "busy": sum(pool.busy for pool in pools),
        "recycled": sum(pool.recycled for pool in pools),
        "crashed": sum(pool.crashed for pool in pools),
        "killed_time_limit": sum(pool.killed_time_limit for pool in pools),
    }


def worker_reply(
    name: str,
    *,
    queues: Iterable[str],
    concurrency: int,
    prefetch: int,
    pool_type: str,
    in_flight: int,
    running: int,
    processed: Mapping[str, int],
    pool: dict[str, int] | None,
) -> dict[str, Any]:
    """A worker's answer to `inspect`. Host, pid and start time come from its connection name
    (`amqtask._operator.worker_connection_name`), as `amqtask workers` reads them, or from this
    process when the name is not a worker's."""
    fields = _operator.parse_worker_name(name) or {}
    return {
        "name": name,
        "host": fields.get("host", socket.gethostname()),
        "pid": fields.get("pid", os.getpid()),
        "started_at": fields.get("started"),
        "queues": list(queues),
        "concurrency": concurrency,
        "prefetch": prefetch,
        "pool_type": pool_type,
        "in_flight": in_flight,  # deliveries held: running, or waiting for a slot or a child
        "running": running,  # of those, the ones whose handler has started
        "processed": dict(sorted(processed.items())),  # settled, per outcome
        "pool": pool,
    }


def reply_of(worker: Worker) -> dict[str, Any]:
    """`worker_reply` of a running worker."""
    return worker_reply(
        str(getattr(worker.app.transport, "name", "") or ""),
        queues=worker.queues,
        concurrency=worker.settings.concurrency,
        prefetch=worker.settings.effective_prefetch,
        pool_type=worker.settings.pool,
        in_flight=len(worker._tasks),
        running=len(worker._running),
        processed=worker.counts,
        pool=pool_reply(worker._pools.values()),
    )


def parse_request(body: bytes, reply_to: str | None, correlation_id: str | None) -> str | None:
    """The op of a well-formed request, or None for one to ignore: not JSON, no known op, or no
    direct reply-to to answer on."""
    if not reply_to or not reply_to.startswith(DIRECT_REPLY_TO) or not correlation_id:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    op = data.get("op") if isinstance(data, dict) else None
    return op if op == INSPECT else None


def merge_into_workers(report: dict[str, Any], replies: Iterable[Mapping[str, Any]]) -> None:
    """Add `in_flight` and `pool_children` (the answer's `pool`; the report's `pool` is the
    pool's kind) to each worker of an `amqtask workers` report (`amqtask._operator.
    workers_report`) that answered `inspect`, matched by connection name; null for the others."""
    answered = {str(reply.get("name")): reply for reply in replies}
    listed = [*report["workers"], *(w for queue in report["queues"] for w in queue["workers"])]
    for worker in listed:
        reply = answered.get(str(worker.get("connection")), {})
        worker["in_flight"] = reply.get("in_flight")
        worker["pool_children"] = reply.get("pool")


async def try_inspect_workers(
    app: App, *, timeout: float = 1.0
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """`inspect_workers`, or (None, why) when the broker refused the request: a user that may
    not write to the control exchange gets ACCESS_REFUSED, which is no reason to stop a status."""
    try:
        return await inspect_workers(app, timeout=timeout), None
    except aiormq.exceptions.AMQPChannelError as exc:
        return None, refusal(exc)


def refusal(exc: aiormq.exceptions.AMQPError) -> str:
    """The broker's text of a channel it closed ("ACCESS_REFUSED - access to exchange ...")."""
    texts = [arg for arg in exc.args if isinstance(arg, str)]
    return " ".join(" ".join(texts).split()) if texts else type(exc).__name__


def render_workers(
    replies: Sequence[Mapping[str, Any]] | None, timeout: float, *, reason: str | None = None
) -> str:
    """The Workers section of `amqtask status`: one line per worker that answered, or why none
    was asked."""
    if replies is None:
        return f"Workers: not inspected ({reason})"
    if not replies:
        return (
            f"Workers: no worker answered within {timeout:g} s (none running, or their "
            "connection or event loop is busy)"
        )
    lines = [f"Workers ({len(replies)} answered)"]
    for reply in replies:
        pool = reply.get("pool")
        children = _operator.pool_summary(pool) if isinstance(pool, Mapping) else None
        lines.append(
            f"  {reply.get('host')} pid {reply.get('pid')}  "
            f"queues {', '.join(map(str, reply.get('queues') or ())) or '-'}  "
            f"in flight {reply.get('in_flight')} (prefetch {reply.get('prefetch')})  "
            + (f"pool {children}" if children else "no process pool")
        )
    return "\n".join(lines)


# --- the worker's side --------------------------------------------------------------------------


class ControlListener:
    """A worker's queue on the control exchange, answering `inspect` with `describe()`.

    On the worker's robust connection: after a reconnect the queue is declared, bound and
    consumed again. A transport that opens connections of its own (the in-memory broker of
    `amqtask.testing`) gets one for the listener (`open_own_connection`). Missing exchange (the
    app was declared by an older version): one warning, and the worker runs on without
    answering.
    """

    def __init__(self, exchange: str, describe: Callable[[], dict[str, Any]]) -> None:
        self.exchange = exchange
        self._describe = describe
        self._channel: AbstractRobustChannel | None = None
        self._own: AbstractConnection | None = None  # the in-memory broker's connection

    async def start(self, transport: object) -> None:
        """Start answering. Never raises for the control exchange: a worker that cannot be
        inspected still works (logged)."""
        try:
            if isinstance(transport, AioPikaTransport):
                await self._listen(transport.connection)
            elif hasattr(transport, "open_connection"):
                # The URLs go unused: the transport opens the connection itself.
                own = await open_own_connection(transport, (), name="amqtask-control", timeout=1)
                self._own = own
                await self._listen_own(own)
        except Exception as exc:
            log.warning("control_unavailable", exchange=self.exchange, error=repr(exc))

    async def _listen_own(self, connection: AbstractConnection) -> None:
        """`_listen` at the AMQP level, on a connection of the listener's own."""
        channel = await connection.channel(publisher_confirms=False)
        underlay = await channel.get_underlay_channel()
        queue = f"{self.exchange}.{uuid.uuid4().hex[:12]}"
        await underlay.queue_declare(queue, exclusive=True, auto_delete=True)
        try:
            await underlay.queue_bind(queue, self.exchange)
        except aiormq.exceptions.ChannelNotFoundEntity:
            log.warning(
                "control_exchange_missing",
                exchange=self.exchange,
                hint="run `amqtask declare` so that `amqtask status` can inspect the workers",
            )
            return

        async def on_request(message: aiormq.abc.DeliveredMessage) -> None:
            properties = message.header.properties
            await self._answer(
                underlay, message.body, properties.reply_to, properties.correlation_id
            )

        await underlay.basic_consume(queue, on_request, no_ack=True)

    async def _listen(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        # Named here, not by the server: the robust channel declares it again by this name.
        queue = await channel.declare_queue(
            f"{self.exchange}.{uuid.uuid4().hex[:12]}",
            durable=False,
            exclusive=True,
            auto_delete=True,
        )
        try:
            await queue.bind(self.exchange)
        except aiormq.exceptions.ChannelNotFoundEntity:
            log.warning(
                "control_exchange_missing",
                exchange=self.exchange,
                hint="run `amqtask declare` so that `amqtask status` can inspect the workers",
            )
            await channel.close()
            return
        await queue.consume(self._on_request, no_ack=True)
        self._channel = channel

    async def stop(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):  # closing anyway: the queue goes with it
                await channel.close()
        own, self._own = self._own, None
        if own is not None:
            with contextlib.suppress(Exception):
                await own.close()

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        channel = self._channel
        if channel is None:
            return
        try:
            underlay = await channel.get_underlay_channel()
        except Exception as exc:  # the channel is gone: the requester times out
            log.debug("control_reply_failed", error=repr(exc))
            return
        await self._answer(underlay, message.body, message.reply_to, message.correlation_id)

    async def _answer(
        self,
        channel: aiormq.abc.AbstractChannel,
        body: bytes,
        reply_to: str | None,
        correlation_id: str | None,
    ) -> None:
        """Answer a request on `channel`, or ignore one that is not well-formed."""
        op = parse_request(body, reply_to, correlation_id)
        if op is None or reply_to is None:
            log.debug(
                "control_request_ignored",
                reply_to=reply_to,
                body=body[:200].decode("utf-8", "replace"),
            )
            return
        try:
            await channel.basic_publish(
                orjson.dumps(self._describe()),
                exchange="",
                routing_key=reply_to,
                properties=Basic.Properties(
                    content_type=_CONTENT_TYPE, correlation_id=correlation_id
                ),
            )
        except Exception as exc:  # a reply lost is the requester's timeout, never the worker's end
            log.debug("control_reply_failed", error=repr(exc))


# --- the requester's side -----------------------------------------------------------------------


async def inspect_workers(app: App, *, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Ask every running worker of `app`'s namespace how it is; their answers (`worker_reply`)
    that arrive within `timeout` seconds, sorted by worker name.

    Returns an empty list when no worker answers, and when the control exchange is missing
    (logged: the app was declared by an older version). Raises a `ConnectError` when the broker
    cannot be connected to within the app's `connect_timeout`. Under `amqtask.testing` the
    request goes over the in-memory broker (`open_own_connection`), to the `TestApp`'s workers.
    """
    exchange = app.names.control_exchange
    correlation_id = uuid.uuid4().hex
    replies: list[dict[str, Any]] = []  # one per worker: each answers a request once

    async def on_reply(message: aiormq.abc.DeliveredMessage) -> None:
        if message.header.properties.correlation_id != correlation_id:
            return
        try:
            data = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return
        if isinstance(data, dict):
            replies.append(data)

    connection = await open_own_connection(
        app.transport, app.urls, name="amqtask-inspect", timeout=app.connect_timeout
    )
    try:
        channel = await connection.channel(publisher_confirms=False)
        underlay = await channel.get_underlay_channel()
        await underlay.basic_consume(DIRECT_REPLY_TO, on_reply, no_ack=True)
        await underlay.basic_publish(
            orjson.dumps({"op": INSPECT}),
            exchange=exchange,
            routing_key="",
            properties=Basic.Properties(
                content_type=_CONTENT_TYPE,
                reply_to=DIRECT_REPLY_TO,
                correlation_id=correlation_id,
                # Unread by then, nobody waits for the answer: a worker drops it unread.
                expiration=str(max(1, round(timeout * 1000))),
            ),
        )
        # A missing exchange closes the channel (404) right after the publish.
        closing = underlay.closing
        await asyncio.wait([closing], timeout=timeout)
        if not closing.done():
            closing.cancel()  # only this observer of the channel's end
        elif not closing.cancelled():
            error = closing.exception()
            if isinstance(error, aiormq.exceptions.ChannelNotFoundEntity):
                log.warning(
                    "control_exchange_missing",
                    exchange=exchange,
                    hint="run `amqtask declare` so that the workers can be inspected",
                )
            elif error is not None:
                raise error
    finally:
        await connection.close()
    return sorted(replies, key=lambda reply: str(reply.get("name")))
