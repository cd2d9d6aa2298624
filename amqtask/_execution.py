"""Running a handler: where it runs (an executor), and what a run yields, as a value.

Whatever a handler does (returns, raises any `BaseException`, even `SystemExit` or its own
`CancelledError`, or hands back a coroutine it never awaited), `execute` returns an `Outcome`;
only the worker's own cancellation (shutdown) passes through. The worker then settles that
outcome in one place (`amqtask._settle`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from concurrent.futures import Executor as _PoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from amqtask._codec import safe_text
from amqtask._exceptions import DecodeError, Reject


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The handler returned `result`."""

    result: Any


@dataclass(frozen=True, slots=True)
class Failed:
    """The handler raised `exc` (retried while the contract's `Retry` allows)."""

    exc: BaseException


@dataclass(frozen=True, slots=True)
class Rejected:
    """The handler raised `amqtask.Reject`: dead-letter now, never retry."""

    reason: str
    signal: Reject


@dataclass(frozen=True, slots=True)
class Refused:
    """The message is not a task this worker can run (undecodable, unknown, invalid...)."""

    problem: DecodeError


@dataclass(frozen=True, slots=True)
class Expired:
    """A call whose caller stopped waiting before it could start: nobody would read it."""


Outcome = Succeeded | Failed | Rejected | Refused | Expired


class Executor(Protocol):
    """Where a handler runs. `run` returns what the handler returned, or raises what it raised."""

    async def run(self, func: Any, payload: Any) -> Any: ...


async def _awaited(result: Any) -> Any:
    # A handler that returns an awaitable (an `async def` behind a plain decorator) is awaited
    # here, on the loop: otherwise its coroutine would never run and the task count as done.
    return await result if inspect.isawaitable(result) else result


class LoopExecutor:
    """Runs `async def` handlers on the event loop."""

    async def run(self, func: Any, payload: Any) -> Any:
        return await _awaited(func(payload))


class ThreadExecutor:
    """Runs plain `def` handlers in a thread pool, in a copy of the current context (so a
    handler sees the current trace span)."""

    def __init__(self, pool: _PoolExecutor) -> None:
        self._pool = pool

    async def run(self, func: Any, payload: Any) -> Any:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        returned, value = await loop.run_in_executor(
            self._pool, context.run, _caught, func, payload
        )
        if not returned:
            raise value  # here, on the loop, as if the handler had raised it in this frame
        return await _awaited(value)


def _caught(func: Any, payload: Any) -> tuple[bool, Any]:
    # In the thread. Some exceptions (GeneratorExit) do not travel through an asyncio future as
    # an exception, so every exception travels as a value.
    try:
        return True, func(payload)
    except BaseException as exc:
        return False, exc


def is_async(func: Any) -> bool:
    """Whether `func` must run on the event loop: an `async def`, also behind `functools.wraps`
    or `functools.partial`, or an object whose `__call__` is an `async def`."""
    target = func.func if isinstance(func, functools.partial) else func
    return (
        inspect.iscoroutinefunction(target)
        or inspect.iscoroutinefunction(inspect.unwrap(target))
        or (
            not inspect.isroutine(target)
            and inspect.iscoroutinefunction(inspect.getattr_static(type(target), "__call__", None))
        )
    )


async def execute(executor: Executor, func: Any, payload: Any) -> Outcome:
    """Run `func(payload)` with `executor` and say how it ended.

    A `BaseException` the handler raises (`KeyboardInterrupt`, `SystemExit`, `GeneratorExit`,
    its own `CancelledError`) fails the task, not the worker. Only a cancellation of the
    running task itself (the worker giving up on it at shutdown) is raised.
    """
    try:
        result = await executor.run(func, payload)
    except Reject as signal:
        return Rejected(safe_text(signal.reason), signal)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the worker cancelled it: not the handler's outcome
        return Failed(exc)
    except BaseException as exc:
        return Failed(exc)
    return Succeeded(result)
