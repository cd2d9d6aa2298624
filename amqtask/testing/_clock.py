"""The virtual clock: the event loop's time and the wall clock, moved forward on demand.

It is installed on the running event loop by replacing the loop's `time()`, so everything timed
on the loop follows it: `asyncio.sleep`, `asyncio.timeout` (a call's timeout), the in-memory
broker's message TTLs. The wall clock amqtask reads (call deadlines, `eta=`, the failure times
on dead letters) follows it too.

Outside `advance` the clock runs with real time. During `advance` it stands still except for its
jumps from one timer to the next, so what runs between two jumps takes no time: a message that
waits in five delay levels arrives exactly when its delay is over, however long the machine took.
Time never goes back: once installed on a loop, the clock stays for the loop's lifetime.
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
    with real time, stand still during `advance` and move by its jumps. Use `utcnow()` to
    compute an `eta=`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._real_time: Callable[[], float] = loop.time
        self._offset = 0.0
        self._wall = time.time() - self._real_time()  # wall clock minus loop clock
        self._still: float | None = None  # the time while `advance` holds the clock
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
        if self._still is not None:
            return self._still
        return self._real_time() + self._offset

    def now(self) -> float:
        """Wall-clock seconds since the epoch."""
        return self.time() + self._wall

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
        if self._still is not None:
            self._still = max(self._still, when)
        else:
            self._offset += max(0.0, when - self.time())

    @property
    def standing_still(self) -> bool:
        """Whether `advance` holds the clock (real time does not move it)."""
        return self._still is not None

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
        seconds = seconds_of(delta, seconds=seconds, minutes=minutes, hours=hours, days=days)
        if self._still is not None:
            raise RuntimeError("advance is already running: one at a time")
        self._still = target = self.time()
        target += seconds
        try:
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
        finally:
            # Real time runs on from where the clock stands.
            self._offset = self._still - self._real_time()
            self._still = None
