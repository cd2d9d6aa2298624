"""The scheduler: any number of replicas per namespace, exactly one active, chosen by the broker.

Each replica has a connection of its own (a short heartbeat, so that the broker notices a lost
host within seconds) and consumes the namespace's scheduler queue, a quorum queue with
`x-single-active-consumer`, with manual acks and no prefetch limit. The broker delivers that
queue's messages to one consumer only, the active one, and when its channel or connection goes
(a stop, kill -9, a lost host, a network cut past the heartbeat) it returns every message that
consumer held unacked and makes the next consumer active. The queue is also where the schedules'
state lives (`amqtask._schedule_state`): the active scheduler holds the records of that state
unacked, so they come back to whoever takes over.

Taking over (`_Session.elect`):
1. Subscribe, and publish a `sync` marker: on an empty queue it wakes the active consumer.
2. The first delivery tells this consumer that it is active. Publish a fresh `sync` marker, and
   read (holding every record) until it comes back: the queue is FIFO, so every record published
   before it, and every one the last leader held, has been read.
3. Merge them, publish a snapshot naming this process, and once it is confirmed ack the records
   it replaces. From then on the queue always holds at least one record, the snapshot.

While active (`_Session.lead`): fire what is due, as `send` does (validated, persistent,
mandatory, confirmed) with a message id derived from the schedule and the due time, and after
the confirms publish an `advance` record of the new cursors (confirmed too). Every record comes
back to this consumer and is held; once they are `COMPACT_AFTER` or more and together name at
least as many schedules as a snapshot would, a snapshot replaces them (so a few schedules compact
every few dozen records, and ten thousand staggered ones not at every tick).

Ticks are published on the same connection that holds the lease. When the broker closes that
connection it can no longer publish on it, and it only reconnects as a new consumer that waits
for its turn: a replica the broker has replaced cannot fire. The one way a tick fires twice: it
was confirmed, and its `advance` record was not, when the leader died; its copy carries the same
message id. The README's "Periodic tasks" has the whole failure analysis.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import random
from contextlib import suppress
from dataclasses import replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiormq.abc
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from amqtask import _codec, _wallclock
from amqtask._app import App
from amqtask._exceptions import (
    AmqtaskError,
    PublishNacked,
    PublishTimeout,
    ScheduleError,
    TopologyMissing,
    Unroutable,
)
from amqtask._metrics import SchedulerMetrics
from amqtask._schedule import Decision, Schedule, decide, iso, next_fire_at, tick_message_id
from amqtask._schedule_state import (
    Advance,
    Identity,
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
from amqtask._startup import BROKER_BACKOFF
from amqtask._transport import _LOST_ERRORS, _publish, open_own_connection

log = structlog.get_logger("amqtask.scheduler")

DEFAULT_HEARTBEAT = 3
"""Seconds of the scheduler connection's AMQP heartbeat: the broker drops a silent connection
(a lost host, a network cut) after about two of them, and the next replica takes over."""

COMPACT_AFTER = 64  # records held, at least, before a snapshot replaces them
MAX_SLEEP = 1.0  # seconds between looks at the clock: a step of the wall clock is seen within it
IN_FLIGHT = 1024  # ticks published at once, awaiting their confirms
RETRY_AFTER = 1000  # milliseconds before a tick that failed to publish is tried again
STOP_TIMEOUT = 10.0  # seconds a stopping leader gets to finish the round it is in

_CONNECT_ERRORS: tuple[type[BaseException], ...] = (AmqtaskError, *_LOST_ERRORS, OSError)


class Clock(Protocol):
    """Where the scheduler reads the wall clock and sleeps: inject one to test without waiting."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The wall clock amqtask reads everywhere (`amqtask._wallclock`), and the event loop's
    sleep."""

    def now(self) -> float:
        return _wallclock.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def with_heartbeat(url: str, seconds: int) -> str:
    """`url` asking for an AMQP heartbeat of `seconds`, unless it asks for one already."""
    query = urlsplit(url).query
    if any(part.split("=", 1)[0] == "heartbeat" for part in query.split("&") if part):
        return url
    return f"{url}{'&' if query else '?'}heartbeat={seconds}"


class _Lost(Exception):
    """The session's connection, a channel or the lease consumer is gone."""


_SESSION_ENDS: tuple[type[BaseException], ...] = (_Lost, *_LOST_ERRORS)


