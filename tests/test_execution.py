"""Unit tests of running handlers (`amqtask._execution`): any exception is an outcome, and an
async handler in disguise is awaited."""

from __future__ import annotations

import asyncio
import functools
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
