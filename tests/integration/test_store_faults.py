"""The task store under faults: a deduplicated task whose worker is killed mid-task (kill -9),
and the PostgreSQL store stopped and started mid-run (a private cluster, never the shared
server). Nothing whose `send` returned is lost, and a deduplicated effect happens once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel

import amqtask
from tests.integration.conftest import (
    AppFactory,
    app_env,
    running,
    start_worker,
    wait_for,
)
from tests.integration.postgres import PrivatePostgres, schema_url
from tests.integration.store_apps import APP, store_app


class Job(BaseModel):
    n: int


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as cluster:
        yield cluster


def lines(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


async def kill_mid_task(
    module: ModuleType, env: dict[str, str], record: Path, mark: str
) -> tuple[str, str]:
    """Send job 1 to a worker, kill -9 it once `mark` is recorded, let a second worker take the
    redelivery; return the task id and the second worker's log once the task is done."""
    first = await start_worker(f"{APP}:app", "--concurrency", "1", env=env)
    try:
        async with module.app:
            task_id = await module.app.send(module.job, {"n": 1})
        await wait_for(lambda: mark in lines(record), 30)
    finally:
        first.kill()  # SIGKILL: no ack, no release of the claim
        await first.wait()
    second = await start_worker(
        f"{APP}:app", "--concurrency", "1", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with module.app:
            await wait_for(_finished(module.app, task_id), 60)
    finally:
        second.terminate()
        _, err = await asyncio.wait_for(second.communicate(), 30)
    return task_id, err.decode()


def _finished(app: amqtask.App, task_id: str) -> Any:
    async def check() -> bool:
        info = await app.task(task_id)
        return info is not None and info.state.value == "succeeded"

    return check


async def test_a_deduplicated_task_killed_mid_run_runs_again_only_once_its_claim_expired(
    unique: str, broker_url: str, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    store_url = f"sqlite:///{tmp_path / 'tasks.db'}?claim_ttl=3"
    env = app_env(broker_url, unique, record, TEST_STORE_URL=store_url, TEST_SLEEP="2")
    async with store_app(unique, broker_url, store_url) as module:
        _, log = await kill_mid_task(module, env, record, "start 1")

    # The second delivery waited for the dead worker's claim, then ran; the effect happened once.
    assert lines(record) == ["start 1", "start 1", "done 1"]
    assert "task_claimed_elsewhere" in log


async def test_a_deduplicated_task_whose_effects_committed_is_skipped_after_a_kill(
    unique: str, broker_url: str, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    async with schema_url(claim_ttl="3") as store_url:
        env = app_env(
            broker_url,
            unique,
            record,
            TEST_STORE_URL=store_url,
            TEST_SLEEP="30",
            TEST_SAME_TRANSACTION="1",
        )
        async with store_app(unique, broker_url, store_url) as module:
            try:
                _, log = await kill_mid_task(module, env, record, "committed 1")
            finally:
                db = await asyncpg.connect(store_url.split("?")[0])
                try:
                    effects = await db.fetchval(f"SELECT count(*) FROM {module.EFFECTS}")
                    await db.execute(f"DROP TABLE IF EXISTS {module.EFFECTS}")
                finally:
                    await db.close()

    # Killed after its transaction committed: the redelivered copy is acked without running.
    assert lines(record) == ["start 1", "committed 1"]
    assert effects == 1
    assert "task_skipped" in log


async def test_a_store_stopped_mid_run_loses_no_task_and_pauses_only_deduplicated_ones(
    make_app: AppFactory, unique: str, private_postgres: PrivatePostgres
) -> None:
    store_url = f"{private_postgres.url}?claim_ttl=3"
    plain = amqtask.contract(f"{unique}.plain", Job)
    once = amqtask.contract(f"{unique}.once", Job, deduplicate=True)
    # Deduplicated tasks waiting for the store hold their worker's slots: they run on workers
    # of their own (as the README advises), so that the others are not held up.
    plain_app = make_app([plain, once], store=store_url)
    once_app = make_app([plain, once], store=store_url)
    await plain_app.declare()
    ran: dict[str, list[int]] = {"plain": [], "once": []}

    @plain_app.handler(plain)
    async def run_plain(job: Job) -> None:
        ran["plain"].append(job.n)

    @once_app.handler(once)
    async def run_once(job: Job) -> None:
        ran["once"].append(job.n)

    producer = make_app([plain, once], store=store_url)
    ids: list[str] = []

    async def send(numbers: range) -> None:
        for n in numbers:
            ids.append(await producer.send(plain, Job(n=n)))
            ids.append(await producer.send(once, Job(n=n)))

    async with producer, running(plain_app), running(once_app):
        await send(range(20))
        await wait_for(lambda: len(ran["plain"]) == len(ran["once"]) == 20)

        await asyncio.to_thread(private_postgres.stop)
        await send(range(20, 40))  # sends do not wait for the store
        await wait_for(lambda: len(ran["plain"]) == 40, 30)  # tracked later, run now
        await asyncio.sleep(1.0)
        paused = len(ran["once"])  # deduplicated tasks wait for their claims
        with pytest.raises(amqtask.StoreUnavailable):
            await producer.task(ids[0])

        await asyncio.to_thread(private_postgres.start)
        await wait_for(lambda: len(ran["once"]) == 40, 60)

        async def all_recorded() -> bool:
            infos = await producer.tasks(limit=200)
            return sum(info.state.value == "succeeded" for info in infos) == 80

        await wait_for(all_recorded, 60)

    assert paused == 20
    assert sorted(ran["plain"]) == list(range(40))
    assert sorted(ran["once"]) == list(range(40))  # each once: no duplicate after the outage
