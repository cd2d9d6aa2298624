"""The SQLite store: one file, one host, no server. The standard library's `sqlite3`.

Each store holds one connection, used from one thread of its own (an executor of one worker):
sqlite3 connections are not to be shared between threads, and a batch of transitions is one
hop to that thread and one transaction, so a thread per store costs nothing measurable and
needs no dependency (aiosqlite does the same, a thread per connection, with more code between).
The file is in WAL mode (readers never block the writer, several processes on the host share
it), `synchronous=NORMAL` (a commit survives a crash of the process, not a power cut), and
waits up to `busy_timeout` for another process's write lock.

`wait` (for `App.result`) polls `PRAGMA data_version` every 2 ms, which changes when another
connection commits (reading it touches no table); a commit of this store's own wakes waiters at
once. SQLite has no notifications between processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from amqtask import _wallclock
from amqtask._exceptions import StoreError, StoreMissing, StoreUnavailable
from amqtask.store._model import (
    REVOCATION_HORIZON,
    Claim,
    ClaimVerdict,
    StoreURL,
    Transition,
    claim_verdict,
)
from amqtask.store._schema import Dialect, check_version

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
POLL_INTERVAL = 0.002  # seconds between `data_version` reads while someone waits


class SqliteStore:
    """`Store` on one SQLite file (`sqlite:///path`)."""

    kind = "sqlite"

    def __init__(self, url: StoreURL, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.url = f"sqlite:///{url.target}"
        self.path = url.target
        self.claim_ttl = url.claim_ttl
        self.dialect = Dialect("sqlite", "amqtask")
        self._busy_timeout_ms = busy_timeout_ms
        self._thread: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        self._changed = asyncio.Event()  # set (and replaced) by each commit seen
        self.generation = 0  # commits seen
        self._watchers = 0
        self._poller: asyncio.Task[None] | None = None

    # --- plumbing ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="amqtask-sqlite")
        await self._call(self._connect)

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        if self.path != ":memory:":
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                raise StoreUnavailable(f"store {self.url}: directory {directory} does not exist")
        connection = sqlite3.connect(
            self.path,
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
            check_same_thread=False,  # used from the store's one thread, opened there too
            timeout=self._busy_timeout_ms / 1000,
        )
        connection.row_factory = sqlite3.Row
        # The store's clock (`Dialect.now`): the wall clock amqtask reads everywhere, the same
        # system clock as SQLite's julianday('now'), and the virtual one under amqtask.testing.
        connection.create_function("amqtask_now", 0, _wallclock.now)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        self._connection = connection
        return connection

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._changed = asyncio.Event()  # a later event loop gets its own
        thread, self._thread = self._thread, None
        if thread is None:
            return
        connection, self._connection = self._connection, None
        if connection is not None:
            await asyncio.get_running_loop().run_in_executor(thread, connection.close)
        thread.shutdown(wait=False)

    async def _call(self, work: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            await self.open()
        assert self._thread is not None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "no such table" in text:
                raise StoreMissing(
                    f"store {self.url} has no amqtask tables: run `amqtask declare APP`"
                ) from exc
            raise StoreUnavailable(f"store {self.url}: {text}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"store {self.url}: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        return self._connect()

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _committed(self) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # --- schema -----------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        d = self.dialect

        def run(db: sqlite3.Connection) -> list[int]:
            for statement in d.create_versions():
                db.execute(statement)
            row = db.execute(f"SELECT MAX(version) FROM {d.versions}").fetchone()
            current = row[0] or 0
            applied = []
            for version, statements in d.migrations():
                if version <= current:
                    continue
                for statement in statements:
                    db.execute(statement)
                db.execute(f"INSERT INTO {d.versions} (version) VALUES (?)", (version,))
                applied.append(version)
            return applied

        return await self._call(self._transaction, run)

    async def check(self) -> None:
        d = self.dialect

        def read(db: sqlite3.Connection) -> int | None:
            try:
                row = db.execute(f"SELECT MAX(version) FROM {d.versions}").fetchone()
            except sqlite3.OperationalError:
                return None
            return None if row is None else row[0]

        version = await self._call(lambda: read(self._db()))
        check_version(self.url, version)

    # --- writes -----------------------------------------------------------------------------

    async def write(self, transitions: Sequence[Transition]) -> None:
        if not transitions:
            return
        sql = self.dialect.upsert
        params = [t.params() for t in sorted(transitions, key=lambda t: t.id)]
        await self._call(self._transaction, lambda db: db.executemany(sql, params))
        self._committed()

    async def revoke(self, task_id: str, *, terminate: bool) -> None:
        sql = self.dialect.revoke()
        await self._call(
            self._transaction, lambda db: db.execute(sql, (task_id, terminate, REVOCATION_HORIZON))
        )
        self._committed()

    async def claim(self, transition: Transition, owner: str) -> Claim:
        d = self.dialect
        params = (
            transition.id,
            transition.task,
            transition.version,
            transition.attempt,
            transition.worker,
            owner,
            self.claim_ttl,
        )

        def run(db: sqlite3.Connection) -> Claim:
            if db.execute(d.claim(), params).fetchone() is not None:
                return Claim(ClaimVerdict.RUN)
            row = db.execute(d.claim_state(), (transition.id,)).fetchone()
            return claim_verdict(None if row is None else dict(row), _wallclock.now())

        result: Claim = await self._call(self._transaction, run)
        self._committed()
        return result

    async def renew(self, owners: Sequence[str]) -> None:
        if not owners:
            return
        sql = self.dialect.renew(len(owners))
        await self._call(self._transaction, lambda db: db.execute(sql, (self.claim_ttl, *owners)))

    async def cleanup(self, limit: int) -> int:
        sql = self.dialect.cleanup()
        count = await self._call(self._transaction, lambda db: db.execute(sql, (limit,)).rowcount)
        return int(count)

    def transaction(self, task_id: str, owner: str) -> contextlib.AbstractAsyncContextManager[Any]:
        raise StoreError(
            "amqtask.store.transaction() needs a PostgreSQL store: a SQLite store's connection "
            "lives in a thread of its own"
        )

    # --- reads ------------------------------------------------------------------------------

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        return [dict(row) for row in self._db().execute(sql, tuple(params)).fetchall()]

    async def get(self, task_id: str) -> dict[str, Any] | None:
        rows = await self._call(self._fetch, self.dialect.select, (task_id,))
        return rows[0] if rows else None

    async def revocations(self, since: float) -> tuple[list[tuple[str, bool]], float]:
        def read() -> tuple[list[tuple[str, bool]], float]:
            db = self._db()
            now = _wallclock.now()
            rows = db.execute(self.dialect.revocations, (since,)).fetchall()
            return [(row["id"], bool(row["terminate"])) for row in rows], now

        return await self._call(read)

    async def listing(
        self, *, state: str | None, task: str | None, since: float | None, limit: int
    ) -> list[dict[str, Any]]:
        sql, names = self.dialect.listing(
            state=state is not None, task=task is not None, since=since is not None, limit=limit
        )
        values = {"state": state, "task": task, "since": since}
        return await self._call(self._fetch, sql, [values[name] for name in names])

    async def counts(self) -> list[tuple[str | None, int | None, str, int]]:
        rows = await self._call(self._fetch, self.dialect.counts, ())
        return [(r["task"], r["version"], r["state"], r["n"]) for r in rows]

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[_Watch]:
        if self._poller is None:
            # The baseline is read before the caller reads the row: a commit in between shows.
            seen = await self._call(self._data_version)
            self._poller = asyncio.create_task(self._poll(seen))
        self._watchers += 1
        try:
            yield _Watch(self)
        finally:
            self._watchers -= 1

    def _data_version(self) -> int:
        return int(self._db().execute("PRAGMA data_version").fetchone()[0])

    async def _poll(self, seen: int) -> None:
        """While someone waits: notice commits of other processes by `data_version`."""
        try:
            while self._watchers > 0:
                await asyncio.sleep(POLL_INTERVAL)
                now = await self._call(self._data_version)
                if now != seen:
                    seen = now
                    self._committed()
        except StoreError:
            self._committed()  # waiters look again, and see the error themselves
        finally:
            self._poller = None


class _Watch:
    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._seen = store.generation

    async def wait(self, timeout: float) -> None:
        store = self._store
        if store.generation == self._seen:
            changed = store._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
        self._seen = store.generation
