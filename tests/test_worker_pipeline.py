"""The worker's pipeline around the handler: when one of its own steps (tracing, a store, the
bookkeeping after settling) fails, the delivery still settles. Runs in memory (amqtask.testing)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import amqtask
from amqtask import _tracing, _worker
from amqtask.testing import TestApp


class Job(BaseModel):
    n: int


def make_app() -> tuple[amqtask.App, amqtask.Contract[Job, None], list[int]]:
    job = amqtask.contract("pipeline.job", Job, retry=amqtask.Retry(attempts=1))
    app = amqtask.App("amqp://guest:guest@127.0.0.1:5672/", [job], namespace="pipeline")
    done: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        done.append(task.n)

    return app, job, done


def broken(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a defect in a step of the pipeline")


async def test_a_trace_span_that_cannot_start_leaves_the_task_run_and_acked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, job, done = make_app()
    monkeypatch.setattr(_tracing, "ENABLED", True)
    monkeypatch.setattr(_tracing, "wanted", lambda headers: True)
    monkeypatch.setattr(_tracing, "processing", broken)
    async with TestApp(app) as t:
        await app.send(job, Job(n=1))
        await t.drain()
        assert done == [1]
        assert t.queued(job) == []
        assert t.dead_letters(job) == []


async def test_a_failing_step_before_the_handler_fails_the_task_instead_of_wedging_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, job, done = make_app()
    monkeypatch.setattr(_worker.Worker, "_run", broken)
    async with TestApp(app) as t:
        await app.send(job, Job(n=1))
        await t.drain()
        assert done == []
        (letter,) = t.dead_letters(job)
        assert letter.headers["amqtask-reason"] == "handler_error"
        assert "a defect in a step" in letter.headers["amqtask-error"]
        assert t.queued(job) == []


async def test_a_failure_to_record_a_settled_task_is_only_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, job, done = make_app()
    monkeypatch.setattr(_worker.Worker, "_outcome", broken)
    async with TestApp(app) as t:
        await app.send(job, Job(n=1))
        await app.send(job, Job(n=2))
        await t.drain()
        assert sorted(done) == [1, 2]
        assert t.queued(job) == []
