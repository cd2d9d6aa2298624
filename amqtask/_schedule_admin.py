"""`amqtask schedules`: the schedules' state, and pausing and resuming them, from outside.

The state lives in the scheduler queue, held by the active scheduler. `read_state` asks it (a
`query` record answered over direct reply-to); when none answers, no scheduler may be running,
and the state is read off the queue itself: subscribed like a scheduler, this process becomes
the active consumer when no scheduler is, reads up to a `sync` marker of its own, and writes the
merged state back as one snapshot (so that reading returns no record to the queue many times).
A scheduler that starts meanwhile waits for it. When another consumer holds the queue but did
not answer, the state is unknown.

`set_paused` publishes a `pause` record: the active scheduler applies it at once, and a scheduler
that takes over later reads it, so a pause outlives restarts and deploys.
"""

from __future__ import annotations

import asyncio
import os
import socket
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import aiormq
import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import AbstractConnection

from amqtask import _codec, _wallclock
from amqtask._app import App
from amqtask._exceptions import ScheduleError, TopologyMissing
from amqtask._schedule import iso, tick_message_id
from amqtask._schedule_state import (
    Advance,
    Ledger,
    Pause,
    Query,
    Record,
    RecordError,
    Snapshot,
    Sync,
    decode,
    encode,
)
from amqtask._transport import DIRECT_REPLY_TO, _publish, open_own_connection

DEFAULT_TIMEOUT = 3.0  # seconds to wait for the active scheduler's answer, then for the queue


class Source:
    """Where a listing's state came from."""

    ACTIVE = "active scheduler"  # the active scheduler answered
    BROKER = "broker"  # no scheduler was active: read off the scheduler queue
    UNKNOWN = "unknown"  # a scheduler holds the queue but did not answer


@dataclass(frozen=True, slots=True)
class Listing:
    source: str
    state: Snapshot | None


def _now() -> int:
    return round(_wallclock.now() * 1000)


async def _connect(app: App, what: str) -> AbstractConnection:
    return await open_own_connection(
        app.transport, app.urls, name=f"amqtask {what}", timeout=app.connect_timeout
    )


async def _check_queue(connection: AbstractConnection, queue: str) -> None:
    try:
        async with connection.channel(publisher_confirms=False) as channel:
            await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise TopologyMissing([f"queue {queue!r}"]) from None


async def read_state(app: App, *, timeout: float = DEFAULT_TIMEOUT) -> Listing:
    """The schedules' state and who is active (see the module's docstring).

    Raises a `ConnectError`, and `TopologyMissing` before `amqtask declare` created the queue.
    """
    queue = app.names.scheduler_queue
    connection = await _connect(app, "schedules")
    try:
        await _check_queue(connection, queue)
        answer = await _ask(connection, queue, timeout)
        if answer is not None:
            return Listing(Source.ACTIVE, answer)
        state = await _read_queue(app, connection, queue, timeout)
        return Listing(Source.UNKNOWN, None) if state is None else Listing(Source.BROKER, state)
    finally:
        with suppress(Exception):
            await connection.close()


async def _ask(connection: AbstractConnection, queue: str, timeout: float) -> Snapshot | None:
    """The active scheduler's answer to a query, or None after `timeout` seconds."""
    answered: asyncio.Future[Snapshot] = asyncio.get_running_loop().create_future()
    correlation = os.urandom(8).hex()

    async def on_reply(message: aiormq.abc.DeliveredMessage) -> None:
        if message.header.properties.correlation_id != correlation or answered.done():
            return
        with suppress(RecordError):
            record = decode(message.body)
            if isinstance(record, Snapshot):
                answered.set_result(record)

    async with connection.channel(publisher_confirms=False) as channel:
        raw = await channel.get_underlay_channel()
        await raw.basic_consume(DIRECT_REPLY_TO, on_reply, no_ack=True)
        await raw.basic_publish(
            encode(Query()),
            exchange="",
            routing_key=queue,
            properties=aiormq.spec.Basic.Properties(
                content_type=_codec.CONTENT_TYPE,
                reply_to=DIRECT_REPLY_TO,
                correlation_id=correlation,
                # Not left for a scheduler that starts later to answer nobody.
                expiration=str(int(timeout * 1000)),
            ),
        )
        try:
            return await asyncio.wait_for(answered, timeout)
        except TimeoutError:
            return None


