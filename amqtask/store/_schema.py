"""The store's tables and statements, for SQLite and PostgreSQL, and their migrations. No I/O.

One table holds a row per task id. Times are seconds since the epoch (double precision), the
result is JSON text. `amqtask declare` creates and migrates the tables (`MIGRATIONS`, applied in
order, each once; the applied version is kept in a one-row table); an app or a worker checks the
version at connect and refuses to run against tables older or newer than its own.

Revocations are rows too (`revoked_at` set): a revoked task that has not run yet has a row in
state `revoked` before any worker saw it, and every worker loads the revoked ids at start.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtask._exceptions import StoreMissing
from amqtask.store._model import UPSERT_COLUMNS, TaskState

SCHEMA_VERSION = 1

_COLUMNS_V1 = """
    id TEXT PRIMARY KEY,
    task TEXT,
    version INTEGER,
    state TEXT NOT NULL,
    phase INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    queued_at {real},
    due_at {real},
    started_at {real},
    finished_at {real},
    updated_at {real} NOT NULL,
    worker TEXT,
    result TEXT,
    error_type TEXT,
    error TEXT,
    reason TEXT,
    traceback TEXT,
    expires_at {real},
    revoked_at {real},
    terminate BOOLEAN NOT NULL DEFAULT FALSE,
    owner TEXT,
    claim_expires {real},
    committed_at {real}
