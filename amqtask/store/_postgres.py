"""The PostgreSQL store: one database shared by every host. The asyncpg driver.

asyncpg rather than psycopg 3: `executemany` sends a whole batch of transitions in one round
trip and applies it atomically (the group commit is one statement batch, not a loop), its
LISTEN support calls back on the event loop (`add_listener`) while the connection stays usable,
and it is the faster of the two on the small statements the worker sends.

Connections come from a pool (`min_size` 0: nothing is opened until used, so a store that is
down at start delays only what needs it). Finished task ids are announced with
`NOTIFY {schema}_finished` after each batch that holds one; `App.result` LISTENs on one
connection of its own and reads the row when its id is announced.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import asyncpg.exceptions as pg

from amqtask._exceptions import StoreError, StoreMissing, StoreUnavailable
from amqtask._urls import safe_url
from amqtask.store._model import (
    REVOCATION_HORIZON,
    Claim,
    ClaimVerdict,
    StoreURL,
    Transition,
    claim_verdict,
)
from amqtask.store._schema import Dialect, check_version

# Errors of a server that is down, restarting or out of reach: waiting may fix them.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    pg.PostgresConnectionError,
    pg.OperatorInterventionError,  # admin shutdown, cannot connect now (starting up)
    asyncpg.InterfaceError,  # the connection was closed under us
)
_MISSING: tuple[type[BaseException], ...] = (
    pg.UndefinedTableError,
    pg.InvalidSchemaNameError,
)

# A transaction the server rolled back for another's sake: trying again is the remedy.
_CONFLICTS: tuple[type[BaseException], ...] = (
    pg.DeadlockDetectedError,
    pg.SerializationError,
)
_CONFLICT_RETRIES = 5

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
_LOCK_ID = 0x616D71746B  # "amqtk": serializes concurrent `declare`s of the same database


class PostgresStore:
    """`Store` on a PostgreSQL database (`postgresql://user@host/db?schema=amqtask`)."""

    kind = "postgres"

    def __init__(
        self,
        url: StoreURL,
        raw_url: str,
        *,
        max_size: int = 10,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.url = safe_url(raw_url)
        self.claim_ttl = url.claim_ttl
        self.dialect = Dialect("postgres", url.schema)
        self._dsn = url.target
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listening = asyncio.Lock()
        self._watches: dict[str, set[asyncio.Event]] = {}

    # --- plumbing ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        async with self._errors():
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=self._max_size,
                timeout=self._connect_timeout,
                command_timeout=COMMAND_TIMEOUT,
            )

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(*_UNAVAILABLE):
                await listener.close(timeout=2.0)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except _UNAVAILABLE:  # TimeoutError among them
                pool.terminate()

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except _MISSING as exc:
            raise StoreMissing(
                f"store {self.url} has no amqtask tables in schema {self.dialect.schema!r}: "
                "run `amqtask declare APP`"
            ) from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"store {self.url}: {type(exc).__name__}: {' '.join(str(exc).split())}"
            ) from exc

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:  # an asyncpg pool connection
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        async with self._errors(), self._pool.acquire(timeout=self._connect_timeout) as con:
            yield con

    # --- schema -----------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        d = self.dialect
        async with self._connection() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            for statement in d.create_versions():
                await con.execute(statement)
            current = await con.fetchval(f"SELECT MAX(version) FROM {d.versions}") or 0
            applied = []
            for version, statements in d.migrations():
                if version <= current:
                    continue
                for statement in statements:
                    await con.execute(statement)
                await con.execute(f"INSERT INTO {d.versions} (version) VALUES ($1)", version)
                applied.append(version)
            return applied

    async def check(self) -> None:
        try:
            async with self._connection() as con:
                version = await con.fetchval(f"SELECT MAX(version) FROM {self.dialect.versions}")
        except StoreMissing:
            version = None
        check_version(self.url, version)

    # --- writes -----------------------------------------------------------------------------

    async def write(self, transitions: Sequence[Transition]) -> None:
        if not transitions:
            return
        # In id order: writers on several hosts lock the rows they share in the same order, so
        # their batches wait for each other instead of deadlocking.
        ordered = sorted(transitions, key=lambda t: t.id)
        params = [t.params() for t in ordered]
        finished = [t.id for t in ordered if t.phase == 2]
        for attempt in range(_CONFLICT_RETRIES):
            try:
                async with self._connection() as con, con.transaction():
                    if not finished:
                        # Only `running` and such: a server crash may lose the last of these
                        # (the task shows its previous state), so they skip the WAL flush.
                        await con.execute("SET LOCAL synchronous_commit = off")
                    await con.executemany(self.dialect.upsert, params)  # one round trip
                    if finished:  # announced at the commit, which is the only WAL flush
                        await con.execute(
                            "SELECT pg_notify($1, id) FROM unnest($2::text[]) AS id",
                            self.dialect.channel,
                            finished,
                        )
                return
            except _CONFLICTS as exc:
                # A claim or a revocation took a row in between: the batch did nothing; again.
                if attempt == _CONFLICT_RETRIES - 1:
                    raise StoreUnavailable(f"store {self.url}: {exc!r}") from exc
                await asyncio.sleep(0.01 * (attempt + 1))

    async def revoke(self, task_id: str, *, terminate: bool) -> None:
        async with self._connection() as con:
            await con.execute(self.dialect.revoke(), task_id, terminate, REVOCATION_HORIZON)
            await con.execute("SELECT pg_notify($1, $2)", self.dialect.channel, task_id)

    async def claim(self, transition: Transition, owner: str) -> Claim:
        d = self.dialect
        async with self._connection() as con:
            claimed = await con.fetchval(
                d.claim(),
                transition.id,
                transition.task,
                transition.version,
                transition.attempt,
                transition.worker,
                owner,
                self.claim_ttl,
            )
            if claimed is not None:
                return Claim(ClaimVerdict.RUN)
            row = await con.fetchrow(d.claim_state(), transition.id)
        return claim_verdict(None if row is None else dict(row), row["now"] if row else 0.0)

    async def renew(self, owners: Sequence[str]) -> None:
        if owners:
            async with self._connection() as con:
                await con.execute(self.dialect.renew(len(owners)), self.claim_ttl, list(owners))

    async def cleanup(self, limit: int) -> int:
        async with self._connection() as con:
            status = await con.execute(self.dialect.cleanup(), limit)
        return int(status.rsplit(" ", 1)[-1])  # "DELETE n"

    @contextlib.asynccontextmanager
    async def transaction(self, task_id: str, owner: str) -> AsyncIterator[Any]:
        async with self._connection() as con, con.transaction():
            yield con
            marked = await con.fetchval(self.dialect.commit_effects(), task_id, owner)
            if marked is None:
                raise StoreError(
                    f"task {task_id}: its claim expired and another worker took it; this "
                    "transaction is rolled back so its writes happen once"
                )

    # --- reads ------------------------------------------------------------------------------

    async def get(self, task_id: str) -> dict[str, Any] | None:
        async with self._connection() as con:
            row = await con.fetchrow(self.dialect.select, task_id)
        return None if row is None else dict(row)

    async def revocations(self, since: float) -> tuple[list[tuple[str, bool]], float]:
        async with self._connection() as con:
            now = await con.fetchval(f"SELECT {self.dialect.now}")
            rows = await con.fetch(self.dialect.revocations, since)
        return [(row["id"], bool(row["terminate"])) for row in rows], float(now)

    async def listing(
        self, *, state: str | None, task: str | None, since: float | None, limit: int
    ) -> list[dict[str, Any]]:
        sql, names = self.dialect.listing(
            state=state is not None, task=task is not None, since=since is not None, limit=limit
        )
        values = {"state": state, "task": task, "since": since}
        async with self._connection() as con:
            rows = await con.fetch(sql, *[values[name] for name in names])
        return [dict(row) for row in rows]

    async def counts(self) -> list[tuple[str | None, int | None, str, int]]:
        async with self._connection() as con:
            rows = await con.fetch(self.dialect.counts)
        return [(r["task"], r["version"], r["state"], r["n"]) for r in rows]

    # --- waiting for a task to finish: LISTEN ------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[_Watch]:
        """Listening before the caller reads the row: no announcement falls in between."""
        await self._listen()
        event = asyncio.Event()
        self._watches.setdefault(task_id, set()).add(event)
        try:
            yield _Watch(event)
        finally:
            events = self._watches.get(task_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._watches[task_id]

    async def _listen(self) -> None:
        async with self._listening:
            if self._listener is not None and not self._listener.is_closed():
                return
            async with self._errors():
                listener = await asyncpg.connect(self._dsn, timeout=self._connect_timeout)
                await listener.add_listener(self.dialect.channel, self._announced)
            listener.add_termination_listener(self._listener_lost)
            self._listener = listener

    def _announced(self, _con: object, _pid: int, _channel: str, payload: object) -> None:
        for event in self._watches.get(str(payload), ()):
            event.set()

    def _listener_lost(self, _con: object) -> None:
        # Announcements may have been missed: every watcher looks again (and reconnects).
        self._listener = None
        for events in self._watches.values():
            for event in events:
                event.set()


class _Watch:
    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()
        self._event.clear()
