"""The virtual clock: the event loop's time and the wall clock, moved forward on demand.

The clock runs with real time and jumps when told to (`TestApp.advance`). It is installed on the
running event loop by replacing the loop's `time()`, so everything timed on the loop follows it:
`asyncio.sleep`, `asyncio.timeout` (a call's timeout), the in-memory broker's message TTLs. The
wall clock amqtask reads (call deadlines, `eta=`, the failure times on dead letters) follows it
too. Time never goes back: once installed on a loop, the clock stays for the loop's lifetime.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, VirtualClock] = (
    weakref.WeakKeyDictionary()
)

MAX_STEPS = 100_000
"""Timers `advance` runs through at most, against a timer that keeps rescheduling itself."""


def seconds_of(
    delta: timedelta | float = 0.0,
    *,
    seconds: float = 0.0,
    minutes: float = 0.0,
    hours: float = 0.0,
    days: float = 0.0,
) -> float:
    """The sum of the arguments in seconds. Raises `ValueError` when it is negative."""
    base = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
    total = base + seconds + minutes * 60 + hours * 3600 + days * 86400
    if total < 0:
        raise ValueError(f"time only moves forward; got {total} s")
    return total


async def _yield() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class VirtualClock:
    """Time on one event loop as amqtask sees it under `TestApp`.

    `time()` is the loop's clock (monotonic), `now()` and `utcnow()` the wall clock; both run
    with real time plus every jump made by `advance`. Use `utcnow()` to compute an `eta=`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._real_time: Callable[[], float] = loop.time
        self._offset = 0.0
        # What `advance` waits for between two timers; `TestApp` makes it wait for the worker.
        self.settle: Callable[[], Awaitable[None]] = _yield
        self.finish: Callable[[], Awaitable[None]] = _yield

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop | None = None) -> VirtualClock:
        """The clock of `loop` (default: the running loop), installed on it at first use.

        Raises `RuntimeError` for a loop whose `time()` cannot be replaced (uvloop, trio).
        """
        loop = loop or asyncio.get_running_loop()
        clock = _clocks.get(loop)
        if clock is None:
            clock = _clocks[loop] = cls(loop)
            try:
                loop.time = clock.time  # type: ignore[method-assign]
            except AttributeError:
                raise RuntimeError(
                    f"amqtask.testing needs asyncio's own event loop, not {type(loop).__name__}"
                ) from None
        return clock

    @property
    def offset(self) -> float:
        """Seconds this clock is ahead of real time."""
        return self._offset

    def time(self) -> float:
        """The loop's time (`loop.time()`): monotonic seconds."""
        return self._real_time() + self._offset

    def now(self) -> float:
        """Wall-clock seconds since the epoch."""
        return time.time() + self._offset

    def utcnow(self) -> datetime:
        """The wall clock as an aware datetime in UTC."""
        return datetime.fromtimestamp(self.now(), UTC)

    def next_timer(self) -> float | None:
        """When the loop's next timer falls due (loop time), or None without one."""
        scheduled = getattr(self._loop, "_scheduled", ())  # asyncio's own timer heap
        due = [handle.when() for handle in scheduled if not handle.cancelled()]
        return min(due, default=None)

    def jump_to(self, when: float) -> None:
        """Move the clock forward to loop time `when` (never back)."""
        self._offset += max(0.0, when - self.time())

    async def advance(
        self,
        delta: timedelta | float = 0.0,
        *,
        seconds: float = 0.0,
        minutes: float = 0.0,
        hours: float = 0.0,
        days: float = 0.0,
    ) -> None:
        """Move time forward, running every timer that falls due on the way, in time order.

        Between two timers it lets what they started settle, so a task that comes due, fails and
        is retried a second later runs again within the same `advance`.
        """
        target = self.time() + seconds_of(
            delta, seconds=seconds, minutes=minutes, hours=hours, days=days
        )
        for _ in range(MAX_STEPS):
            await self.settle()
            due = self.next_timer()
            if due is None or due > target:
                break
            self.jump_to(due)
            await asyncio.sleep(0)  # the loop runs the timers now due
        else:
            raise RuntimeError(
                f"advance ran {MAX_STEPS} timers without reaching its end: "
                "is a timer rescheduling itself at once?"
            )
        self.jump_to(target)
        await self.finish()
