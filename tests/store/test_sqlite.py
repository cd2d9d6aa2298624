"""The SQLite store (`amqtask.store._sqlite`) on a file of the test's own: every case of
`cases.py`, plus what only SQLite does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from amqtask import StoreError
from amqtask.store import Store, open_store
from tests.store.cases import *  # noqa: F403  (the shared cases, collected here)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'tasks.db'}")
    await opened.migrate()
    yield opened
    await opened.close()


@pytest.fixture
async def empty_store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'empty.db'}")
    yield opened
    await opened.close()


async def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    writer, reader = open_store(url), open_store(url)
    await writer.migrate()
    try:
        from amqtask.store import TaskState, Transition

        async with reader.watch("x") as watch:
            await writer.write([Transition("x", "t", 1, TaskState.SUCCEEDED, 1, 1.0)])
            # Woken by the other connection's commit, well before the wait's own end.
            await asyncio.wait_for(watch.wait(60.0), 20.0)
            row = await reader.get("x")
    finally:
        await writer.close()
        await reader.close()

    assert row is not None
    assert row["state"] == "succeeded"


async def test_a_file_in_a_directory_that_does_not_exist_is_unavailable(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'missing' / 'tasks.db'}")
    try:
        with pytest.raises(StoreError, match="does not exist"):
            await store.migrate()
    finally:
        await store.close()


async def test_the_same_transaction_hook_is_for_postgresql_only(store: Store) -> None:
    with pytest.raises(StoreError, match="PostgreSQL"):
        store.transaction("t1", "owner")
