"""SIGTERM on a worker process with work in flight: nothing is lost."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask

from .conftest import (
    AppFactory,
    app_env,
    depth_is,
    queue_depth,
    records,
    start_worker,
    wait_for,
)

SLOW_APP = "tests.integration.apps.slow_app:app"


class Job(BaseModel):  # the same shape as tests/integration/apps/slow_app.py's
    n: int


async def start_slow_worker(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    """A worker process on slow_app, its stderr kept for the test to read."""
    return await start_worker(SLOW_APP, *args, env=env, stderr=asyncio.subprocess.PIPE)


async def test_sigterm_lets_running_tasks_finish_and_leaves_the_rest_for_redelivery(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    env = app_env(broker_url, unique, record, TEST_SLEEP="1.0")
    job = amqtask.contract(f"{unique}.job", Job)
    producer = make_app([job])
    await producer.declare()
    async with producer:
        await asyncio.gather(*(producer.send(job, {"n": n}) for n in range(12)))

    worker = await start_slow_worker(env, "--concurrency", "3", "--shutdown-timeout", "20")
    await wait_for(lambda: sum(records(record)[0].values()) >= 3)
    worker.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(worker.communicate(), 30)
    started, done = records(record)

    assert worker.returncode == 0, stderr.decode()
    # Every task that had started finished before the process exited...
    assert started == done
    assert 3 <= sum(done.values()) < 12
    # ...and was acked: only the never-started ones are back in the queue.
    assert await queue_depth(amqp, job.queue) == 12 - sum(done.values())

    second = await start_slow_worker(env, "--concurrency", "6")
    await wait_for(lambda: set(records(record)[1]) == set(range(12)), timeout=30)
    second.send_signal(signal.SIGTERM)
    await asyncio.wait_for(second.communicate(), 30)
    started, done = records(record)
    assert set(done) == set(range(12))
    assert all(count == 1 for count in done.values()), done  # nothing ran twice
    assert await queue_depth(amqp, job.queue) == 0


@pytest.mark.parametrize("sync", ["0", "1"], ids=["async-handler", "thread-handler"])
async def test_tasks_cut_off_by_the_shutdown_timeout_are_redelivered(
    make_app: AppFactory,
    amqp: AbstractConnection,
    broker_url: str,
    unique: str,
    tmp_path: Path,
    sync: str,
) -> None:
    record = tmp_path / "record.txt"
    env = app_env(broker_url, unique, record, TEST_SLEEP="30", TEST_SYNC=sync)
    job = amqtask.contract(f"{unique}.job", Job)
    producer = make_app([job])
    await producer.declare()
    async with producer:
        await asyncio.gather(*(producer.send(job, {"n": n}) for n in range(4)))

    worker = await start_slow_worker(env, "--concurrency", "2", "--shutdown-timeout", "0.5")
    await wait_for(lambda: sum(records(record)[0].values()) == 2)
    worker.send_signal(signal.SIGTERM)
    # The handlers would sleep 30 s: the process is gone long before, threads included.
    _, stderr = await asyncio.wait_for(worker.communicate(), 15)
    _started, done = records(record)

    assert worker.returncode == 0, stderr.decode()
    assert b"worker_abandoned_tasks" in stderr
    assert sum(done.values()) == 0
    # The two unfinished tasks and the two never started are all back, none lost.
    await wait_for(lambda: depth_is(amqp, job.queue, 4))


async def test_a_start_cut_off_after_consuming_began_lets_running_handlers_finish(
    make_app: AppFactory, amqp: AbstractConnection, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A SIGTERM (here: a cancel) while the worker still subscribes to its other queues, with a
    # handler on the first one already running: the handler ends and its task is acked.
    first = amqtask.contract(f"{unique}.first", Job, queue=f"{unique}.first")
    second = amqtask.contract(f"{unique}.second", Job, queue=f"{unique}.second")
    app = make_app([first, second])
    running, release = asyncio.Event(), asyncio.Event()
    finished: list[int] = []

    @app.handler(first)
    @app.handler(second)
    async def handle(task: Job) -> None:
        running.set()
        await release.wait()
        finished.append(task.n)

    await app.declare()
    producer = make_app([first, second])
    async with producer:
        await producer.send(first, {"n": 1})
        await producer.send(second, {"n": 2})

    subscribe = app.transport.consume
    subscribed = 0

    async def consume_then_hang(*args: Any, **kwargs: Any) -> Any:
        nonlocal subscribed
        subscribed += 1
        if subscribed > 1:
            await asyncio.Event().wait()  # the start is cut off here
        return await subscribe(*args, **kwargs)

    monkeypatch.setattr(app.transport, "consume", consume_then_hang)
    worker = amqtask.Worker(app, amqtask.WorkerSettings(shutdown_timeout=20))
    starting = asyncio.create_task(worker.start())
    await asyncio.wait_for(running.wait(), 10)
    starting.cancel()
    await asyncio.sleep(0.2)  # the worker is stopping now, waiting for the handler
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(starting, 30)

    assert len(finished) == 1
    assert worker.abandoned == 0
    # The finished task was acked before the connection closed; the other queue's is untouched.
    depths = [await queue_depth(amqp, contract.queue) for contract in (first, second)]
    assert sorted(depths) == [0, 1]
