"""A full or slow queue never stalls another queue's delays and retries (issue 9, invariant 9).

The delay levels are shared by every queue of a namespace. Their last hop used to dead-letter
straight into the work queue: a full bounded queue refused it, and RabbitMQ's at-least-once
dead-letter worker of level 0 then held 32 messages and retried only after
`dead_letter_worker_publisher_confirm_timeout` (180 s), so every other queue's delays waited too.
The last hop now targets the work queue's unbounded due queue.
"""

from __future__ import annotations

import asyncio
import time

from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask

from .conftest import AppFactory, queue_depth, running, wait_for


class Job(BaseModel):
    n: int


DELAYED = 50
ARRIVES_WITHIN = 15.0  # seconds for a 1 s delay; it took minutes before the due queues


async def fill(app: amqtask.App, job: amqtask.Contract[Job, None], first: int) -> list[int]:
    """Send tasks numbered from `first` until the bounded queue refuses one; return those sent.

    A quorum queue applies its limit slightly late, so it may take a message or so more than
    `max_length`.
    """
    sent: list[int] = []
    for n in range(first, first + 100):
        try:
            await app.send(job, Job(n=n))
        except amqtask.QueueFull:
            return sent
        sent.append(n)
    raise AssertionError(f"{job.queue!r} never refused a send: is it bounded?")


async def test_a_full_queue_does_not_hold_up_another_queues_delayed_task_and_loses_nothing(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    full = amqtask.contract(f"{unique}.full", Job, max_length=3)
    other = amqtask.contract(f"{unique}.other", Job)
    producer = make_app([full, other])
    await producer.declare()
    arrived: dict[int, float] = {}
    ran: list[int] = []

    watcher = make_app([full, other])

    @watcher.handler(other)
    async def on_other(task: Job) -> None:
        arrived[task.n] = time.monotonic()

    # Nothing consumes `full` yet: it stays full while its 50 delayed tasks come due.
    async with producer, running(watcher):
        filled = await fill(producer, full, first=1000)
        for n in range(DELAYED):
            await producer.send(full, Job(n=n), delay=1)
        # Let the 50 reach the end of their delay first, as they did when they wedged level 0.
        await asyncio.sleep(1.5)
        sent_at = time.monotonic()
        await producer.send(other, Job(n=1), delay=1)
        await wait_for(lambda: 1 in arrived, timeout=ARRIVES_WITHIN)
        late = arrived[1] - sent_at
        print(f"a 1 s delay to another queue arrived after {late:.2f} s with {full.queue!r} full")
        assert await queue_depth(amqp, full.queue) >= len(filled)
        # The refused send is the producer's backpressure; the delayed tasks were not refused.
        assert await fill(producer, full, first=2000) == []

    worker = make_app([full])

    @worker.handler(full)
    async def on_full(task: Job) -> None:
        ran.append(task.n)

    async with running(worker):
        await wait_for(lambda: len(ran) >= DELAYED + len(filled), timeout=30)
        await asyncio.sleep(1.0)  # nothing else, no duplicate, trickles in

    assert sorted(ran) == sorted([*range(DELAYED), *filled])
    for queue in (full.queue, f"{full.queue}.due", f"{full.queue}.dead"):
        assert await queue_depth(amqp, queue) == 0


class Flaky(RuntimeError):
    pass


async def test_a_retried_task_runs_while_its_work_queue_is_full_and_its_consumer_busy(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(
        f"{unique}.job",
        Job,
        max_length=2,
        retry=amqtask.Retry(attempts=2, initial=2.0),
    )
    app = make_app([job])
    producer = make_app([job])
    await app.declare()
    release = asyncio.Event()
    attempts: list[int] = []
    started: list[int] = []
    done: list[int] = []
    refilled: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        started.append(task.n)
        if task.n == 0:
            attempts.append(len(attempts) + 1)
            if len(attempts) == 1:
                # Fill the queue behind this task while it still holds the consumer's one
                # prefetch slot, then fail: the retry comes due while the queue is full.
                refilled.extend(await fill(producer, job, first=1))
                raise Flaky("first attempt")
        else:
            await release.wait()  # a slow task: the work queue's consumer is busy
        done.append(task.n)

    async with producer, running(app, concurrency=3, prefetch=1, shutdown_timeout=5):
        try:
            await producer.send(job, Job(n=0))
            # The retry waits 2 s; the next task takes the work queue's prefetch slot meanwhile:
            # top the queue up again so it is full when the retry comes due.
            await wait_for(lambda: len(started) >= 2, timeout=10)
            refilled.extend(await fill(producer, job, first=100))
            await wait_for(lambda: attempts == [1, 2] and 0 in done, timeout=ARRIVES_WITHIN)
            assert await fill(producer, job, first=200) == []  # still full: it went around
        finally:
            release.set()
        await wait_for(lambda: len(done) == 1 + len(refilled), timeout=20)

    assert sorted(done) == sorted([0, *refilled])
    assert await queue_depth(amqp, f"{job.queue}.dead") == 0
