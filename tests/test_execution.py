"""Unit tests of running handlers (`amqtask._execution`): any exception is an outcome, and an
async handler in disguise is awaited."""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import amqtask
from amqtask._execution import (
    Failed,
    LoopExecutor,
    Rejected,
    Succeeded,
    ThreadExecutor,
    execute,
    is_async,
)
from tests import pool_handlers


def raiser(exc: BaseException) -> Any:
    def handler(payload: Any) -> Any:
        raise exc

    return handler


@pytest.fixture(params=["loop", "thread"])
def executor(request: pytest.FixtureRequest) -> Any:
    if request.param == "loop":
        yield LoopExecutor()
        return
    pool = ThreadPoolExecutor(max_workers=2)
    yield ThreadExecutor(pool)
    pool.shutdown()


@pytest.mark.parametrize(
    "exc",
    [KeyboardInterrupt(), SystemExit(1), GeneratorExit(), BaseException("x"), ValueError("v")],
)
async def test_any_exception_a_handler_raises_fails_its_task_not_the_worker(
    executor: Any, exc: BaseException
) -> None:
    outcome = await execute(executor, raiser(exc), None)
    assert isinstance(outcome, Failed)
    assert outcome.exc is exc


async def test_a_cancelled_error_the_handler_raises_itself_fails_its_task(executor: Any) -> None:
    outcome = await execute(executor, raiser(asyncio.CancelledError()), None)
    assert isinstance(outcome, Failed)


async def test_cancelling_the_running_task_is_not_an_outcome() -> None:
    started = asyncio.Event()

    async def slow(payload: Any) -> None:
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(execute(LoopExecutor(), slow, None))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_reject_is_its_own_outcome_even_without_a_reason(executor: Any) -> None:
    outcome = await execute(executor, raiser(amqtask.Reject(None)), None)  # type: ignore[arg-type]
    assert isinstance(outcome, Rejected)
    assert outcome.reason == "None"


async def test_a_coroutine_returned_by_a_plain_function_is_awaited(executor: Any) -> None:
    async def real(payload: int) -> int:
        await asyncio.sleep(0)
        return payload * 2

    assert await execute(executor, lambda payload: real(payload), 21) == Succeeded(42)


def test_async_handlers_are_recognised_behind_decorators_partials_and_call() -> None:
    async def handler(payload: Any, extra: int = 0) -> None: ...

    @functools.wraps(handler)
    def wrapper(payload: Any) -> Any:
        return handler(payload)

    class Callable:
        async def __call__(self, payload: Any) -> None: ...

    assert is_async(handler)
    assert is_async(wrapper)
    assert is_async(functools.partial(handler, extra=1))
    assert is_async(Callable())
    assert not is_async(lambda payload: None)
    assert not is_async(print)


# --- time limits on the loop and in threads ----------------------------------------------------


async def test_an_async_handler_past_its_time_limit_is_cancelled_and_fails_with_time_limit() -> (
    None
):
    cleaned_up: list[bool] = []

    async def forever(payload: Any) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cleaned_up.append(True)

    outcome = await execute(LoopExecutor(time_limit=0.1), forever, None)
    assert isinstance(outcome, Failed)
    assert isinstance(outcome.exc, amqtask.TimeLimitExceeded)
    assert outcome.reason == "time_limit"
    assert cleaned_up == [True]


async def test_a_timeout_error_of_the_handler_itself_is_not_a_time_limit() -> None:
    async def times_out(payload: Any) -> None:
        raise TimeoutError("upstream")

    outcome = await execute(LoopExecutor(time_limit=5), times_out, None)
    assert isinstance(outcome, Failed)
    assert isinstance(outcome.exc, TimeoutError)
    assert outcome.reason == "handler_error"


async def test_a_soft_time_limit_is_raised_at_the_await_of_an_async_handler() -> None:
    async def careful(payload: Any) -> str:
        try:
            await asyncio.sleep(60)
        except amqtask.SoftTimeLimitExceeded:
            await asyncio.sleep(0)  # it may still await while it cleans up
            return "cleaned up"
        return "slept"

    executor = LoopExecutor(soft_time_limit=0.1, time_limit=5)
    assert await execute(executor, careful, None) == Succeeded("cleaned up")


async def test_an_uncaught_soft_time_limit_fails_with_reason_time_limit() -> None:
    async def careless(payload: Any) -> None:
        await asyncio.sleep(60)

    outcome = await execute(LoopExecutor(soft_time_limit=0.1), careless, None)
    assert isinstance(outcome, Failed)
    assert isinstance(outcome.exc, amqtask.SoftTimeLimitExceeded)
    assert outcome.reason == "time_limit"


async def test_shutdown_still_cancels_a_handler_under_a_soft_limit() -> None:
    started = asyncio.Event()

    async def slow(payload: Any) -> None:
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(execute(LoopExecutor(soft_time_limit=30), slow, None))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_soft_time_limit_is_raised_inside_a_plain_handler_in_a_thread() -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        executor = ThreadExecutor(pool, soft_time_limit=0.1)
        assert await execute(executor, pool_handlers.polls, None) == Succeeded("soft limit seen")
        # The thread is not left with a pending exception: the next handler runs normally.
        assert await execute(executor, lambda payload: payload, 5) == Succeeded(5)
    finally:
        pool.shutdown()


def test_a_worker_refuses_a_hard_time_limit_for_a_plain_handler_in_a_thread() -> None:
    job = amqtask.contract("jobs.run", pool_handlers.Job, time_limit=10)
    app = amqtask.App("amqp://guest:guest@127.0.0.1:1/", [job])
    app.handler(job)(pool_handlers.echo)
    with pytest.raises(amqtask.AmqtaskError, match="a thread cannot be stopped"):
        amqtask.Worker(app)


async def test_a_soft_time_limit_in_a_thread_counts_from_the_start_of_the_handler() -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        busy = asyncio.ensure_future(execute(ThreadExecutor(pool), time.sleep, 0.3))
        # Queued behind `busy` for 0.3 s, longer than its soft limit, before a thread is free.
        late = execute(ThreadExecutor(pool, soft_time_limit=0.2), pool_handlers.polls, None)
        assert await asyncio.wait_for(late, 10) == Succeeded("soft limit seen")
        await busy
    finally:
        pool.shutdown()
