"""The task store: task state, results, durable revocation and deduplication claims.

Optional: an app without `store=` imports nothing from here. `open_store(url)` picks the
implementation from the URL's scheme (`sqlite:///PATH` for one host, `postgresql://...` for
several) and imports its driver only then. Both implement `Store`; the worker and the app write
through a `Recorder` (group commit) and read through the store directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from amqtask.store._model import (
    DEFAULT_CLAIM_TTL,
    DEFAULT_KEEP_RESULT,
    Claim,
    ClaimVerdict,
    TaskInfo,
    TaskState,
    Transition,
    parse_duration,
    parse_store_url,
)
from amqtask.store._recorder import Recorder

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

__all__ = [
    "DEFAULT_CLAIM_TTL",
    "DEFAULT_KEEP_RESULT",
    "Claim",
    "ClaimVerdict",
    "Recorder",
    "Store",
    "TaskInfo",
    "TaskState",
    "Transition",
    "Watch",
    "open_store",
    "parse_duration",
    "transaction",
]

Row = dict[str, Any]


class Watch(Protocol):
    async def wait(self, timeout: float) -> None:
        """Return once the task may have changed since the watch began or the last `wait`
        returned, or after `timeout` seconds."""
        ...


class Store(Protocol):
    """What amqtask needs of a task store. Every method raises `StoreUnavailable` when the store
    cannot be reached and `StoreMissing` when its tables are absent (run `amqtask declare`)."""

    url: str  # for messages: never with a password
    kind: str  # sqlite or postgres
    claim_ttl: float

    async def open(self) -> None:
        """Connect (lazily: a pool or a file handle). Checks nothing."""
        ...

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]:
        """Create or migrate the tables; return the versions applied now (empty: up to date)."""
        ...

    async def check(self) -> None:
        """Raise `StoreMissing` unless the tables are at this amqtask's version."""
        ...

    async def write(self, transitions: Sequence[Transition]) -> None:
        """Apply transitions in one transaction (see `amqtask.store._model` for the order)."""
        ...

    async def get(self, task_id: str) -> Row | None: ...

    async def revoke(self, task_id: str, *, terminate: bool) -> None: ...

    async def revocations(self, since: float) -> tuple[list[tuple[str, bool]], float]:
        """Ids revoked since `since` (the store's clock) with their `terminate`, and the
        store's time now."""
        ...

    async def claim(self, transition: Transition, owner: str) -> Claim:
        """Claim a task for one run (`transition` is its `running`), for `claim_ttl` seconds."""
        ...

    async def renew(self, owners: Sequence[str]) -> None: ...

    async def cleanup(self, limit: int) -> int:
        """Delete up to `limit` expired records; return how many."""
        ...

    async def listing(
        self, *, state: str | None, task: str | None, since: float | None, limit: int
    ) -> list[Row]: ...

    async def counts(self) -> list[tuple[str | None, int | None, str, int]]:
        """(task, version, state, count) for every task and state."""
        ...

    def watch(self, task_id: str) -> AbstractAsyncContextManager[Watch]:
        """Watch for changes of `task_id`: enter before reading its row, then `wait`."""
        ...

    def transaction(self, task_id: str, owner: str) -> AbstractAsyncContextManager[Any]:
        """A transaction on the store's database that also marks the task's effects committed
        (PostgreSQL only: `StoreError` elsewhere)."""
        ...


def open_store(url: str, **options: Any) -> Store:
    """The store for `url`, not connected yet. Raises `ValueError` for a URL it cannot use.

    `sqlite:///relative/path.db`, `sqlite:////absolute/path.db` or `postgresql://...`; the
    query string takes `claim_ttl` (seconds, default 30) and, for PostgreSQL, `schema` (default
    `amqtask`). PostgreSQL needs the `postgres` extra (asyncpg).
    """
    parsed = parse_store_url(url)
    if parsed.kind == "sqlite":
        from amqtask.store._sqlite import SqliteStore

        return SqliteStore(parsed, **options)
    from amqtask.store._postgres import PostgresStore

    return PostgresStore(parsed, url, **options)


def transaction() -> AbstractAsyncContextManager[Any]:
    """Inside a handler of a `deduplicate=True` task on a PostgreSQL store: a connection in a
    transaction that commits together with the task's "effects done" mark.

    ```python
    async with amqtask.store.transaction() as db:   # an asyncpg connection
        await db.execute("INSERT INTO payments ...")
    ```

    Once it committed, a redelivered copy of the task is acked without running, whatever
    happens to the worker afterwards. If the task's claim was lost meanwhile (it expired and
    another worker took the task), the transaction is rolled back and `StoreError` raised, so
    the writes happen once. Raises `StoreError` outside such a handler.
    """
    from amqtask.store._recorder import current_transaction

    return current_transaction()
