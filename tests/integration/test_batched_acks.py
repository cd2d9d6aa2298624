"""The worker's batched acks against the real broker: a long task holds back no other task's
ack (the prefetch window keeps moving), and a graceful stop writes every ack still waiting."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask import _consume

from .conftest import AppFactory, app_env, queue_depth, running, start_worker, wait_for


class Job(BaseModel):
    n: int


async def test_a_long_task_holds_back_no_ack_of_the_tasks_delivered_after_it(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    release = asyncio.Event()
    runs: Counter[int] = Counter()

    @app.handler(job)
    async def handle(task: Job) -> None:
        runs[task.n] += 1
        if task.n == 0:
            await release.wait()

    producer = make_app([job])
    async with producer, running(app, concurrency=10, prefetch=10):
        await producer.send(job, Job(n=0))
        await wait_for(lambda: runs[0] == 1)
        for n in range(1, 101):
            await producer.send(job, Job(n=n))
        # 100 tasks through a window of 10 deliveries, one of them held by the long task: only
        # if the other nine are acked while it runs.
        await wait_for(lambda: len(runs) == 101, timeout=30)
        release.set()

    assert runs == Counter(range(101))  # each once: nothing was redelivered
    assert await queue_depth(amqp, job.queue) == 0


async def test_a_graceful_stop_writes_every_ack_still_waiting(
    make_app: AppFactory, amqp: AbstractConnection, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Acks that would wait a minute for company: only the flush at stop writes them.
    monkeypatch.setattr(_consume, "ACK_DELAY", 60.0)
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    runs: Counter[int] = Counter()

    @app.handler(job)
    async def handle(task: Job) -> None:
        runs[task.n] += 1

    producer = make_app([job])
    async with producer:
        for n in range(20):
            await producer.send(job, Job(n=n))
        async with running(app, concurrency=100, prefetch=100):  # below the batch threshold
            await wait_for(lambda: len(runs) == 20)
            assert await queue_depth(amqp, job.queue) == 0
        # Unacked deliveries would be back in the queue now that the worker's channel closed.
        assert await queue_depth(amqp, job.queue) == 0
        async with running(app):
            await asyncio.sleep(0.5)

    assert runs == Counter(range(20))


async def test_a_worker_on_uvloop_runs_its_tasks_there_and_stops_gracefully(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    job = amqtask.contract(f"{unique}.job", Job)  # loop_app's contract
    producer = make_app([job])
    await producer.declare()
    worker = await start_worker(
        "tests.integration.apps.loop_app:app",
        "--loop",
        "uvloop",
        env=app_env(broker_url, unique, record),
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with producer:
            for n in range(20):
                await producer.send(job, Job(n=n))
            await wait_for(lambda: record.exists() and len(record.read_text().splitlines()) == 20)
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(worker.wait(), 30)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()

    lines = record.read_text().splitlines()
    assert code == 0
    assert sorted(int(line.split()[0]) for line in lines) == list(range(20))
    assert {line.split()[1] for line in lines} == {"uvloop"}
    assert await queue_depth(amqp, job.queue) == 0