def _tag(message: aiormq.abc.DeliveredMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None  # a consumer's delivery always has one
    return tag


class Scheduler:
    """Fires the app's schedules while this replica is the active one of its namespace.

    Start any number of replicas, in any processes and on any hosts: exactly one is active at a
    time, chosen by the broker; the others wait, and one of them takes over within seconds when
    the active one goes. `active` tells which this is. A lost connection is re-opened forever,
    with backoff; the replica then waits for its turn again.
    """

    def __init__(
        self,
        app: App,
        *,
        clock: Clock | None = None,
        metrics: SchedulerMetrics | None = None,
        heartbeat: int = DEFAULT_HEARTBEAT,
    ) -> None:
        """Raises `ScheduleError` for an app without schedules, `ValueError` for a heartbeat
        below 1 s."""
        if not app.schedules:
            raise ScheduleError("the app has no schedules: pass App(..., schedules=[...])")
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 1:
            raise ValueError(f"heartbeat must be a whole number of seconds >= 1, got {heartbeat!r}")
        self.app = app
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.identity = Identity.here()
        self.schedules = {item.name: item for item in app.schedules}
        # Each schedule's message, validated and encoded once; a tick adds its id and headers.
        self.messages = {
            item.name: _codec.encode_task(item.contract, item.payload) for item in app.schedules
        }
        # Seconds between looks at the clock while no tick is due. `amqtask.testing` raises it:
        # its virtual wall clock never steps, and an hour of 1-second wakes would be 3,600 steps.
        self.max_sleep = MAX_SLEEP
        self.active = False
        self.since: int | None = None  # when this replica last became active
        self.takeovers = 0  # times this replica became active
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def now(self) -> int:
        """The clock's time in milliseconds since the epoch."""
        return round(self.clock.now() * 1000)

    async def start(self) -> None:
        """Connect and subscribe; from then on run in the background until `stop`.

        Raises a `ConnectError` when the broker cannot be reached and `TopologyMissing` before
        `amqtask declare` created the scheduler queue.
        """
        session = await self._open()
        self._task = asyncio.create_task(self._serve(session), name="amqtask-scheduler")

    async def stop(self) -> None:
        """Stop: an active replica finishes the round it is in and records it, then leaves, and
        the next replica takes over at once."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        if not done:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        log.info("scheduler_stopped", takeovers=self.takeovers)

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until `stop` is set, then stop."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def _open(self) -> _Session:
        urls = [with_heartbeat(url, self.heartbeat) for url in self.app.urls]
        name = f"amqtask-scheduler {self.identity.host} pid {self.identity.pid}"
        connection = await open_own_connection(
            self.app.transport, urls, name=name, timeout=self.app.connect_timeout
        )
        try:
            return await _Session.open(self, connection)
        except BaseException:
            with suppress(Exception):
                await connection.close()
            raise

    async def _serve(self, session: _Session | None) -> None:
        retry = 0
        while not self._stop.is_set():
            if session is not None:
                await session.run()
                retry = 0
                if self._stop.is_set():
                    return
            retry += 1
            delay = BROKER_BACKOFF.delay(retry, random.random())
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            try:
                session = await self._open()
            except _CONNECT_ERRORS as exc:
                session = None
                log.warning("scheduler_reconnect_failed", attempt=retry, error=str(exc))


class _Session:
    """One connection: standby until the broker makes its consumer active, then the leader
    until the connection goes."""

    def __init__(
        self,
        owner: Scheduler,
        connection: AbstractConnection,
        records: AbstractChannel,
        ticks: AbstractChannel,
        raw: Any,
    ) -> None:
        self.owner = owner
        self.connection = connection
        self.records = records  # consumes the scheduler queue; publishes records, replies
        self.ticks = ticks  # publishes ticks (mandatory, confirmed)
        self.raw = raw  # `records`' aiormq channel: consume and ack
        self.queue = owner.app.names.scheduler_queue
        self.inbox: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()
        self.arrived = asyncio.Event()
        self.lost = asyncio.Event()
        self.ledger = Ledger()
        self.held: list[int] = []  # delivery tags of the state records this consumer holds
        self.held_entries = 0  # schedules those records name, summed: what a replay reads
        self.planned: dict[str, int] = {}  # schedule name -> when its next tick is published
        self.heap: list[tuple[int, str]] = []

    @classmethod
    async def open(cls, owner: Scheduler, connection: AbstractConnection) -> _Session:
        records = await connection.channel(publisher_confirms=True, on_return_raises=True)
        ticks = await connection.channel(publisher_confirms=True, on_return_raises=True)
        raw = await records.get_underlay_channel()
        session = cls(owner, connection, records, ticks, raw)
        connection.close_callbacks.add(session._closed)
        records.close_callbacks.add(session._closed)
        ticks.close_callbacks.add(session._closed)
        raw.on_consumer_cancel_callbacks.add(session._cancelled)
        try:
            await raw.basic_qos(prefetch_count=0)  # the leader holds the whole log
            await raw.basic_consume(session.queue, session._deliver, no_ack=False)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise TopologyMissing([f"queue {session.queue!r}"]) from None
        if owner.metrics is not None:
            owner.metrics.set_connected(True)
        return session

    # --- callbacks -------------------------------------------------------------------------

    async def _deliver(self, message: aiormq.abc.DeliveredMessage) -> None:
        self.inbox.put_nowait(message)
        self.arrived.set()

    def _closed(self, _sender: object, exc: BaseException | None = None) -> None:
        self.lost.set()

    def _cancelled(self, _frame: object) -> None:
        self.lost.set()  # the queue was deleted: nobody can be active on it any more

    # --- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for the lease, lead, and return once it is lost or the scheduler stops."""
        owner = self.owner
        log.info("scheduler_standby", queue=self.queue, host=owner.identity.host)
        reason = "stopped"
        try:
            await self.elect()
            if not owner._stop.is_set():
                await self.lead()
        except _SESSION_ENDS as exc:
            if not owner._stop.is_set():
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:
            # Whatever else went wrong (a record refused or unconfirmed, a bug): this session
            # ends, its connection closes so that another replica can take over, and this one
            # reconnects as a standby. A replica never stops scheduling on an error.
            reason = f"{type(exc).__name__}: {exc}"
            log.error("scheduler_failed", error=reason, exc_info=True)
        finally:
            was_active, owner.active = owner.active, False
            if owner.metrics is not None:
                owner.metrics.active.set(0)
                owner.metrics.set_connected(False)
            with suppress(Exception):
                await asyncio.wait_for(self.connection.close(), 5.0)
            if reason != "stopped" and was_active:  # a stop logs `scheduler_stopped`
                log.warning("scheduler_standby", reason=reason, host=owner.identity.host)
            elif reason != "stopped":
                log.warning("scheduler_connection_lost", reason=reason)

    async def _next(self) -> aiormq.abc.DeliveredMessage:
        """The next delivery; raises `_Lost` when the session ends first (or on stop)."""
        while self.inbox.empty():
            self.arrived.clear()
            await self._wait(None)
        return self.inbox.get_nowait()

    async def _wait(self, seconds: float | None) -> None:
        """Until a delivery arrives, `seconds` pass on the clock, or the session ends."""
        if not self.inbox.empty():
            return
        waits: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(self.arrived.wait()),
            asyncio.ensure_future(self.lost.wait()),
            asyncio.ensure_future(self.owner._stop.wait()),
        }
        if seconds is not None:
            waits.add(asyncio.ensure_future(self.owner.clock.sleep(seconds)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        if self.lost.is_set():
            raise _Lost("the connection or the lease consumer closed")
        if self.owner._stop.is_set() and not self.owner.active:
            raise _Lost("stopped")

    async def _ack(self, tag: int) -> None:
        await self.raw.basic_ack(tag)

    async def _put(self, record: Record) -> None:
        """Publish a record to the scheduler queue and wait for its confirm."""
        message = _codec.Outgoing(body=encode(record), message_id=_codec.new_message_id())
        await self._publish_on_records(self.queue, message, mandatory=True)

    async def _publish_on_records(
        self, routing_key: str, message: _codec.Outgoing, *, mandatory: bool
    ) -> None:
        """Publish through the default exchange on the records channel, whose publisher numbers
        all that goes out on it (records and answers alike)."""
        await _publish(
            self.records,
            "",
            routing_key,
            message,
            task="scheduler",
            timeout=self.owner.app.publish_timeout or 30.0,
            mandatory=mandatory,
        )

    def _read(self, message: aiormq.abc.DeliveredMessage) -> Record | None:
        try:
            return decode(message.body)
        except RecordError as exc:
            log.warning("scheduler_record_dropped", queue=self.queue, error=str(exc))
            return None

    # --- taking over -----------------------------------------------------------------------

    async def elect(self) -> None:
        """Wait until this consumer is the active one and has read every record (see the
        module's docstring), then take over."""
        owner = self.owner
        await self._put(Sync(os.urandom(8).hex()))
        marker: str | None = None
        deferred: list[aiormq.abc.DeliveredMessage] = []
        loop = asyncio.get_running_loop()
        first = 0.0
        while True:
            message = await self._next()
            record = self._read(message)
            tag = _tag(message)
            if marker is None:
                first = loop.time()  # the first delivery: the broker made this consumer active
                marker = os.urandom(8).hex()
                await self._put(Sync(marker))
            if isinstance(record, Sync) and record.id == marker:
                self.held.append(tag)  # held until the snapshot is confirmed: never an empty queue
                break
            if isinstance(record, Snapshot | Advance | Pause):
                self.ledger.apply(record)
                self.held.append(tag)
            elif isinstance(record, Query):
                deferred.append(message)
            else:
                await self._ack(tag)  # another replica's marker, an old one of ours, or junk
        previous = self.ledger.leader
        now = owner.now()
        for name in owner.schedules:
            progress = self.ledger.of(name)
            if progress.cursor is None:
                progress.advance(cursor=now)  # first seen now: its ticks count from here
        owner.since = now
        for message in deferred:  # answered (and acked) first: `_compact` acks all before it
            await self._answer(message)
        await self._compact(replace(owner.identity, since=now), now)
        owner.active = True
        owner.takeovers += 1
        if owner.metrics is not None:
            owner.metrics.active.set(1)
        log.info(
            "scheduler_active",
            host=owner.identity.host,
            pid=owner.identity.pid,
            schedules=len(owner.schedules),
            took_ms=round((loop.time() - first) * 1000, 1),
            previous=None if previous is None else f"{previous.host} pid {previous.pid}",
        )

    async def _compact(self, leader: Identity | None, now: int) -> None:
        """Replace the held records by one snapshot (confirmed before they are acked).

        One ack for all: every delivery before the last held one is held or was acked already
        (markers and queries are acked as they are read; later deliveries have higher tags).
        """
        covered, self.held, self.held_entries = self.held, [], 0
        await self._put(self.ledger.snapshot(leader, now))
        if covered:
            await self.raw.basic_ack(max(covered), multiple=True)

    async def _answer(self, message: aiormq.abc.DeliveredMessage) -> None:
        """Reply to `amqtask schedules` with the state and who is active."""
        props = message.header.properties
        if props.reply_to:
            owner = self.owner
            state = self.ledger.snapshot(replace(owner.identity, since=owner.since), owner.now())
            answer = _codec.Outgoing(
                body=encode(state),
                message_id=_codec.new_message_id(),
                headers={},
                correlation_id=props.correlation_id,
                persistent=False,
            )
            await self._publish_on_records(props.reply_to, answer, mandatory=False)
        await self._ack(_tag(message))

    # --- leading ---------------------------------------------------------------------------

    async def lead(self) -> None:
        owner = self.owner
        for name in owner.schedules:
            self._plan(name)
        while True:
            await self._take_records()
            now = owner.now()
            due: list[str] = []
            while self.heap and self.heap[0][0] <= now:
                fire_at, name = heapq.heappop(self.heap)
                if self.planned.get(name) == fire_at:
                    del self.planned[name]
                    due.append(name)
            if due:
                await self._fire(due, now)
            if len(self.held) > COMPACT_AFTER and self.held_entries > len(self.ledger.schedules):
                await self._compact(None, owner.now())
            if owner._stop.is_set():
                return
            wait = owner.max_sleep
            if self.heap:
                wait = min(max((self.heap[0][0] - owner.now()) / 1000, 0.0), owner.max_sleep)
            if wait > 0:
                await self._wait(wait)

    def _plan(self, name: str) -> None:
        """Put the schedule's next tick on the heap (paused or not: a paused schedule's cursor
        moves past its ticks as they fall due, without firing them)."""
        progress = self.ledger.of(name)
        self.planned.pop(name, None)
        if progress.cursor is None:
            return
        fire_at = next_fire_at(self.owner.schedules[name], progress.cursor)
        if fire_at is not None:
            self.planned[name] = fire_at
            heapq.heappush(self.heap, (fire_at, name))

    async def _take_records(self) -> None:
        """Everything delivered since the last look: records merged and held, queries answered."""
        while not self.inbox.empty():
            message = self.inbox.get_nowait()
            record = self._read(message)
            if isinstance(record, Snapshot | Advance | Pause):
                touched = self.ledger.apply(record)
                self.held.append(_tag(message))
                if not isinstance(record, Snapshot):  # what a snapshot would replace
                    self.held_entries += len(touched)
                if isinstance(record, Pause):
                    log.info(
                        "schedule_paused" if record.paused else "schedule_resumed",
                        schedule=record.schedule,
                        by=record.by,
                        at=iso(record.at),
                    )
                for name in touched & self.owner.schedules.keys():
                    if name not in self.planned or isinstance(record, Pause):
                        self._plan(name)
            elif isinstance(record, Query):
                await self._answer(message)
            else:
                await self._ack(_tag(message))
        self.arrived.clear()

    async def _fire(self, names: list[str], now: int) -> None:
        """Decide each schedule's ticks, publish them, record the new cursors."""
        owner = self.owner
        decisions = {}
        for name in names:
            item, progress = owner.schedules[name], self.ledger.of(name)
            assert progress.cursor is not None
            if progress.paused:
                decisions[name] = Decision(skip_to=item.last_due_before(now + 1))
            else:
                decisions[name] = decide(item, progress.cursor, now)
        ticks = [(owner.schedules[n], due) for n, d in decisions.items() for due in d.fire]
        failed = await self._publish_all(ticks)
        cursors: dict[str, int] = {}
        fired: dict[str, int] = {}
        for name, decision in decisions.items():
            item, progress = owner.schedules[name], self.ledger.of(name)
            cursor, last = decision.skip_to, None
            for due in decision.fire:
                if (name, due) in failed:
                    break
                cursor = last = due
            if decision.missed:
                self._missed(item, decision.missed, decision.first_missed, decision.last_missed)
            progress.advance(cursor=cursor, fired=last)
            if cursor is not None:
                cursors[name] = cursor
            if last is not None:
                fired[name] = last
            if any(key[0] == name for key in failed):
                self.planned[name] = owner.now() + RETRY_AFTER
                heapq.heappush(self.heap, (self.planned[name], name))
            else:
                self._plan(name)
        if cursors or fired:
            await self._put(Advance(cursors, fired))

    def _missed(self, item: Schedule, count: int, first: int | None, last: int | None) -> None:
        log.warning(
            "tick_missed",
            schedule=item.name,
            task=item.contract.name,
            count=count,
            first_due=None if first is None else iso(first),
            last_due=None if last is None else iso(last),
            misfire=item.misfire.value,
            catch_up_s=item.catch_up.total_seconds(),
        )
        if self.owner.metrics is not None:
            self.owner.metrics.missed.labels(item.name).inc(count)

    async def _publish_all(self, ticks: list[tuple[Schedule, int]]) -> set[tuple[str, int]]:
        """Publish the ticks, `IN_FLIGHT` at a time; return those that failed. Raises what a lost
        connection raises."""
        slots = asyncio.Semaphore(IN_FLIGHT)
        failed: set[tuple[str, int]] = set()

        async def one(item: Schedule, due: int) -> None:
            async with slots:
                if not await self._publish_tick(item, due):
                    failed.add((item.name, due))

        results = await asyncio.gather(*(one(i, d) for i, d in ticks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return failed

    async def _publish_tick(self, item: Schedule, due: int) -> bool:
        owner = self.owner
        contract = item.contract
        template = owner.messages[item.name]
        due_text = iso(due)
        message = replace(
            template,
            message_id=tick_message_id(item.name, due),
            headers={**template.headers, _codec.SCHEDULE: item.name, _codec.DUE: due_text},
        )
        try:
            await _publish(
                self.ticks,
                owner.app.names.task_exchange,
                contract.routing_key,
                message,
                task=contract.name,
                timeout=owner.app.publish_timeout or 30.0,
                mandatory=True,
            )
        except (Unroutable, PublishNacked, PublishTimeout) as exc:
            log.warning(
                "tick_failed",
                schedule=item.name,
                task=contract.name,
                due=due_text,
                message_id=message.message_id,
                error=str(exc),
                retry_in_s=RETRY_AFTER / 1000,
            )
            return False
        log.info(
            "tick_fired",
            schedule=item.name,
            task=contract.name,
            due=due_text,
            message_id=message.message_id,
            late_ms=owner.now() - item.fire_at(due),
        )
        if owner.metrics is not None:
            owner.metrics.fired.labels(item.name).inc()
        return True
