"""The task store under `amqtask.testing`: states, results and revocation on the virtual clock.

The app keeps its own store (SQLite here); `TestApp` routes what the store needs of the broker
(the `{namespace}.revoke` fanout exchange every worker listens on) through the in-memory broker,
and the store's records carry the virtual clock's times.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

import amqtask
from amqtask.store import TaskState
from amqtask.testing import TestApp

URL = "amqp://memory.invalid/"


class Job(BaseModel):
    n: int


def make(tmp_path: Path, **options: object) -> tuple[amqtask.App, amqtask.Contract[Job, int]]:
    job = amqtask.contract(
        "jobs.double", Job, returns=int, retry=amqtask.Retry(attempts=2, initial=60), **options
    )  # type: ignore[call-overload]
    return amqtask.App(URL, [job], store=f"sqlite:///{tmp_path}/tasks.db"), job


def doubled(app: amqtask.App, job: amqtask.Contract[Job, int]) -> list[int]:
    """Handle `job` by doubling its `n`; the list returned fills with each `n` handled."""
    runs: list[int] = []

    @app.handler(job)
    async def double(task: Job) -> int:
        runs.append(task.n)
        return task.n * 2

    return runs


async def test_states_and_their_times_follow_the_virtual_clock(tmp_path: Path) -> None:
    app, job = make(tmp_path)

    @app.handler(job)
    async def double(task: Job) -> int:
        if task.n < 0:
            raise ValueError("negative")
        return task.n * 2

    async with TestApp(app) as t:
        start = t.clock.utcnow()
        later = await app.send(job, Job(n=2), delay=timedelta(hours=2))
        scheduled = await app.task(later)
        assert scheduled is not None
        assert scheduled.state is TaskState.SCHEDULED
        assert scheduled.due_at is not None
        assert timedelta(hours=2) <= scheduled.due_at - start < timedelta(hours=2, seconds=1)

        failing = await app.send(job, Job(n=-1))
        await t.drain()
        retrying = await app.task(failing)
        assert retrying is not None
        assert retrying.state is TaskState.RETRYING
        assert retrying.error == "negative"

        await t.advance(hours=2)
        done = await app.task(later)
        failed = await app.task(failing)
        assert await app.result(job, later, timeout=1) == 4

    assert done is not None
    assert done.state is TaskState.SUCCEEDED
    assert done.started_at is not None
    assert done.finished_at is not None
    assert timedelta(hours=2) <= done.started_at - start < timedelta(hours=2, seconds=1)
    assert failed is not None
    assert failed.state is TaskState.FAILED
    assert failed.attempts == 2
    assert failed.finished_at is not None
    assert timedelta(seconds=60) <= failed.finished_at - start < timedelta(seconds=61)


async def test_a_revoked_delayed_task_never_runs_and_its_result_says_so(tmp_path: Path) -> None:
    app, job = make(tmp_path)
    runs = doubled(app, job)

    async with TestApp(app) as t:
        task_id = await app.send(job, Job(n=1), delay=60)
        await app.revoke(task_id)
        await t.advance(minutes=2)
        info = await app.task(task_id)
        with pytest.raises(amqtask.TaskRevoked):
            await app.result(job, task_id, timeout=1)

    assert runs == []
    assert info is not None
    assert info.state is TaskState.REVOKED


async def test_revoke_with_terminate_stops_a_running_handler_through_the_broadcast(
    tmp_path: Path,
) -> None:
    app, job = make(tmp_path)
    finished: list[int] = []

    @app.handler(job)
    async def slow(task: Job) -> int:
        await asyncio.sleep(3600)  # on the virtual clock
        finished.append(task.n)
        return task.n

    async with TestApp(app) as t:
        task_id = await app.send(job, Job(n=1))
        await t.advance(seconds=1.5)
        running = await app.task(task_id)
        await app.revoke(task_id, terminate=True)
        # Well before the worker's next read of revocations from the store (every second):
        # only the broadcast on the revoke exchange reaches it this soon.
        await t.advance(seconds=0.05)
        revoked = await app.task(task_id)
        await t.advance(hours=2)

    assert running is not None
    assert running.state is TaskState.RUNNING
    assert revoked is not None
    assert revoked.state is TaskState.REVOKED
    assert finished == []


async def test_a_deduplicated_task_delivered_again_after_its_success_is_skipped(
    tmp_path: Path,
) -> None:
    app, job = make(tmp_path, deduplicate=True)
    runs = doubled(app, job)

    async with TestApp(app) as t:
        task_id = await app.send(job, Job(n=3))
        await t.drain()
        t.redeliver(task_id)  # as after a lost ack
        await t.drain()
        info = await app.task(task_id)

    assert runs == [3]
    assert info is not None
    assert info.state is TaskState.SUCCEEDED
    assert info.result == 6


async def test_the_app_gets_its_own_store_transport_back_after_the_test(tmp_path: Path) -> None:
    app, _ = make(tmp_path)
    before = app.transport
    async with TestApp(app):
        pass
    assert app._tasks is not None
    assert app._tasks._transport is before
    assert app._tasks.recorder.interval > 0


async def test_a_finished_task_is_kept_for_keep_result_on_the_clock_then_deleted(
    tmp_path: Path,
) -> None:
    app, job = make(tmp_path, keep_result=timedelta(hours=1))

    @app.handler(job)
    async def double(task: Job) -> int:
        return task.n * 2

    async with TestApp(app) as t:
        task_id = await app.send(job, Job(n=1))
        await t.drain()
        await t.advance(minutes=59)
        kept = await app.task(task_id)
        await t.advance(minutes=2, seconds=30)  # workers delete expired records once a minute
        gone = await app.task(task_id)

    assert kept is not None
    assert kept.result == 2
    assert gone is None


async def test_a_claim_left_by_a_crashed_run_expires_after_claim_ttl_on_the_clock(
    tmp_path: Path,
) -> None:
    job = amqtask.contract("jobs.double", Job, returns=int, deduplicate=True)
    app = amqtask.App(URL, [job], store=f"sqlite:///{tmp_path}/tasks.db?claim_ttl=30")
    runs: list[float] = []

    @app.handler(job)
    async def double(task: Job) -> int:
        runs.append(asyncio.get_running_loop().time())
        return task.n * 2

    async with TestApp(app) as t:
        t.crash_next(job)  # the worker dies after the handler: its claim stays in the store
        task_id = await app.send(job, Job(n=4))
        await t.advance(seconds=20)
        assert len(runs) == 1  # the copy waits for the claim
        await t.advance(seconds=15)
        await t.drain()
        info = await app.task(task_id)

    assert len(runs) == 2
    assert 30 <= runs[1] - runs[0] < 31
    assert info is not None
    assert info.state is TaskState.SUCCEEDED
    assert info.result == 8
