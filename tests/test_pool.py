"""Unit tests of the process pool (`amqtask._pool`, `amqtask._runner`), without a broker: child
processes run handlers by import path, and whatever a child does fails at most its own task."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import amqtask
from amqtask import _codec
from amqtask._execution import Failed, Rejected, Succeeded, execute
from amqtask._pool import ChildPool, Environment, ProcessExecutor, Recycling, import_path
from tests import pool_handlers as h

HANDLERS = "tests.pool_handlers"


def executor(pool: ChildPool, name: str, output: Any = None, **limits: float) -> ProcessExecutor:
    return ProcessExecutor(
        pool, f"{HANDLERS}:{name}", input_model=f"{HANDLERS}:Job", output=output, **limits
    )


@pytest.fixture
async def pool() -> AsyncIterator[ChildPool]:
    started = ChildPool(Environment(), 1, [f"{HANDLERS}:echo", f"{HANDLERS}:Job"])
    await started.start()
    yield started
    await started.close()


async def test_payloads_and_results_cross_as_json_to_a_child_process(pool: ChildPool) -> None:
    outcome = await execute(executor(pool, "echo", h.Done), None, h.Job(n=3))
    assert isinstance(outcome, Succeeded)
    assert outcome.result.n == 3
    assert outcome.result.pid != os.getpid()


async def test_an_async_handler_runs_in_the_child_too(pool: ChildPool) -> None:
    outcome = await execute(executor(pool, "echo_async", h.Done), None, h.Job(n=4))
    assert isinstance(outcome, Succeeded)
    assert outcome.result.n == 4


async def test_an_exception_raised_in_the_child_keeps_its_class_message_and_traceback(
    pool: ChildPool,
) -> None:
    outcome = await execute(executor(pool, "fail"), None, h.Job(n=7))
    assert isinstance(outcome, Failed)
    assert isinstance(outcome.exc, h.Broken)  # so Retry(on=...) applies as in the worker
    assert outcome.reason == "handler_error"
    assert _codec.describe(outcome.exc) == "Broken: broken with code 7"
    assert _codec.type_name(outcome.exc) == "tests.pool_handlers.Broken"
    assert "raise Broken(job.n)" in _codec.trimmed_traceback(outcome.exc)


async def test_an_exception_class_the_worker_never_imported_keeps_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"only_in_child_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(
        "class Weird(Exception):\n    pass\n\n\ndef fail(job):\n    raise Weird('odd')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    started = ChildPool(Environment(), 1, [])
    await started.start()
    try:
        run = ProcessExecutor(started, f"{module}:fail", input_model=None, output=None)
        outcome = await execute(run, None, h.Job())
    finally:
        await started.close()
    assert module not in sys.modules
    assert isinstance(outcome, Failed)
    assert _codec.type_name(outcome.exc) == f"{module}.Weird"
    assert _codec.describe(outcome.exc) == "Weird: odd"


async def test_reject_in_the_child_dead_letters_at_once(pool: ChildPool) -> None:
    outcome = await execute(executor(pool, "reject"), None, h.Job(n=2))
    assert isinstance(outcome, Rejected)
    assert outcome.reason == "no thanks 2"


@pytest.mark.parametrize(
    ("handler", "headers"),
    [("exit_now", {"amqtask-exit-code": 3}), ("segfault", {"amqtask-signal": "SIGSEGV"})],
)
async def test_a_child_that_dies_fails_only_its_task_and_another_takes_its_place(
    pool: ChildPool, handler: str, headers: dict[str, Any]
) -> None:
    before = await execute(executor(pool, "echo", h.Done), None, h.Job())
    crashed = await execute(executor(pool, handler), None, h.Job(n=3))
    after = await execute(executor(pool, "echo", h.Done), None, h.Job())

    assert isinstance(crashed, Failed)
    assert isinstance(crashed.exc, amqtask.HandlerCrashed)
    assert (crashed.reason, crashed.headers) == ("crashed", headers)
    assert isinstance(before, Succeeded)
    assert isinstance(after, Succeeded)
    assert after.result.pid != before.result.pid
    assert pool.alive == 1


async def test_a_task_past_its_hard_time_limit_has_its_child_killed_and_the_next_task_runs(
    pool: ChildPool,
) -> None:
    stuck = await execute(executor(pool, "spin", time_limit=0.5), None, h.Job())
    after = await execute(executor(pool, "echo", h.Done), None, h.Job(n=1))

    assert isinstance(stuck, Failed)
    assert isinstance(stuck.exc, amqtask.TimeLimitExceeded)
    assert stuck.exc.killed
    assert stuck.reason == "time_limit"
    assert isinstance(after, Succeeded)


@pytest.mark.parametrize("handler", ["sleepy", "sleepy_async"])
async def test_a_soft_time_limit_is_raised_inside_a_sleeping_handler_in_the_child(
    pool: ChildPool, handler: str
) -> None:
    outcome = await execute(
        executor(pool, handler, str, soft_time_limit=0.3, time_limit=10), None, h.Job()
    )
    assert outcome == Succeeded("soft limit seen")


async def test_an_uncaught_soft_time_limit_fails_the_task_with_reason_time_limit(
    pool: ChildPool,
) -> None:
    outcome = await execute(executor(pool, "spin", soft_time_limit=0.3), None, h.Job())
    assert isinstance(outcome, Failed)
    assert isinstance(outcome.exc, amqtask.SoftTimeLimitExceeded)
    assert outcome.reason == "time_limit"


async def test_tasks_waiting_for_a_child_start_in_the_order_they_asked_for_one(
    pool: ChildPool,
) -> None:
    """A task that asks just as a child comes back waits behind those already waiting."""
    run = executor(pool, "echo", h.Done)
    finished: list[int] = []

    async def one(n: int) -> None:
        await run.run(None, h.Job(n=n))
        finished.append(n)
        if n == 0:  # asks in the very step that gave the child back
            await one(99)

    await asyncio.gather(*(one(n) for n in range(5)))
    assert finished == [0, 1, 2, 3, 4, 99]


async def test_a_child_is_replaced_after_max_tasks_per_child() -> None:
    started = ChildPool(Environment(), 1, [], Recycling(max_tasks=2))
    await started.start()
    try:
        run = executor(started, "echo", h.Done)
        pids = [(await run.run(None, h.Job())).pid for _ in range(5)]
    finally:
        await started.close()
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


async def test_a_handler_a_child_cannot_import_stops_the_pool_from_starting() -> None:
    started = ChildPool(Environment(), 2, ["no_such_module_anywhere:handle"])
    with pytest.raises(amqtask.AmqtaskError, match="cannot import 'no_such_module_anywhere:"):
        await started.start()
    assert started.alive == 0


async def test_a_missing_interpreter_stops_the_pool_from_starting(tmp_path: Path) -> None:
    started = ChildPool(Environment(python=str(tmp_path / "python")), 1, [])
    with pytest.raises(amqtask.AmqtaskError, match="cannot start"):
        await started.start()


async def test_closing_the_pool_ends_every_child_process() -> None:
    started = ChildPool(Environment(), 2, [])
    await started.start()
    pids = [child.pid for child in started._children]
    await started.close()
    assert started.alive == 0
    assert not set(pids) & {int(name) for name in os.listdir("/proc") if name.isdigit()}


# --- what a child can find by import path ----------------------------------------------------


def _decorated(func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(job: Any) -> Any:
        return func(job)

    return wrapper


def replaced(job: Any) -> None: ...


_original_replaced = replaced
replaced = _decorated(replaced)  # the module attribute is now another object


@pytest.mark.parametrize(
    ("func", "why"),
    [
        (h.closure_factory(), "defined inside a function"),
        (lambda job: None, "defined inside a function or is a lambda"),
        (functools.partial(h.echo), "no module and qualified name"),
        (_original_replaced, "a decorator replaced it"),
    ],
)
def test_a_handler_a_child_cannot_find_by_import_path_is_refused_with_why(
    func: Any, why: str
) -> None:
    with pytest.raises(amqtask.AmqtaskError, match=why):
        import_path(func, "jobs.run")


def test_a_module_level_handler_is_found_by_its_import_path() -> None:
    assert import_path(h.echo, "jobs.run") == "tests.pool_handlers:echo"


def test_a_process_pool_worker_refuses_a_closure_at_construction() -> None:
    job = amqtask.contract("jobs.run", h.Job)
    app = amqtask.App("amqp://guest:guest@127.0.0.1:1/", [job])
    app.handler(job)(h.closure_factory())
    with pytest.raises(amqtask.AmqtaskError, match="cannot be used in a process pool"):
        amqtask.Worker(app, amqtask.WorkerSettings(pool="process"))


def test_a_handler_registered_by_path_needs_a_contract_that_runs_in_a_process() -> None:
    job = amqtask.contract("jobs.run", h.Job)
    app = amqtask.App("amqp://guest:guest@127.0.0.1:1/", [job])
    with pytest.raises(amqtask.ContractError, match="isolation='process'"):
        app.handler_at(job, "somewhere:handle")


# --- the worker's settings for the pool ----------------------------------------------------------


def test_the_process_pool_prefetches_four_deliveries_per_child_and_holds_them_in_flight() -> None:
    settings = amqtask.WorkerSettings(concurrency=2, pool="process")
    assert (settings.effective_prefetch, settings.in_flight) == (8, 8)
    threads = amqtask.WorkerSettings(concurrency=2)
    assert (threads.effective_prefetch, threads.in_flight) == (2, 2)


@pytest.mark.parametrize(
    "settings",
    [
        {"pool": "fork"},
        {"time_limit": 0},
        {"time_limit": 5, "soft_time_limit": 5},
        {"max_tasks_per_child": 0},
        {"max_memory_per_child": 0},
    ],
)
def test_invalid_pool_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each setting words its own message
        amqtask.WorkerSettings(**settings)
