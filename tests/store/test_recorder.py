"""Group commit (`amqtask.store._recorder`): batches, order, and a store that is down."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from amqtask import StoreUnavailable
from amqtask.store import Recorder, TaskState, Transition


class FakeStore:
    """Records each batch written; refuses writes while `down`."""

    url = "fake://store"
    kind = "fake"
    claim_ttl = 30.0

    def __init__(self) -> None:
        self.batches: list[list[Transition]] = []
        self.down = False
        self.attempts = 0

    async def write(self, transitions: Sequence[Transition]) -> None:
        self.attempts += 1
        await asyncio.sleep(0.001)
        if self.down:
            raise StoreUnavailable("fake://store: down")
        self.batches.append(list(transitions))

    @property
    def written(self) -> list[str]:
        return [t.id for batch in self.batches for t in batch]


def running(n: int) -> Transition:
    return Transition(f"t{n}", "jobs.run", 1, TaskState.RUNNING, 1, float(n))


def make(store: FakeStore, **kw: Any) -> Recorder:
    return Recorder(store, **kw)  # type: ignore[arg-type]


async def test_transitions_recorded_together_are_written_in_one_batch() -> None:
    store = FakeStore()
    recorder = make(store, interval=0.01)
    for n in range(100):
        recorder.record(running(n))

    assert await recorder.flush(timeout=5.0)
    await recorder.close()

    assert store.written == [f"t{n}" for n in range(100)]
    assert len(store.batches) == 1


async def test_a_batch_is_at_most_batch_transitions() -> None:
    store = FakeStore()
    recorder = make(store, batch=10)
    for n in range(35):
        recorder.record(running(n))

    await recorder.flush(timeout=5.0)
    await recorder.close()

    assert [len(batch) for batch in store.batches] == [10, 10, 10, 5]


async def test_recording_never_waits_for_the_store() -> None:
    store = FakeStore()
    store.down = True
    recorder = make(store)

    for n in range(1000):
        recorder.record(running(n))  # returns at once: no await

    assert recorder.pending == 1000
    recorder.buffer = 0  # let close() give up without waiting long
    await recorder.close(timeout=0.05)


async def test_what_was_recorded_while_the_store_was_down_is_written_once_it_is_back() -> None:
    store = FakeStore()
    store.down = True
    recorder = make(store)
    for n in range(50):
        recorder.record(running(n))
    await asyncio.sleep(0.3)
    assert store.written == []
    assert store.attempts >= 2  # it kept trying

    store.down = False
    assert await recorder.flush(timeout=10.0)
    await recorder.close()

    assert store.written == [f"t{n}" for n in range(50)]


async def test_past_the_buffer_the_oldest_transitions_are_dropped_and_counted() -> None:
    store = FakeStore()
    store.down = True
    recorder = make(store, buffer=10)
    for n in range(25):
        recorder.record(running(n))

    store.down = False
    await recorder.flush(timeout=10.0)
    await recorder.close()

    assert recorder.dropped == 15
    assert store.written == [f"t{n}" for n in range(15, 25)]


async def test_committed_returns_once_that_transition_is_written() -> None:
    store = FakeStore()
    recorder = make(store)

    assert await recorder.committed(running(1), timeout=5.0)
    assert store.written == ["t1"]
    await recorder.close()


async def test_committed_waits_out_an_outage() -> None:
    store = FakeStore()
    store.down = True
    recorder = make(store)
    waiting = asyncio.create_task(recorder.committed(running(1)))
    await asyncio.sleep(0.3)
    assert not waiting.done()

    store.down = False

    assert await asyncio.wait_for(waiting, 10.0)
    await recorder.close()


async def test_a_closed_recorder_records_again_when_used_again() -> None:
    store = FakeStore()
    recorder = make(store)
    await recorder.committed(running(1), timeout=5.0)
    await recorder.close()

    assert await recorder.committed(running(2), timeout=5.0)
    await recorder.close()

    assert store.written == ["t1", "t2"]
