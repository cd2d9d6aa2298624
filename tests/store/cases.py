"""What every `Store` does, whatever its database: collected by `test_sqlite.py` (unit) and by
`tests/integration/test_store_postgres.py` (a real PostgreSQL), each with its own `store`
fixture (migrated, empty)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from amqtask import StoreMissing
from amqtask.store import ClaimVerdict, Store, TaskState, Transition
from amqtask.store._model import TaskInfo


def tr(state: TaskState, attempt: int = 1, task_id: str = "t1", **kw: Any) -> Transition:
    return Transition(task_id, "jobs.run", 1, state, attempt, time.time(), worker="w:1", **kw)


async def info(store: Store, task_id: str = "t1") -> TaskInfo:
    row = await store.get(task_id)
    assert row is not None
    return TaskInfo.from_row(row)


async def test_each_state_a_task_passes_through_is_recorded_in_order(store: Store) -> None:
    states = []
    for transition in (
        tr(TaskState.QUEUED, 0),
        tr(TaskState.RUNNING, 1),
        tr(TaskState.RETRYING, 1, error="boom", error_type="builtins.ValueError"),
        tr(TaskState.RUNNING, 2),
        tr(TaskState.SUCCEEDED, 2, result='{"ok": true}'),
    ):
        await store.write([transition])
        states.append((await info(store)).state)

    done = await info(store)
    assert states == ["queued", "running", "retrying", "running", "succeeded"]
    assert (done.attempts, done.result_json, done.error) == (2, '{"ok": true}', None)
    assert done.queued_at is not None
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.expires_at is not None


async def test_a_producers_late_queued_fills_in_the_queue_time_and_nothing_else(
    store: Store,
) -> None:
    await store.write([tr(TaskState.RUNNING, 1)])
    await store.write([tr(TaskState.QUEUED, 0)])

    late = await info(store)
    assert late.state == "running"
    assert late.queued_at is not None


async def test_a_failed_task_keeps_its_reason_type_message_and_traceback(store: Store) -> None:
    await store.write(
        [
            tr(
                TaskState.FAILED,
                3,
                error="disk full",
                error_type="builtins.OSError",
                reason="handler_error",
                traceback="Traceback ...",
            )
        ]
    )

    failed = await info(store)
    assert (failed.state, failed.error_type, failed.error, failed.reason) == (
        "failed",
        "builtins.OSError",
        "disk full",
        "handler_error",
    )
    assert failed.traceback == "Traceback ..."


async def test_a_task_revoked_before_it_runs_is_revoked_at_once(store: Store) -> None:
    await store.write([tr(TaskState.QUEUED, 0)])

    await store.revoke("t1", terminate=False)

    revoked = await info(store)
    assert revoked.state == "revoked"
    assert revoked.revoke_requested
    revocations, _ = await store.revocations(0.0)
    assert revocations == [("t1", False)]


async def test_a_revocation_of_an_id_not_seen_yet_waits_for_it(store: Store) -> None:
    await store.revoke("later", terminate=True)
    await store.write([tr(TaskState.QUEUED, 0, task_id="later")])

    assert (await info(store, "later")).state == "revoked"
    assert (await store.revocations(0.0))[0] == [("later", True)]


async def test_a_running_task_revoked_keeps_running_until_a_worker_stops_it(store: Store) -> None:
    await store.write([tr(TaskState.RUNNING, 1)])
    await store.revoke("t1", terminate=True)
    assert (await info(store)).state == "running"

    await store.write([tr(TaskState.REVOKED, 1)])

    assert (await info(store)).state == "revoked"


async def test_revocations_since_a_time_are_those_made_after_it(store: Store) -> None:
    await store.revoke("old", terminate=False)
    await asyncio.sleep(0.05)  # SQLite's clock counts milliseconds
    _, now = await store.revocations(0.0)
    await asyncio.sleep(0.05)
    await store.revoke("new", terminate=False)

    recent, _ = await store.revocations(now)

    assert recent == [("new", False)]


async def test_one_claim_runs_and_the_others_wait_until_it_ends(store: Store) -> None:
    running = tr(TaskState.RUNNING, 1)

    first = await store.claim(running, "owner-1")
    second = await store.claim(running, "owner-2")
    await store.write([tr(TaskState.SUCCEEDED, 1)])
    after = await store.claim(running, "owner-3")

    assert first.verdict is ClaimVerdict.RUN
    assert second.verdict is ClaimVerdict.BUSY
    assert second.expires_at is not None
    assert after.verdict is ClaimVerdict.DONE


async def test_an_expired_claim_can_be_taken(store: Store) -> None:
    store.claim_ttl = 0.05
    running = tr(TaskState.RUNNING, 1)
    await store.claim(running, "owner-1")
    await asyncio.sleep(0.2)

    assert (await store.claim(running, "owner-2")).verdict is ClaimVerdict.RUN


async def test_a_renewed_claim_stays_held(store: Store) -> None:
    store.claim_ttl = 0.3
    running = tr(TaskState.RUNNING, 1)
    await store.claim(running, "owner-1")
    for _ in range(4):
        await asyncio.sleep(0.1)
        await store.renew(["owner-1"])

    assert (await store.claim(running, "owner-2")).verdict is ClaimVerdict.BUSY


async def test_a_failed_attempt_releases_the_claim_for_the_retry(store: Store) -> None:
    await store.claim(tr(TaskState.RUNNING, 1), "owner-1")
    await store.write([tr(TaskState.RETRYING, 1)])

    retry = await store.claim(tr(TaskState.RUNNING, 2), "owner-2")

    assert retry.verdict is ClaimVerdict.RUN


async def test_a_revoked_task_cannot_be_claimed(store: Store) -> None:
    await store.revoke("t1", terminate=False)

    assert (await store.claim(tr(TaskState.RUNNING, 1), "o")).verdict is ClaimVerdict.REVOKED


async def test_expired_records_are_deleted_in_batches(store: Store) -> None:
    await store.write(
        [tr(TaskState.SUCCEEDED, 1, task_id=f"old{n}", keep=0.001) for n in range(5)]
        + [tr(TaskState.SUCCEEDED, 1, task_id="kept")]
    )
    await asyncio.sleep(0.05)

    first = await store.cleanup(3)
    second = await store.cleanup(3)

    assert (first, second) == (3, 2)
    assert await store.get("kept") is not None
    assert await store.get("old0") is None


async def test_listing_filters_by_state_task_and_time(store: Store) -> None:
    await store.write([tr(TaskState.FAILED, 1, task_id="f1"), tr(TaskState.SUCCEEDED, 1, "s1")])
    await store.write([Transition("o1", "other", 1, TaskState.FAILED, 1, time.time())])

    failed = await store.listing(state="failed", task="jobs.run", since=None, limit=10)
    recent = await store.listing(state=None, task=None, since=time.time() - 60, limit=10)
    future = await store.listing(state=None, task=None, since=time.time() + 60, limit=10)

    assert [row["id"] for row in failed] == ["f1"]
    assert {row["id"] for row in recent} == {"f1", "s1", "o1"}
    assert future == []


async def test_counts_are_per_task_version_and_state(store: Store) -> None:
    await store.write([tr(TaskState.FAILED, 1, "a"), tr(TaskState.FAILED, 1, "b")])
    await store.write([tr(TaskState.SUCCEEDED, 1, "c")])

    assert sorted(await store.counts()) == [
        ("jobs.run", 1, "failed", 2),
        ("jobs.run", 1, "succeeded", 1),
    ]


async def test_a_watch_wakes_when_the_task_finishes(store: Store) -> None:
    async with store.watch("t1") as watch:
        waiting = asyncio.create_task(watch.wait(10.0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await store.write([tr(TaskState.SUCCEEDED, 1)])
        await asyncio.wait_for(waiting, 5.0)

    assert time.monotonic() - started < 5.0


async def test_migrating_again_changes_nothing(store: Store) -> None:
    assert await store.migrate() == []
    await store.check()


async def test_a_store_without_tables_says_to_declare(empty_store: Store) -> None:
    with pytest.raises(StoreMissing, match="amqtask declare"):
        await empty_store.check()
    with pytest.raises(StoreMissing, match="amqtask declare"):
        await empty_store.get("t1")
