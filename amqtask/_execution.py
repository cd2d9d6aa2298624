"""Running a handler: where it runs (an executor), and what a run yields, as a value.

Whatever a handler does (returns, raises any `BaseException`, even `SystemExit` or its own
`CancelledError`, or hands back a coroutine it never awaited), `execute` returns an `Outcome`;
only the worker's own cancellation (shutdown) passes through. The worker then settles that
outcome in one place (`amqtask._settle`).

Executors: `LoopExecutor` (`async def` on the event loop), `ThreadExecutor` (plain `def` in a
thread) and `amqtask._pool.ProcessExecutor` (any handler in a child process). Time limits:

| where        | soft limit (`SoftTimeLimitExceeded` inside) | hard limit                     |
|--------------|---------------------------------------------|--------------------------------|
| event loop   | at the current `await`                      | cancelled at the current await |
| thread       | at the next Python instruction              | refused: a thread cannot stop  |
| process pool | SIGALRM, also in a blocking call            | the child is killed            |
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import functools
import inspect
import threading
from collections.abc import Mapping
from concurrent.futures import Executor as _PoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from amqtask import _codec
from amqtask._codec import Reasons, safe_text
from amqtask._exceptions import (
    DecodeError,
    HandlerCrashed,
    Reject,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from amqtask._runner import SoftLimited


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The handler returned `result`."""

    result: Any


@dataclass(frozen=True, slots=True)
class Failed:
    """The handler raised `exc`, ran past its time limit or crashed (retried while the
    contract's `Retry` allows). A dead letter carries `reason` and the extra `headers`."""

    exc: BaseException
    reason: str = Reasons.HANDLER_ERROR
    headers: Mapping[str, Any] = field(default_factory=dict)


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


@dataclass(frozen=True, slots=True)
class Revoked:
    """The task was revoked (`App.revoke`): acked without running, or, `terminated`, cancelled
    while it ran (its process-pool child killed)."""

    terminated: bool = False


@dataclass(frozen=True, slots=True)
class Skipped:
    """A `deduplicate` task that already succeeded (or committed its effects) elsewhere: this
    copy is acked without running."""

    why: str


@dataclass(frozen=True, slots=True)
class Postponed:
    """Not run now: another run of the same `deduplicate` task held its claim for too long.
    Released to the queue, to come back later."""

    why: str


Outcome = Succeeded | Failed | Rejected | Refused | Expired | Revoked | Skipped | Postponed


class Executor(Protocol):
    """Where a handler runs. `run` returns what the handler returned, or raises what it raised."""

    async def run(self, func: Any, payload: Any) -> Any: ...


async def _awaited(result: Any) -> Any:
    # A handler that returns an awaitable (an `async def` behind a plain decorator) is awaited
    # here, on the loop: otherwise its coroutine would never run and the task count as done.
    return await result if inspect.isawaitable(result) else result


class LoopExecutor:
    """Runs `async def` handlers on the event loop, with optional time limits in seconds.

    A handler that never awaits (a CPU loop) or swallows its cancellation cannot be stopped
    on the loop: run such handlers in the process pool.
    """

    def __init__(self, *, soft_time_limit: float | None = None, time_limit: float | None = None):
        self.soft_time_limit = soft_time_limit
        self.time_limit = time_limit

    async def run(self, func: Any, payload: Any) -> Any:
        if self.time_limit is None:
            if self.soft_time_limit is None:  # no limit: no frame between the worker and it
                result = func(payload)
                return await result if inspect.isawaitable(result) else result
            return await self._soft(func, payload)
        try:
            async with asyncio.timeout(self.time_limit) as scope:
                return await self._soft(func, payload)
        except TimeoutError:
            if scope.expired():
                raise TimeLimitExceeded(self.time_limit) from None
            raise  # the handler's own TimeoutError

    async def _soft(self, func: Any, payload: Any) -> Any:
        result = func(payload)
        if self.soft_time_limit is None or not inspect.isawaitable(result):
            return await _awaited(result)
        return await SoftLimited(result, self.soft_time_limit, SoftTimeLimitExceeded)


class ThreadExecutor:
    """Runs plain `def` handlers in a thread pool, in a copy of the current context (so a
    handler sees the current trace span). A soft limit raises `SoftTimeLimitExceeded` in the
    thread; there is no hard limit (a thread cannot be stopped)."""

    def __init__(self, pool: _PoolExecutor, *, soft_time_limit: float | None = None) -> None:
        self._pool = pool
        self.soft_time_limit = soft_time_limit

    async def run(self, func: Any, payload: Any) -> Any:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        soft = self.soft_time_limit
        alarm = None if soft is None else _ThreadAlarm(loop, soft)
        try:
            returned, value = await loop.run_in_executor(
                self._pool, context.run, _caught, func, payload, alarm
            )
        finally:
            if alarm is not None:
                alarm.cancel()
        if not returned:
            raise value  # here, on the loop, as if the handler had raised it in this frame
        return await _awaited(value)


class _ThreadAlarm:
    """Raises `SoftTimeLimitExceeded` in the thread running one handler, `seconds` after it
    started (not after it was queued for a thread), and only while it runs.

    CPython delivers an exception set with `PyThreadState_SetAsyncExc` at the thread's next
    Python instruction. The lock makes sure it is never set after the handler returned (where it
    would hit the thread pool's own code), and `_caught` catches one set just before.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self._loop = loop
        self._seconds = seconds
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._cancelled = False

    def arm(self) -> None:
        """In the thread, as the handler starts: the countdown begins on the loop."""
        with self._lock:
            self._thread = threading.get_ident()
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        if not self._cancelled:
            self._timer = self._loop.call_later(self._seconds, self.ring)

    def cancel(self) -> None:
        """On the loop, once the handler's run is over."""
        self._cancelled = True
        if self._timer is not None:
            self._timer.cancel()

    def disarm(self) -> None:
        with self._lock:
            if self._thread is not None:
                _set_async_exc(self._thread, None)  # withdraw one not delivered yet
            self._thread = None

    def ring(self) -> None:
        with self._lock:
            if self._thread is not None:
                _set_async_exc(self._thread, SoftTimeLimitExceeded)


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), None if exc is None else ctypes.py_object(exc)
    )


def _caught(func: Any, payload: Any, alarm: _ThreadAlarm | None = None) -> tuple[bool, Any]:
    # In the thread. Some exceptions (GeneratorExit) do not travel through an asyncio future as
    # an exception, so every exception travels as a value.
    try:
        if alarm is None:
            return True, func(payload)
        alarm.arm()
        try:
            return True, func(payload)
        finally:
            alarm.disarm()
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
    except (TimeLimitExceeded, SoftTimeLimitExceeded) as exc:
        return Failed(exc, Reasons.TIME_LIMIT)
    except HandlerCrashed as exc:
        return Failed(exc, Reasons.CRASHED, crash_headers(exc))
    except BaseException as exc:
        return Failed(exc)
    return Succeeded(result)


def crash_headers(exc: HandlerCrashed) -> dict[str, Any]:
    """The dead letter's extra headers for a crash: the signal, or the exit code."""
    if exc.signal is not None:
        return {_codec.SIGNAL: exc.signal}
    return {_codec.EXIT_CODE: exc.exit_code}
