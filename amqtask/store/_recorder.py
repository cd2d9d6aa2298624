"""Group commit: transitions are queued in memory and written in batches, off the hot path.

`record` never waits and never raises: it appends to a queue. One flusher task writes what is
queued in one transaction: what came while the last write ran goes at once, and a transition
that finds the flusher idle waits `interval` seconds for others to join it (unless `batch` are
queued), so a busy worker writes a batch every few milliseconds, never a round trip per
transition.
`committed` waits for one transition's batch (a `deduplicate` task's completion is stored before
its ack).

When the store is down, the queue keeps up to `buffer` transitions and the flusher retries with
backoff (`store_unavailable` once, `store_restored` with the count written once it is back).
Beyond `buffer` the oldest transitions are dropped and counted (`store_records_dropped`): the
store then misses those changes (a tracking gap), never a task, which the broker holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from amqtask._exceptions import StoreError, StoreMissing, StoreUnavailable
from amqtask._startup import Backoff
from amqtask.store._model import Transition, coalesce

if TYPE_CHECKING:
    from amqtask.store import Store

log = structlog.get_logger("amqtask.store")

DEFAULT_INTERVAL = 0.002  # seconds a flush waits for more transitions to join its batch
DEFAULT_BATCH = 500
DEFAULT_BUFFER = 100_000  # transitions kept while the store is down
_BACKOFF = Backoff(first=0.2, cap=5.0)


class Recorder:
    """Writes `Transition`s to a `Store` in batches, in order, retrying through outages."""

    def __init__(
        self,
        store: Store,
        *,
        interval: float = DEFAULT_INTERVAL,
        batch: int = DEFAULT_BATCH,
        buffer: int = DEFAULT_BUFFER,
    ) -> None:
        self.store = store
        self.interval, self.batch, self.buffer = interval, batch, buffer
        self._queue: deque[tuple[int, Transition]] = deque()
        self._seq = 0  # sequence number of the last transition recorded
        self._done = 0  # every transition up to this number is written (or dropped)
        self._waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self._dropped_upto = 0
        self.dropped = 0
        self.written = 0
        self.down_since: float | None = None
        self._wake: asyncio.Event | None = None  # made with the flusher, on its event loop
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def record(self, transition: Transition) -> int:
        """Queue `transition`; return its sequence number. Never waits, never raises."""
        self._seq += 1
        self._queue.append((self._seq, transition))
        if len(self._queue) > self.buffer:
            dropped, _ = self._queue.popleft()
            self._dropped_upto = dropped
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("store_records_dropped", dropped=self.dropped, buffer=self.buffer)
            self._settle_waiters()
        if self._flusher is None and not self._closing:
            self._wake = asyncio.Event()
            self._flusher = asyncio.create_task(self._flush_forever(), name="amqtask-recorder")
        if self._wake is not None:
            self._wake.set()
        return self._seq

    async def committed(self, transition: Transition, timeout: float | None = None) -> bool:
        """Record `transition` and wait until it is written: True once it is, False when it was
        dropped or `timeout` passed first."""
        return await self._until(self.record(transition), timeout)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything recorded so far is written: False after `timeout`."""
        return await self._until(self._seq, timeout)

    async def _until(self, seq: int, timeout: float | None) -> bool:
        if seq <= self._done:
            return seq > self._dropped_upto
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, future))
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            return False

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to `timeout` seconds), then stop."""
        if self._queue:
            written = await self.flush(timeout)
            if not written:
                log.warning("store_records_unwritten", count=len(self._queue))
        self._closing = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = self._wake = None
        self._closing = False  # recording again starts a new flusher (an app connected again)

    def _settle_waiters(self) -> None:
        done = max(self._done, self._dropped_upto)
        keep = []
        for seq, future in self._waiters:
            if seq <= done:
                if not future.done():
                    future.set_result(seq > self._dropped_upto and seq <= self._done)
            else:
                keep.append((seq, future))
        self._waiters = keep

    async def _flush_forever(self) -> None:
        failures = 0
        wake = self._wake
        assert wake is not None
        waited = False  # the queued transitions waited through the last write already
        while True:
            if not self._queue:
                wake.clear()
                await wake.wait()
                waited = False
                continue
            if len(self._queue) < self.batch and self.interval > 0 and not waited:
                await asyncio.sleep(self.interval)  # let the batch fill
            batch = [self._queue[i] for i in range(min(self.batch, len(self._queue)))]
            try:
                await self.store.write(coalesce(t for _, t in batch))
            except (StoreUnavailable, StoreMissing) as exc:
                failures += 1
                if failures == 1:
                    self.down_since = asyncio.get_running_loop().time()
                    log.error(
                        "store_unavailable",
                        store=self.store.url,
                        error=str(exc),
                        queued=self.pending,
                    )
                await asyncio.sleep(_BACKOFF.delay(failures, 0.5))
                continue
            except Exception as exc:
                # Not an outage: a write that fails the same way again (a defect, a value the
                # database refuses). Dropping this batch keeps the others flowing.
                log.exception("store_write_failed", error=repr(exc), count=len(batch))
            if failures:
                log.info("store_restored", store=self.store.url, queued=self.pending)
                failures, self.down_since = 0, None
            # The queue only grows at its end and drops at its start meanwhile: remove the
            # batch's entries still there.
            last = batch[-1][0]
            while self._queue and self._queue[0][0] <= last:
                self._queue.popleft()
            self.written += len(batch)
            self._done = max(self._done, last)
            self._settle_waiters()
            waited = bool(self._queue)  # what came during the write goes next, at once


# --- the running task, for `amqtask.store.transaction()` ---------------------------------------


@dataclass(frozen=True, slots=True)
class RunningClaim:
    """A `deduplicate` task's claim, seen by its handler through a context variable."""

    store: Store
    task_id: str
    owner: str


CURRENT_CLAIM: contextvars.ContextVar[RunningClaim | None] = contextvars.ContextVar(
    "amqtask_current_claim", default=None
)


@contextlib.asynccontextmanager
async def current_transaction() -> AsyncIterator[Any]:
    claim = CURRENT_CLAIM.get()
    if claim is None:
        raise StoreError(
            "amqtask.store.transaction() is for the handler of a task whose contract has "
            "deduplicate=True, run by a worker whose app has a PostgreSQL store"
        )
    async with claim.store.transaction(claim.task_id, claim.owner) as connection:
        yield connection