async def _read_queue(
    app: App, connection: AbstractConnection, queue: str, timeout: float
) -> Snapshot | None:
    """The state read off the queue while no scheduler is active, written back as one snapshot;
    None when another consumer holds the queue."""
    inbox: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()

    async def deliver(message: aiormq.abc.DeliveredMessage) -> None:
        inbox.put_nowait(message)

    async with connection.channel(publisher_confirms=True, on_return_raises=True) as channel:
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=0)
        await raw.basic_consume(queue, deliver, no_ack=False)
        marker = os.urandom(8).hex()
        await _put(app, channel, queue, Sync(marker))
        ledger, held = Ledger(), []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                message = await asyncio.wait_for(inbox.get(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return None
            try:
                record: Record | None = decode(message.body)
            except RecordError:
                record = None
            if isinstance(record, Sync) and record.id == marker:
                break
            if isinstance(record, Snapshot | Advance | Pause):
                ledger.apply(record)
                assert message.delivery_tag is not None
                held.append(message.delivery_tag)
            # Markers and queries stay unacked: back to the queue for the next scheduler.
        snapshot = ledger.snapshot(None, _now())
        if held:
            await _put(app, channel, queue, snapshot)
            for tag in held:
                await raw.basic_ack(tag)
        return snapshot


async def _put(app: App, channel: Any, queue: str, record: Record) -> None:
    message = _codec.Outgoing(body=encode(record), message_id=_codec.new_message_id())
    await _publish(
        channel,
        "",
        queue,
        message,
        task="scheduler",
        timeout=app.publish_timeout or 30.0,
        mandatory=True,
    )


async def set_paused(app: App, name: str, paused: bool) -> None:
    """Pause (or resume) schedule `name`, stored on the broker.

    Raises `ScheduleError` for a name the app has no schedule of, a `ConnectError`, and
    `TopologyMissing` before `amqtask declare`.
    """
    if name not in {item.name for item in app.schedules}:
        known = ", ".join(sorted(item.name for item in app.schedules)) or "none"
        raise ScheduleError(f"no schedule {name!r} in this app (known: {known})")
    queue = app.names.scheduler_queue
    connection = await _connect(app, "schedules")
    try:
        await _check_queue(connection, queue)
        by = f"{socket.gethostname()} pid {os.getpid()}"
        async with connection.channel(publisher_confirms=True, on_return_raises=True) as channel:
            await _put(app, channel, queue, Pause(name, paused, _now(), by))
    finally:
        with suppress(Exception):
            await connection.close()


def rows(app: App, listing: Listing, now: int) -> list[dict[str, Any]]:
    """One row per schedule: its definition, next due time, last fired tick and pause state."""
    state = listing.state
    found = {} if state is None else state.schedules
    result = []
    for item in app.schedules:
        progress = found.get(item.name)
        cursor = None if progress is None else progress.cursor
        fired = None if progress is None else progress.fired
        # Unknown without a state; a schedule the state does not name yet is not paused.
        paused = None if state is None else progress is not None and progress.paused
        due = item.next_due(max(now, cursor or now))
        result.append(
            {
                "name": item.name,
                "task": item.contract.name,
                "version": item.contract.version,
                "schedule": item.expression,
                "tz": item.tz if item.cron is not None else None,
                "misfire": item.misfire.value,
                "next_due": None if due is None else iso(due),
                "last_fired": None if fired is None else iso(fired),
                "last_message_id": None if fired is None else tick_message_id(item.name, fired),
                "paused": paused,
            }
        )
    return result


def report(app: App, listing: Listing, now: int) -> dict[str, Any]:
    """The `--json` form: who is active, where the state came from, and each schedule."""
    state = listing.state
    leader = None if state is None or state.leader is None else state.leader.to_dict()
    if leader is not None and leader.get("since") is not None:
        leader["since"] = iso(leader["since"])
    return {
        "queue": app.names.scheduler_queue,
        "source": listing.source,
        "active": leader if listing.source == Source.ACTIVE else None,
        "last_active": leader if listing.source == Source.BROKER else None,
        "schedules": rows(app, listing, now),
    }


def render(data: dict[str, Any]) -> str:
    """A table for a terminal."""
    if data["active"] is not None:
        who = data["active"]
        head = f"active scheduler: {who['host']} pid {who['pid']} since {who['since']}"
    elif data["source"] == Source.BROKER:
        last = data["last_active"]
        was = "" if last is None else f" (last active: {last['host']} pid {last['pid']})"
        head = f"active scheduler: none{was}; state read from the broker"
    else:
        head = "active scheduler: a consumer holds the scheduler queue but did not answer"
    columns = ("name", "task", "schedule", "tz", "next_due", "last_fired", "last_message_id")
    table: list[tuple[str, ...]] = [
        ("NAME", "TASK", "SCHEDULE", "TZ", "NEXT DUE", "LAST FIRED", "MESSAGE ID", "STATE")
    ]
    for row in data["schedules"]:
        state = {True: "paused", False: "active", None: "?"}[row["paused"]]
        table.append((*(str(row[c] if row[c] is not None else "-") for c in columns), state))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]
    return "\n".join([head, *lines])