"""

# Values an UPSERT overwrites only at an attempt's end (phase 2): a `running` keeps the last
# attempt's error visible while the next runs.
_AT_THE_END = ("result", "error_type", "error", "reason", "traceback")


@dataclass(frozen=True, slots=True)
class Dialect:
    """The SQL of one database: names, placeholders, the clock, the statements."""

    name: str  # sqlite or postgres
    schema: str  # PostgreSQL schema; for SQLite a prefix of the table names

    @property
    def tasks(self) -> str:
        return f'"{self.schema}".tasks' if self.name == "postgres" else f"{self.schema}_tasks"

    @property
    def versions(self) -> str:
        if self.name == "postgres":
            return f'"{self.schema}".schema_version'
        return f"{self.schema}_schema_version"

    @property
    def channel(self) -> str:
        """PostgreSQL NOTIFY channel on which finished task ids are announced."""
        return f"{self.schema}_finished"

    def p(self, n: int) -> str:
        """The n-th placeholder (from 1)."""
        return f"${n}" if self.name == "postgres" else "?"

    def ps(self, count: int, start: int = 1) -> str:
        return ", ".join(self.p(n) for n in range(start, start + count))

    @property
    def now(self) -> str:
        """The store's clock in epoch seconds: PostgreSQL's, one for every host; on SQLite (one
        host) the process's wall clock, `amqtask._wallclock` (a function each connection
        registers), which `amqtask.testing` moves with its virtual clock."""
        if self.name == "postgres":
            return "extract(epoch from clock_timestamp())::double precision"
        return "amqtask_now()"

    # --- schema ---------------------------------------------------------------------------

    def migrations(self) -> list[tuple[int, list[str]]]:
        real = "DOUBLE PRECISION" if self.name == "postgres" else "REAL"
        t = self.tasks
        prefix = self.schema
        v1 = [
            f"CREATE TABLE IF NOT EXISTS {t} ({_COLUMNS_V1.format(real=real)})",
            f"CREATE INDEX IF NOT EXISTS {prefix}_tasks_updated ON {t} (updated_at)",
            f"CREATE INDEX IF NOT EXISTS {prefix}_tasks_state ON {t} (state, updated_at)",
            f"CREATE INDEX IF NOT EXISTS {prefix}_tasks_expires ON {t} (expires_at)",
            f"CREATE INDEX IF NOT EXISTS {prefix}_tasks_revoked ON {t} (revoked_at) "
            "WHERE revoked_at IS NOT NULL",
        ]
        return [(1, v1)]

    def create_versions(self) -> list[str]:
        statements = [f"CREATE TABLE IF NOT EXISTS {self.versions} (version INTEGER NOT NULL)"]
        if self.name == "postgres":
            statements.insert(0, f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        return statements

    # --- statements -----------------------------------------------------------------------

    @property
    def upsert(self) -> str:
        """Write one `Transition` (its `params()`): insert, or move the row forward.

        A row moves only to a later `(attempts, phase)`, and a revoked row only to `revoked`;
        a write that comes late (a `queued` after the worker's `running`) still fills in what
        the row lacks (its queue time).
        """
        t = self.tasks
        revoked = TaskState.REVOKED.value
        forward = (
            f"(t.state <> '{revoked}' OR excluded.state = '{revoked}') "
            "AND (t.attempts < excluded.attempts "
            "OR (t.attempts = excluded.attempts AND t.phase <= excluded.phase))"
        )
        moved = {
            "state": "excluded.state",
            "phase": "excluded.phase",
            "attempts": "excluded.attempts",
            "due_at": "COALESCE(excluded.due_at, t.due_at)",
            "started_at": "COALESCE(excluded.started_at, t.started_at)",
            "finished_at": "excluded.finished_at",
            "updated_at": "excluded.updated_at",
            "worker": "COALESCE(excluded.worker, t.worker)",
            # The end of an attempt replaces these; a `running` keeps the last attempt's error
            # visible while the next runs.
            **{
                column: f"CASE WHEN excluded.phase = 2 THEN excluded.{column} ELSE t.{column} END"
                for column in _AT_THE_END
            },
            # A revocation keeps its row until the revoked delivery came (REVOCATION_HORIZON).
            "expires_at": "CASE WHEN t.revoked_at IS NOT NULL AND excluded.expires_at IS NULL "
            "THEN t.expires_at ELSE excluded.expires_at END",
            "owner": "CASE WHEN excluded.phase = 2 THEN NULL ELSE t.owner END",
            "claim_expires": "CASE WHEN excluded.phase = 2 THEN NULL ELSE t.claim_expires END",
        }
        sets = [
            "task = COALESCE(t.task, excluded.task)",
            "version = COALESCE(t.version, excluded.version)",
            "queued_at = COALESCE(t.queued_at, excluded.queued_at)",
            *(
                f"{col} = CASE WHEN {forward} THEN {new} ELSE t.{col} END"
                for col, new in moved.items()
            ),
        ]
        return (
            f"INSERT INTO {t} AS t ({', '.join(UPSERT_COLUMNS)}) "
            f"VALUES ({self.ps(len(UPSERT_COLUMNS))}) "
            f"ON CONFLICT (id) DO UPDATE SET {', '.join(sets)}"
        )

    @property
    def select(self) -> str:
        return f"SELECT * FROM {self.tasks} WHERE id = {self.p(1)}"

    def revoke(self) -> str:
        """Params: id, terminate, horizon (seconds). A task that has not started is revoked at
        once (state `revoked`); a running one only gets `revoked_at` (and `terminate`)."""
        t, p = self.tasks, self.p
        waiting = "('queued', 'scheduled', 'retrying')"
        return (
            f"INSERT INTO {t} AS t (id, state, phase, attempts, updated_at, revoked_at, "
            "terminate, expires_at) "
            f"VALUES ({p(1)}, 'revoked', 2, 0, {self.now}, {self.now}, {p(2)}, "
            f"{self.now} + {p(3)}) "
            "ON CONFLICT (id) DO UPDATE SET revoked_at = excluded.revoked_at, "
            "terminate = excluded.terminate, updated_at = excluded.updated_at, "
            f"state = CASE WHEN t.state IN {waiting} THEN 'revoked' ELSE t.state END, "
            f"phase = CASE WHEN t.state IN {waiting} THEN 2 ELSE t.phase END, "
            f"expires_at = CASE WHEN t.state IN {waiting} THEN excluded.expires_at "
            "ELSE t.expires_at END"
        )

    @property
    def revocations(self) -> str:
        """Params: since (epoch seconds). Revoked ids (and terminate) revoked since then."""
        return (
            f"SELECT id, terminate, revoked_at FROM {self.tasks} "
            f"WHERE revoked_at IS NOT NULL AND revoked_at >= {self.p(1)}"
        )

    def claim(self) -> str:
        """Params: id, task, version, attempt, worker, owner, ttl. Returns a row when claimed.

        Claimable: no row, or a row not succeeded, not revoked, whose effects were not
        committed, and whose claim (if any) has expired.
        """
        t, p, now = self.tasks, self.p, self.now
        return (
            f"INSERT INTO {t} AS t (id, task, version, state, phase, attempts, started_at, "
            "updated_at, worker, owner, claim_expires) "
            f"VALUES ({p(1)}, {p(2)}, {p(3)}, 'running', 1, {p(4)}, {now}, {now}, {p(5)}, "
            f"{p(6)}, {now} + {p(7)}) "
            "ON CONFLICT (id) DO UPDATE SET state = 'running', phase = 1, "
            "attempts = excluded.attempts, started_at = excluded.started_at, "
            "updated_at = excluded.updated_at, worker = excluded.worker, "
            "owner = excluded.owner, claim_expires = excluded.claim_expires, "
            "task = COALESCE(t.task, excluded.task), "
            "version = COALESCE(t.version, excluded.version) "
            "WHERE t.state NOT IN ('succeeded', 'revoked') AND t.committed_at IS NULL "
            f"AND (t.owner IS NULL OR t.claim_expires < {now}) "
            "RETURNING id"
        )

    def claim_state(self) -> str:
        return (
            f"SELECT state, owner, claim_expires, committed_at, {self.now} AS now "
            f"FROM {self.tasks} WHERE id = {self.p(1)}"
        )

    def renew(self, owners: int) -> str:
        """Params: ttl, then `owners` owner ids."""
        if self.name == "postgres":
            where = "owner = ANY($2::text[])"
        else:
            where = f"owner IN ({self.ps(owners)})"
        return f"UPDATE {self.tasks} SET claim_expires = {self.now} + {self.p(1)} WHERE {where}"

    def commit_effects(self) -> str:
        """Params: id, owner. Marks a claimed task's effects committed; no row when the claim
        was lost."""
        return (
            f"UPDATE {self.tasks} SET committed_at = {self.now} "
            f"WHERE id = {self.p(1)} AND owner = {self.p(2)} RETURNING id"
        )

    def cleanup(self) -> str:
        """Params: limit. Deletes that many expired rows at most."""
        t = self.tasks
        return (
            f"DELETE FROM {t} WHERE id IN (SELECT id FROM {t} "
            f"WHERE expires_at < {self.now} LIMIT {self.p(1)})"
        )

    def listing(self, *, state: bool, task: bool, since: bool, limit: int) -> tuple[str, list[str]]:
        """The `amqtask tasks` query: filters in this order (state, task, since), newest first.
        Returns the SQL and which filters it takes, in parameter order."""
        where, names = [], []
        for used, name, clause in (
            (state, "state", "state = {}"),
            (task, "task", "task = {}"),
            (since, "since", "updated_at >= {}"),
        ):
            if used:
                names.append(name)
                where.append(clause.format(self.p(len(names))))
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT * FROM {self.tasks}{condition} ORDER BY updated_at DESC LIMIT {int(limit)}"
        return sql, names

    @property
    def counts(self) -> str:
        return f"SELECT task, version, state, COUNT(*) AS n FROM {self.tasks} GROUP BY 1, 2, 3"


def check_version(url: str, version: int | None) -> None:
    """Raise `StoreMissing` unless `version` (None: no tables) is this amqtask's."""
    if version is None:
        raise StoreMissing(f"store {url} has no amqtask tables: run `amqtask declare APP`")
    if version < SCHEMA_VERSION:
        raise StoreMissing(
            f"store {url} holds tables of schema version {version}, this amqtask needs "
            f"{SCHEMA_VERSION}: run `amqtask declare APP` to migrate them"
        )
    if version > SCHEMA_VERSION:
        raise StoreMissing(
            f"store {url} holds tables of schema version {version}, newer than this amqtask's "
            f"{SCHEMA_VERSION}: upgrade amqtask"
        )
