"""The worker's semantics, run twice: on the real broker and on `amqtask.testing`'s in-memory one.

Each test runs once per `env`: "broker" (the shared RabbitMQ, real time) and "memory"
(`TestApp`, the virtual clock). The steps and the assertions are the same; only how time passes
differs (`env.elapse`, `env.until`, `env.finish`). Any difference is a bug in one of them. The
delays are short (1-2 s retries) so the broker run stays fast.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask import _codec, _schedule_admin, _wallclock
from amqtask._codec import Outgoing
from amqtask._control import inspect_workers
from amqtask._dead_letters import last_death_reason
from amqtask._schedule import tick_message_id
from amqtask._scheduler import Scheduler
from amqtask._transport import AioPikaTransport, Transport
from amqtask.testing import MemoryTransport, TestApp

from .conftest import AppFactory, dead_letters, queue_depth, running, wait_for

T = TypeVar("T")


class Job(BaseModel):
    n: int


class Doubled(BaseModel):
    m: int


class Flaky(RuntimeError):
    pass


# --- the two environments -----------------------------------------------------------------------


class BrokerEnv:
    """The shared RabbitMQ: apps on a unique namespace, deleted afterwards; real time."""

    name = "broker"

    def __init__(self, make_app: AppFactory, amqp: AbstractConnection, url: str) -> None:
        self._make_app, self._amqp, self._url = make_app, amqp, url
        self._schedulers: list[Scheduler] = []

    def app(self, contracts: list[amqtask.Contract[Any, Any]], **options: Any) -> amqtask.App:
        return self._make_app(contracts, **options)

    @asynccontextmanager
    async def running(self, app: amqtask.App, **settings: Any) -> AsyncIterator[None]:
        await app.declare()
        async with AsyncExitStack() as stack:
            if app.handlers:
                await stack.enter_async_context(running(app, **settings))
            else:
                await stack.enter_async_context(app)
            if app.schedules:
                stack.push_async_callback(self._stop_schedulers)
                await self.start_scheduler(app)
            yield

    async def start_scheduler(self, app: amqtask.App) -> None:
        scheduler = Scheduler(app)
        self._schedulers.append(scheduler)
        await scheduler.start()
        await wait_for(lambda: scheduler.active, timeout=10)

    async def stop_scheduler(self) -> None:
        await self._schedulers[-1].stop()

    async def _stop_schedulers(self) -> None:
        for scheduler in self._schedulers:
            await scheduler.stop()

    def transport(self) -> Transport:
        return AioPikaTransport(self._url)

    async def elapse(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        await wait_for(predicate, timeout=timeout)

    async def finish(self, awaitable: Awaitable[T]) -> T:
        return await awaitable

    async def dead_letters(self, queue: str, count: int) -> list[Any]:
        return await dead_letters(self._amqp, queue, count)

    async def messages(self, queue: str) -> list[Any]:
        """Take every ready message off `queue`, head first."""
        taken = []
        async with self._amqp.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            while (message := await declared.get(no_ack=True, fail=False)) is not None:
                taken.append(message)
        return taken

    async def depth(self, queue: str) -> int:
        return await queue_depth(self._amqp, queue)


class MemoryEnv:
    """`TestApp` on the in-memory broker; time moves only when the test moves it."""

    name = "memory"

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._testapp: TestApp | None = None

    @property
    def testapp(self) -> TestApp:
        assert self._testapp is not None, "only inside `env.running(...)`"
        return self._testapp

    def app(self, contracts: list[amqtask.Contract[Any, Any]], **options: Any) -> amqtask.App:
        return amqtask.App(
            "amqp://memory.invalid/", contracts, namespace=self._namespace, **options
        )

    @asynccontextmanager
    async def running(self, app: amqtask.App, **settings: Any) -> AsyncIterator[None]:
        async with TestApp(app, worker=amqtask.WorkerSettings(**settings)) as self._testapp:
            yield

    def transport(self) -> Transport:
        return MemoryTransport(self.testapp.broker)

    async def start_scheduler(self, app: amqtask.App) -> None:
        await self.testapp.start_scheduler(app)

    async def stop_scheduler(self) -> None:
        await self.testapp.schedulers[-1].stop()

    async def elapse(self, seconds: float) -> None:
        await self.testapp.advance(seconds)

    async def until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        for _ in range(int(timeout / 0.1) + 1):
            if predicate():
                return
            await self.testapp.advance(0.1)
        pytest.fail(f"condition not met within {timeout} s (virtual): {predicate}")

    async def finish(self, awaitable: Awaitable[T]) -> T:
        task = asyncio.ensure_future(awaitable)
        for _ in range(600):
            if task.done():
                break
            await self.testapp.advance(0.1)
        return await task

    async def dead_letters(self, queue: str, count: int) -> list[Any]:
        def arrived() -> bool:
            return len(self.testapp.broker.messages(f"{queue}.dead")) >= count

        await self.until(arrived)
        return self.testapp.broker.messages(f"{queue}.dead")[:count]

    async def depth(self, queue: str) -> int:
        return len(self.testapp.broker.messages(queue))

    async def messages(self, queue: str) -> list[Any]:
        return self.testapp.broker.messages(queue)


Env = BrokerEnv | MemoryEnv


@pytest.fixture(params=["broker", "memory"])
def env(
    request: pytest.FixtureRequest,
    make_app: AppFactory,
    amqp: AbstractConnection,
    broker_url: str,
    unique: str,
) -> Env:
    if request.param == "broker":
        return BrokerEnv(make_app, amqp, broker_url)
    return MemoryEnv(unique)


# What reading a dead letter with basic.get (the broker env) adds: RabbitMQ 3.10 marks a message
# got from a quorum queue with its delivery count, 0 the first time. The memory env reads the
# queue without a delivery.
GET_ADDS = {"x-delivery-count"}


def now() -> float:
    return asyncio.get_running_loop().time()


# --- ack ----------------------------------------------------------------------------------------


async def test_every_sent_task_runs_once_and_is_acked(env: Env, unique: str) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = env.app([job])
    seen: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        seen.append(task.n)

    async with env.running(app):
        for n in range(20):
            await app.send(job, Job(n=n))
        await env.until(lambda: len(seen) == 20)
        await env.elapse(0.5)
        assert await env.depth(job.queue) == 0
        assert await env.depth(f"{job.queue}.dead") == 0

    assert sorted(seen) == list(range(20))


# --- retries ------------------------------------------------------------------------------------


async def test_a_failing_task_is_retried_with_backoff_then_dead_lettered_with_its_failure(
    env: Env, unique: str
) -> None:
    job = amqtask.contract(
        f"{unique}.job", Job, retry=amqtask.Retry(attempts=3, initial=1.0, backoff=2.0)
    )
    app = env.app([job])
    runs: list[float] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        runs.append(now())
        raise Flaky(f"attempt {len(runs)} failed")

    async with env.running(app):
        sent = await app.send(job, Job(n=1))
        (letter,) = await env.dead_letters(job.queue, 1)
        await env.elapse(1.5)  # no fourth attempt sneaks in

    gaps = [later - earlier for earlier, later in itertools.pairwise(runs)]
    assert len(runs) == 3
    assert 1.0 <= gaps[0] < 2.5
    assert 2.0 <= gaps[1] < 3.5
    assert letter.message_id == sent
    assert letter.type == job.name  # the AMQP type, kept through the retries and dead-lettering
    headers = letter.headers
    assert set(headers) - GET_ADDS == {
        "amqtask-task",
        "amqtask-version",
        "amqtask-attempt",
        "amqtask-reason",
        "amqtask-error",
        "amqtask-error-type",
        "amqtask-traceback",
        "amqtask-first-failed-at",
        "amqtask-failed-at",
        "amqtask-queue",
    }
    assert headers["amqtask-reason"] == "handler_error"
    assert headers["amqtask-attempt"] == 3
    assert headers["amqtask-error"] == "Flaky: attempt 3 failed"
    assert headers["amqtask-error-type"].endswith("Flaky")
    assert headers["amqtask-queue"] == job.queue
    first = datetime.fromisoformat(headers["amqtask-first-failed-at"])
    last = datetime.fromisoformat(headers["amqtask-failed-at"])
    assert timedelta(seconds=2.5) < last - first < timedelta(seconds=6)


async def test_a_task_passing_the_same_delay_level_again_is_never_dropped_as_a_cycle(
    env: Env, unique: str
) -> None:
    job = amqtask.contract(
        f"{unique}.job", Job, retry=amqtask.Retry(attempts=4, initial=1.0, backoff=1.0)
    )
    app = env.app([job])
    runs: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        runs.append(task.n)
        if len(runs) < 4:
            raise Flaky("not yet")

    async with env.running(app):
        await app.send(job, Job(n=5))
        await env.until(lambda: len(runs) == 4)
        await env.elapse(0.5)
        assert await env.depth(f"{job.queue}.dead") == 0
        assert await env.depth(job.queue) == 0

    assert runs == [5, 5, 5, 5]


async def test_unlisted_errors_and_reject_go_to_the_dead_letter_queue_at_once(
    env: Env, unique: str
) -> None:
    job = amqtask.contract(
        f"{unique}.job", Job, retry=amqtask.Retry(attempts=5, initial=1.0, on=(Flaky,))
    )
    app = env.app([job])
    runs: list[int] = []

    @app.handler(job)
    def handle(task: Job) -> None:  # a plain def, in a thread
        runs.append(task.n)
        if task.n == 1:
            raise ValueError("not retried")
        raise amqtask.Reject("the order was cancelled")

    async with env.running(app):
        await app.send(job, Job(n=1))
        await app.send(job, Job(n=2))
        letters = await env.dead_letters(job.queue, 2)
        await env.elapse(1.5)

    assert sorted(runs) == [1, 2]
    by_body = {letter.body: letter.headers for letter in letters}
    assert by_body[b'{"n":1}']["amqtask-reason"] == "handler_error"
    assert by_body[b'{"n":1}']["amqtask-attempt"] == 1
    assert by_body[b'{"n":2}']["amqtask-reason"] == "rejected"
    assert by_body[b'{"n":2}']["amqtask-error"] == "the order was cancelled"


async def test_delayed_sends_arrive_in_delay_order_and_never_early(env: Env, unique: str) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = env.app([job])
    arrived: dict[int, float] = {}

    @app.handler(job)
    async def handle(task: Job) -> None:
        arrived[task.n] = now()

    async with env.running(app):
        sent_at = now()
        await app.send(job, Job(n=2), delay=timedelta(seconds=2))
        await app.send(job, Job(n=1), eta=datetime.now(UTC) + timedelta(seconds=1))
        await env.until(lambda: len(arrived) == 2)

    assert sorted(arrived, key=arrived.__getitem__) == [1, 2]
    for n, at in arrived.items():
        assert n <= at - sent_at < n + 1.5


# --- messages that are not tasks ----------------------------------------------------------------


async def test_messages_that_are_not_tasks_are_dead_lettered_with_their_reason(
    env: Env, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = env.app([job])
    seen: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        seen.append(task.n)

    raw = [
        (b"{not json", {_codec.TASK: job.name}, "application/json"),
        (b'{"n": "x"}', {_codec.TASK: job.name}, "application/json"),
        (b'{"n": 1}', {_codec.TASK: f"{unique}.other"}, "application/json"),
        (b'{"n": 1}', {}, "application/json"),
        (b'{"n": 1}', {_codec.TASK: job.name}, "text/plain"),
    ]
    async with env.running(app):
        for i, (body, headers, content_type) in enumerate(raw):
            message = Outgoing(body, f"raw-{i}", headers=headers, content_type=content_type)
            await app.transport.publish(
                app.names.task_exchange, job.routing_key, message, task="raw", timeout=10
            )
        await app.send(job, Job(n=7))  # and work goes on
        letters = await env.dead_letters(job.queue, len(raw))
        await env.until(lambda: seen == [7])

    reasons = {letter.message_id: letter.headers["amqtask-reason"] for letter in letters}
    assert reasons == {
        "raw-0": "undecodable_body",
        "raw-1": "invalid_payload",
        "raw-2": "unknown_task",
        "raw-3": "missing_task_header",
        "raw-4": "unsupported_content_type",
    }
    for letter in letters:
        assert set(letter.headers) - {"amqtask-task", *GET_ADDS} == {
            "amqtask-reason",
            "amqtask-error",
            "amqtask-failed-at",
            "amqtask-queue",
        }
    assert letters[2].body == b'{"n": 1}'


# --- calls --------------------------------------------------------------------------------------


@pytest.mark.parametrize("calls", ["durable", "transient"])
async def test_a_call_returns_its_result_and_a_failing_handler_answers_with_remote_error(
    env: Env, unique: str, calls: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled, calls=calls)
    app = env.app([double])
    runs: list[int] = []

    @app.handler(double)
    async def handle(task: Job) -> Any:
        runs.append(task.n)
        if task.n == 0:
            raise KeyError("zero")
        if task.n < 0:
            return {"m": "not a number"}
        return Doubled(m=task.n * 2)

    async with env.running(app):
        assert await env.finish(app.call(double, Job(n=21), timeout=10)) == Doubled(m=42)
        with pytest.raises(amqtask.RemoteError) as failed:
            await env.finish(app.call(double, Job(n=0), timeout=10))
        with pytest.raises(amqtask.InvalidReply) as invalid:
            await env.finish(app.call(double, Job(n=-1), timeout=10))
        letters = await env.dead_letters(double.queue, 2)
        await env.elapse(1.5)  # a call is never retried

    assert runs == [21, 0, -1]
    assert failed.value.reason == "handler_error"
    assert failed.value.remote_type == "builtins.KeyError"
    assert failed.value.remote_message == "'zero'"
    assert "KeyError" in failed.value.remote_traceback
    assert invalid.value.reason == "invalid_result"
    assert "Doubled" in invalid.value.remote_message
    assert [letter.headers["amqtask-reason"] for letter in letters] == [
        "handler_error",
        "invalid_result",
    ]


@pytest.mark.parametrize("calls", ["durable", "transient"])
async def test_a_call_nobody_serves_times_out_and_the_broker_dead_letters_its_request(
    env: Env, unique: str, calls: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled, calls=calls)
    # Where the request waits: the work queue, or for transient calls its call queue.
    waits_in = double.queue if calls == "durable" else f"{double.queue}.calls"
    app = env.app([double])  # no handler: nothing consumes the queue
    async with env.running(app):
        started = now()
        with pytest.raises(amqtask.CallTimeout, match=f"no reply within 1 s.*'{waits_in}'"):
            await env.finish(app.call(double, Job(n=1), timeout=1))
        waited = now() - started
        (letter,) = await env.dead_letters(double.queue, 1)

    assert 1 <= waited < 2
    assert last_death_reason(letter.headers) == "expired"
    assert letter.headers["x-first-death-reason"] == "expired"
    assert letter.headers["x-first-death-queue"] == waits_in
    (death,) = letter.headers["x-death"]
    assert death["reason"] == "expired"
    assert death["count"] == 1
    assert death["original-expiration"] == "1000"
    assert letter.body == b'{"n":1}'


async def test_a_request_held_by_a_busy_worker_past_its_deadline_is_dropped_unrun(
    env: Env, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    app = env.app([double])
    runs: list[int] = []

    @app.handler(double)
    async def handle(task: Job) -> Doubled:
        runs.append(task.n)
        if task.n == 1:
            await asyncio.sleep(1.5)
        return Doubled(m=task.n * 2)

    with structlog.testing.capture_logs() as logs:
        async with env.running(app, concurrency=1, prefetch=2):
            first = asyncio.ensure_future(app.call(double, Job(n=1), timeout=10))
            await env.until(lambda: runs == [1])
            with pytest.raises(amqtask.CallTimeout):
                await env.finish(app.call(double, Job(n=2), timeout=0.5))
            assert await env.finish(first) == Doubled(m=2)
            await env.until(lambda: any(e["event"] == "call_expired" for e in logs))
            assert await env.depth(f"{double.queue}.dead") == 0

    assert runs == [1]


# --- asking the workers -------------------------------------------------------------------------


async def test_a_worker_answers_inspect_with_the_deliveries_it_holds_and_its_outcomes(
    env: Env, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = env.app([job])
    running_now: list[int] = []
    done: list[int] = []
    release = asyncio.Event()

    @app.handler(job)
    async def handle(task: Job) -> None:
        running_now.append(task.n)
        await release.wait()
        done.append(task.n)

    async with env.running(app, concurrency=2):
        await app.send(job, Job(n=1))
        await app.send(job, Job(n=2))
        await env.until(lambda: len(running_now) == 2)
        (busy,) = await inspect_workers(app, timeout=1.0)
        release.set()
        await env.until(lambda: len(done) == 2)
        await env.elapse(0.5)  # the acks
        (idle,) = await inspect_workers(app, timeout=1.0)

    assert (busy["in_flight"], busy["running"], busy["processed"]) == (2, 2, {})
    assert busy["pool"] is None
    assert busy["concurrency"] == 2
    assert sorted(busy["queues"]) == sorted([job.queue, f"{job.queue}.due"])
    assert (idle["in_flight"], idle["processed"]) == (0, {"succeeded": 2})


# --- bounded queues and redeliveries ------------------------------------------------------------


async def test_a_full_queue_refuses_sends_and_drop_head_dead_letters_the_oldest(
    env: Env, unique: str
) -> None:
    bounded = amqtask.contract(f"{unique}.bounded", Job, max_length=2, queue_type="classic")
    # RabbitMQ 3.10's quorum queue refuses only once it is over its limit: one message more.
    quorum = amqtask.contract(f"{unique}.quorum", Job, max_length=2)
    dropping = amqtask.contract(
        f"{unique}.dropping", Job, max_length=1, overflow="drop-head", queue_type="classic"
    )
    app = env.app([bounded, quorum, dropping])  # no handlers: the queues fill up
    async with env.running(app):
        for contract, room in ((bounded, 2), (quorum, 3)):
            for n in range(room):
                await app.send(contract, Job(n=n))
            with pytest.raises(amqtask.QueueFull, match="is full"):
                await app.send(contract, Job(n=room))
        oldest = await app.send(dropping, Job(n=1))
        await app.send(dropping, Job(n=2))
        (dropped,) = await env.dead_letters(dropping.queue, 1)
        assert await env.depth(bounded.queue) == 2
        assert await env.depth(quorum.queue) == 3
        assert await env.depth(dropping.queue) == 1

    assert dropped.message_id == oldest
    assert last_death_reason(dropped.headers) == "maxlen"
    assert dropped.headers["x-first-death-reason"] == "maxlen"


async def test_a_delivery_never_acked_comes_back_redelivered_until_its_delivery_limit(
    env: Env, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, delivery_limit=2)
    app = env.app([job])  # no worker: each time, a consumer takes it and its connection drops
    seen: list[tuple[bool | None, Any]] = []
    async with env.running(app):
        sent = await app.send(job, Job(n=1))
        for _ in range(3):
            transport = env.transport()
            await transport.connect()
            got = asyncio.Event()

            async def take(delivery: Any, got: asyncio.Event = got) -> None:
                seen.append((delivery.redelivered, delivery.headers.get("x-delivery-count")))
                got.set()

            await transport.consume(job.queue, take, prefetch=1)
            await env.until(got.is_set)
            await transport.close()  # unacked: back to the queue
        (letter,) = await env.dead_letters(job.queue, 1)
        assert await env.depth(job.queue) == 0

    assert seen == [(False, None), (True, 1), (True, 2)]
    assert letter.message_id == sent
    assert last_death_reason(letter.headers) == "delivery_limit"


# --- periodic tasks -----------------------------------------------------------------------------


async def test_a_schedule_fires_each_second_with_its_headers_and_a_pause_holds_its_ticks(
    env: Env, unique: str
) -> None:
    ping = amqtask.contract(f"{unique}.ping", Job)
    app = env.app([ping], schedules=[amqtask.schedule("beat", ping, Job(n=5), every=1)])

    async with env.running(app):  # no worker: the ticks wait in the queue
        await env.elapse(3.5)
        assert 3 <= await env.depth(ping.queue) <= 4
        await _schedule_admin.set_paused(app, "beat", True)  # `amqtask schedules APP pause`
        await env.elapse(0.5)  # a tick due as the pause arrived may still have fired
        paused = await env.depth(ping.queue)
        await env.elapse(2.5)
        assert await env.depth(ping.queue) == paused
        listing = await _schedule_admin.read_state(app)
        (row,) = _schedule_admin.rows(app, listing, round(_wallclock.now() * 1000))
        assert listing.source == _schedule_admin.Source.ACTIVE
        assert row["paused"] is True
        resumed = _wallclock.utc_now()
        await _schedule_admin.set_paused(app, "beat", False)
        await env.elapse(2.5)
        ticks = await env.messages(ping.queue)

    dues = [datetime.fromisoformat(tick.headers["amqtask-due"]) for tick in ticks]
    assert len(ticks) >= paused + 2
    assert [b - a for a, b in itertools.pairwise(dues[:paused])] == [timedelta(seconds=1)] * (
        paused - 1
    )
    assert all(due >= resumed for due in dues[paused:])  # none of the paused ticks fired later
    assert dues == sorted(set(dues))
    for tick, due in zip(ticks, dues, strict=True):
        assert due.microsecond == 0
        assert tick.headers["amqtask-schedule"] == "beat"
        assert tick.headers["amqtask-task"] == ping.name
        assert tick.message_id == tick_message_id("beat", round(due.timestamp() * 1000))
        assert tick.type == ping.name
        assert tick.body == b'{"n":5}'


async def test_ticks_missed_while_no_scheduler_ran_follow_the_misfire_policy(
    env: Env, unique: str
) -> None:
    ping = amqtask.contract(f"{unique}.ping", Job)
    beat = amqtask.schedule("beat", ping, Job(n=1), every=2, catch_up=1, misfire="latest")
    app = env.app([ping], schedules=[beat])

    async with env.running(app):
        await env.elapse(2.0)
        even = (_wallclock.now() // 2 + 1) * 2  # the next tick
        await env.elapse(even + 0.3 - _wallclock.now())
        before = await env.depth(ping.queue)  # its tick has fired
        await env.stop_scheduler()
        await env.elapse(even + 5.5 - _wallclock.now())
        # Back at +5.5: the tick at +2 is long missed, the one at +4 is 1.5 s old, past
        # catch_up; "latest" fires it alone, once.
        await env.start_scheduler(app)
        await env.elapse(0.2)
        assert await env.depth(ping.queue) == before + 1
        await env.elapse(1.0)  # and the tick at +6 as usual
        ticks = await env.messages(ping.queue)

    dues = [datetime.fromisoformat(tick.headers["amqtask-due"]).timestamp() for tick in ticks]
    assert dues[before - 1 :] == [even, even + 4, even + 6]


# --- the task store -----------------------------------------------------------------------------


async def test_the_store_follows_tasks_to_their_result_failure_and_revocation(
    env: Env, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(
        f"{unique}.job", Job, returns=Doubled, retry=amqtask.Retry(attempts=2, initial=1.0)
    )
    app = env.app([job], store=f"sqlite:///{tmp_path}/tasks.db")
    started = asyncio.Event()
    finished: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> Doubled:
        if task.n < 0:
            raise Flaky("negative")
        if task.n == 0:
            started.set()
            await asyncio.sleep(3600)
        finished.append(task.n)
        return Doubled(m=task.n * 2)

    async with env.running(app):
        ok = await app.send(job, Job(n=2))
        bad = await app.send(job, Job(n=-1))
        slow = await app.send(job, Job(n=0))
        later = await app.send(job, Job(n=3), delay=60)
        scheduled = await app.task(later)
        assert await env.finish(app.result(job, ok, timeout=20)) == Doubled(m=4)
        await env.until(started.is_set)
        assert await state_of(app, slow) == "running"
        await app.revoke(slow, terminate=True)  # stops it now: the broadcast
        await app.revoke(later)  # it will not run when its delay is over
        with pytest.raises(amqtask.RemoteError) as failed:
            await env.finish(app.result(job, bad, timeout=20))
        with pytest.raises(amqtask.TaskRevoked):
            await env.finish(app.result(job, slow, timeout=20))
        infos = {task_id: await app.task(task_id) for task_id in (ok, bad, slow, later)}

    assert scheduled is not None
    assert scheduled.state.value == "scheduled"
    assert failed.value.reason == "handler_error"
    assert failed.value.remote_type.endswith("Flaky")
    summary = {
        task_id: (info.state.value, info.attempts) for task_id, info in infos.items() if info
    }
    assert summary == {
        ok: ("succeeded", 1),
        bad: ("failed", 2),
        slow: ("revoked", 1),
        later: ("revoked", 0),
    }
    assert infos[ok] is not None
    assert infos[ok].result == Doubled(m=4)
    assert finished == [2]


async def state_of(app: amqtask.App, task_id: str) -> str | None:
    info = await app.task(task_id)
    return None if info is None else info.state.value
