"""The PostgreSQL store (`amqtask.store._postgres`) on the shared server, in a schema of the
test's own: every case of `tests/store/cases.py`, plus what only PostgreSQL does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

import amqtask.store as amqtask_store
from amqtask import StoreError, StoreUnavailable
from amqtask.store import Store, TaskState, Transition, open_store
from amqtask.store._recorder import CURRENT_CLAIM, RunningClaim
from tests.integration.postgres import SHARED_DSN, schema_url
from tests.store.cases import *  # noqa: F403  (the shared cases, collected here)


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    async with schema_url() as url:
        opened = open_store(url)
        await opened.migrate()
        yield opened
        await opened.close()


@pytest.fixture
async def empty_store() -> AsyncIterator[Store]:
    async with schema_url() as url:
        opened = open_store(url)
        yield opened
        await opened.close()


async def test_two_apps_declaring_at_once_migrate_once() -> None:
    async with schema_url() as url:
        stores = [open_store(url) for _ in range(3)]
        try:
            applied = await asyncio.gather(*(s.migrate() for s in stores))
        finally:
            for s in stores:
                await s.close()

    assert sorted(applied) == [[], [], [1]]


async def test_writes_in_the_same_transaction_commit_with_the_effects_mark(store: Store) -> None:
    schema = store.dialect.schema  # type: ignore[attr-defined]
    running = Transition("t1", "jobs.run", 1, TaskState.RUNNING, 1, time.time(), worker="w")
    await store.claim(running, "owner-1")
    token = CURRENT_CLAIM.set(RunningClaim(store, "t1", "owner-1"))
    try:
        async with amqtask_store.transaction() as db:
            await db.execute(f'CREATE TABLE "{schema}".payments (id text)')
            await db.execute(f"INSERT INTO \"{schema}\".payments VALUES ('p1')")
    finally:
        CURRENT_CLAIM.reset(token)

    again = await store.claim(running, "owner-2")
    row = await store.get("t1")
    assert again.verdict.value == "committed"  # a redelivered copy is skipped
    assert row is not None
    assert row["committed_at"] is not None


async def test_a_transaction_whose_claim_was_lost_is_rolled_back(store: Store) -> None:
    schema = store.dialect.schema  # type: ignore[attr-defined]
    running = Transition("t1", "jobs.run", 1, TaskState.RUNNING, 1, time.time(), worker="w")
    store.claim_ttl = 0.05
    await store.claim(running, "owner-1")
    await asyncio.sleep(0.2)
    await store.claim(running, "owner-2")  # the claim expired: another run took it
    token = CURRENT_CLAIM.set(RunningClaim(store, "t1", "owner-1"))
    try:
        with pytest.raises(StoreError, match="rolled back"):
            async with amqtask_store.transaction() as db:
                await db.execute(f'CREATE TABLE "{schema}".payments (id text)')
    finally:
        CURRENT_CLAIM.reset(token)

    connection = await asyncpg.connect(SHARED_DSN)
    try:
        exists = await connection.fetchval("SELECT to_regclass($1)", f"{schema}.payments")
    finally:
        await connection.close()
    assert exists is None


async def test_the_transaction_hook_outside_a_deduplicated_handler_says_so() -> None:
    with pytest.raises(StoreError, match="deduplicate=True"):
        async with amqtask_store.transaction():
            pass


async def test_a_server_that_is_not_there_is_unavailable() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/test")
    try:
        with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1"):
            await store.get("t1")
    finally:
        await store.close()
