"""Retries and delays on the broker: backoff through the delay levels, then a dead letter."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask

from .conftest import AppFactory, dead_letters, queue_depth, running, wait_for


class Job(BaseModel):
    n: int


class Flaky(RuntimeError):
    pass


async def test_an_always_failing_task_runs_attempts_times_with_backoff_then_dead_letters(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(
        f"{unique}.job", Job, retry=amqtask.Retry(attempts=3, initial=1.0, backoff=2.0)
    )
    app = make_app([job])
    runs: list[float] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        runs.append(time.monotonic())
        raise Flaky(f"attempt {len(runs)} failed")

    await app.declare()
    async with running(app):
        async with make_app([job]) as producer:
            sent = await producer.send(job, Job(n=1))
        await wait_for(lambda: len(runs) == 3, timeout=20)
        (letter,) = await dead_letters(amqp, job.queue, 1)
        await asyncio.sleep(1.5)  # no fourth attempt sneaks in

    gaps = [later - earlier for earlier, later in itertools.pairwise(runs)]
    print(f"attempts: {len(runs)}, gaps between them: {[round(g, 2) for g in gaps]} s")
    assert len(runs) == 3
    # Backoff 1 s then 2 s: never early, and within 1.5 s of the target (whole-second delays).
    assert 1.0 <= gaps[0] < 2.5
    assert 2.0 <= gaps[1] < 3.5
    assert letter.message_id == sent
    headers = letter.headers
    assert headers["amqtask-reason"] == "handler_error"
    assert headers["amqtask-attempt"] == 3
    assert headers["amqtask-error"] == "Flaky: attempt 3 failed"
    assert headers["amqtask-error-type"].endswith("Flaky")
    assert "raise Flaky" in headers["amqtask-traceback"]
    first = datetime.fromisoformat(headers["amqtask-first-failed-at"])
    last = datetime.fromisoformat(headers["amqtask-failed-at"])
    assert timedelta(seconds=2.5) < last - first < timedelta(seconds=6)
    assert not any(key.startswith("x-death") for key in headers)
    assert await queue_depth(amqp, job.queue) == 0


async def test_a_task_that_fails_then_succeeds_is_acked_and_not_dead_lettered(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    # Passing the same delay level twice must not trip the broker's dead-letter cycle detection.
    job = amqtask.contract(
        f"{unique}.job", Job, retry=amqtask.Retry(attempts=4, initial=1.0, backoff=1.0)
    )
    app = make_app([job])
    runs: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        runs.append(task.n)
        if len(runs) < 4:
            raise Flaky("not yet")

    await app.declare()
    async with running(app):
        async with make_app([job]) as producer:
            await producer.send(job, Job(n=5))
        await wait_for(lambda: len(runs) == 4, timeout=20)
        await asyncio.sleep(0.5)

    assert runs == [5, 5, 5, 5]
    assert await queue_depth(amqp, f"{job.queue}.dead") == 0
    assert await queue_depth(amqp, job.queue) == 0


async def test_only_the_listed_errors_are_retried_and_reject_dead_letters_at_once(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(
        f"{unique}.job", Job, retry=amqtask.Retry(attempts=5, initial=1.0, on=(Flaky,))
    )
    app = make_app([job])
    runs: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        runs.append(task.n)
        if task.n == 1:
            raise ValueError("not retried")
        raise amqtask.Reject("the order was cancelled")

    await app.declare()
    async with running(app):
        async with make_app([job]) as producer:
            await producer.send(job, Job(n=1))
            await producer.send(job, Job(n=2))
        letters = await dead_letters(amqp, job.queue, 2)
        await asyncio.sleep(1.5)

    assert sorted(runs) == [1, 2]
    reasons = {letter.body: letter.headers["amqtask-reason"] for letter in letters}
    assert reasons == {b'{"n":1}': "handler_error", b'{"n":2}': "rejected"}
    rejected = next(letter for letter in letters if letter.body == b'{"n":2}')
    assert rejected.headers["amqtask-error"] == "the order was cancelled"


async def test_delayed_sends_arrive_in_delay_order_and_never_early(
    make_app: AppFactory, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    arrived: dict[int, float] = {}

    @app.handler(job)
    async def handle(task: Job) -> None:
        arrived[task.n] = time.monotonic()

    await app.declare()
    async with running(app):
        async with make_app([job]) as producer:
            sent_at = time.monotonic()
            await producer.send(job, Job(n=1), delay=1)
            await producer.send(job, Job(n=5), delay=timedelta(seconds=5))
            await producer.send(job, Job(n=3), eta=datetime.now(UTC) + timedelta(seconds=3))
        await wait_for(lambda: len(arrived) == 3, timeout=20)

    waited = {n: round(at - sent_at, 2) for n, at in arrived.items()}
    print(f"asked 1, 5, 3 s; arrived after {waited} s")
    assert sorted(arrived, key=arrived.__getitem__) == [1, 3, 5]
    for n, seconds in waited.items():
        assert n <= seconds < n + 1.5


async def test_invalid_delays_are_refused_before_publishing(
    make_app: AppFactory, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    async with app:
        with pytest.raises(ValueError, match="positive"):
            await app.send(job, Job(n=1), delay=-1)
        with pytest.raises(ValueError, match="exceeds"):
            await app.send(job, Job(n=1), delay=timedelta(days=30))
        with pytest.raises(ValueError, match="timezone"):
            await app.send(job, Job(n=1), eta=datetime.now() + timedelta(seconds=5))
