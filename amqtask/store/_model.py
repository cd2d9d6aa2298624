"""What the task store holds, as values: states, transitions, task records. No I/O.

A task's row is written by whoever sees it change: `send` (queued or scheduled), the worker
(running, then retrying, succeeded, failed or revoked) and `revoke`. Writers on several hosts
race, and a worker's write may land before the producer's, so every write carries its place in
the task's life, `(attempt, phase)`, and a row only moves forward: a `queued` that arrives after
`running` changes nothing, and `running` of attempt 2 follows `retrying` of attempt 1.
`revoked` is final: nothing but another `revoked` overwrites it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from amqtask._contract import DEFAULT_KEEP_RESULT as DEFAULT_KEEP_RESULT

DEFAULT_CLAIM_TTL = 30.0  # seconds a deduplication claim lives unless renewed
# A revocation of a task that has not run yet waits for its delivery at most this long: longer
# than the longest delay (12 days), so a revoked delayed task is still refused when it comes due.
REVOCATION_HORIZON = 30 * 86_400.0


class TaskState(StrEnum):
    """Where a task is in its life, as the store records it."""

    QUEUED = "queued"  # sent, waiting in its work queue
    SCHEDULED = "scheduled"  # sent with a delay, waiting in the delay levels
    RUNNING = "running"  # a worker runs its handler
    RETRYING = "retrying"  # an attempt failed; the next waits in the delay levels
    SUCCEEDED = "succeeded"  # the handler returned (the result is kept)
    FAILED = "failed"  # dead-lettered, with the reason
    REVOKED = "revoked"  # acked without running, or stopped by `revoke(terminate=True)`

    @property
    def phase(self) -> int:
        """0 before a run, 1 running, 2 an attempt's end: the order within one attempt."""
        return _PHASES[self]

    @property
    def final(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.REVOKED)


_PHASES = {
    TaskState.QUEUED: 0,
    TaskState.SCHEDULED: 0,
    TaskState.RUNNING: 1,
    TaskState.RETRYING: 2,
    TaskState.SUCCEEDED: 2,
    TaskState.FAILED: 2,
    TaskState.REVOKED: 2,
}


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of one task, as written to the store.

    `at` is seconds since the epoch on the writer's clock; `keep` (seconds) how long the record
    outlives a final state. `result` is the handler's result as JSON text.
    """

    id: str
    task: str | None
    version: int | None
    state: TaskState
    attempt: int  # 0 before the first run
    at: float
    worker: str | None = None
    due_at: float | None = None  # when a scheduled task reaches its queue
    result: str | None = None
    error_type: str | None = None
    error: str | None = None
    reason: str | None = None
    traceback: str | None = None
    keep: float = DEFAULT_KEEP_RESULT
    started_at: float | None = None  # a final write whose run began in the same batch

    @property
    def phase(self) -> int:
        return self.state.phase

    @property
    def rank(self) -> tuple[int, int]:
        return (self.attempt, self.phase)

    @property
    def expires_at(self) -> float | None:
        return self.at + self.keep if self.state.final else None

    def params(self) -> tuple[Any, ...]:
        """The values of `UPSERT_COLUMNS`, in order."""
        started = self.at if self.state is TaskState.RUNNING else self.started_at
        finished = self.at if self.phase == 2 else None
        queued = self.at if self.phase == 0 else None
        return (
            self.id,
            self.task,
            self.version,
            self.state.value,
            self.phase,
            self.attempt,
            queued,
            self.due_at,
            started,
            finished,
            self.at,
            self.worker,
            self.result,
            self.error_type,
            self.error,
            self.reason,
            self.traceback,
            self.expires_at,
        )


UPSERT_COLUMNS = (
    "id",
    "task",
    "version",
    "state",
    "phase",
    "attempts",
    "queued_at",
    "due_at",
    "started_at",
    "finished_at",
    "updated_at",
    "worker",
    "result",
    "error_type",
    "error",
    "reason",
    "traceback",
    "expires_at",
)


def coalesce(transitions: Iterable[Transition]) -> list[Transition]:
    """One transition per task id, in first-seen order: the furthest along of each id's.

    A batch holding `running` then `succeeded` of one task writes one row change; the final
    write then carries the folded `running`'s time as its `started_at`.
    """
    kept: dict[str, Transition] = {}
    started: dict[str, float] = {}
    for transition in transitions:
        if transition.state is TaskState.RUNNING:
            started[transition.id] = transition.at
        previous = kept.get(transition.id)
        if previous is None or _moves_forward(previous, transition):
            kept[transition.id] = transition
    return [
        # The final write of a run that started in this batch carries its start time along.
        replace(t, started_at=started[t.id]) if t.id in started and t.phase == 2 else t
        for t in kept.values()
    ]


def _moves_forward(old: Transition, new: Transition) -> bool:
    if old.state is TaskState.REVOKED:
        return new.state is TaskState.REVOKED
    return new.rank >= old.rank


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task as the store knows it.

    `result` is the handler's result, validated into the contract's output model when the app
    knows the task (else the decoded JSON); None until it succeeded. `error_type`, `error` and
    `reason` say why the last attempt failed (`reason`: the dead letter's, for a failed task).
    `revoke_requested` is set once `revoke` was called, whatever state the task was in then.
    """

    id: str
    task: str | None
    version: int | None
    state: TaskState
    attempts: int
    queued_at: datetime | None = None
    due_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    worker: str | None = None
    error_type: str | None = None
    error: str | None = None
    reason: str | None = None
    traceback: str | None = None
    result: Any = None
    result_json: str | None = None
    revoke_requested: bool = False
    expires_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskInfo:
        """From a row of the tasks table (times as epoch seconds); `result` stays the JSON."""
        return cls(
            id=row["id"],
            task=row["task"],
            version=row["version"],
            state=TaskState(row["state"]),
            attempts=row["attempts"],
            queued_at=_time(row["queued_at"]),
            due_at=_time(row["due_at"]),
            started_at=_time(row["started_at"]),
            finished_at=_time(row["finished_at"]),
            updated_at=_time(row["updated_at"]),
            worker=row["worker"],
            error_type=row["error_type"],
            error=row["error"],
            reason=row["reason"],
            traceback=row["traceback"],
            result_json=row["result"],
            revoke_requested=row["revoked_at"] is not None,
            expires_at=_time(row["expires_at"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601, the result as decoded JSON."""
        import orjson

        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "id": self.id,
            "task": self.task,
            "version": self.version,
            "state": self.state.value,
            "attempts": self.attempts,
            "queued_at": iso(self.queued_at),
            "due_at": iso(self.due_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "updated_at": iso(self.updated_at),
            "worker": self.worker,
            "error_type": self.error_type,
            "error": self.error,
            "reason": self.reason,
            "traceback": self.traceback,
            "result": None if self.result_json is None else orjson.loads(self.result_json),
            "revoke_requested": self.revoke_requested,
            "expires_at": iso(self.expires_at),
        }


class ClaimVerdict(StrEnum):
    """What a worker may do with a task of a `deduplicate=True` contract."""

    RUN = "run"  # claimed: run it
    DONE = "done"  # it succeeded already: ack without running
    COMMITTED = "committed"  # a run committed its effects (`transaction()`), then ended unseen
    REVOKED = "revoked"  # ack without running
    BUSY = "busy"  # another run holds a live claim: wait for it


@dataclass(frozen=True, slots=True)
class Claim:
    verdict: ClaimVerdict
    expires_at: float | None = None  # a BUSY claim's expiry (epoch seconds)


def claim_verdict(row: Mapping[str, Any] | None, now: float) -> Claim:
    """Why a claim was refused, from the task's row (read after the refusal)."""
    if row is None:
        return Claim(ClaimVerdict.BUSY)  # deleted in between: try again
    if row["state"] == TaskState.SUCCEEDED:
        return Claim(ClaimVerdict.DONE)
    if row["committed_at"] is not None:
        return Claim(ClaimVerdict.COMMITTED)
    if row["state"] == TaskState.REVOKED:
        return Claim(ClaimVerdict.REVOKED)
    expires = row["claim_expires"]
    if row["owner"] is not None and expires is not None and expires >= now:
        return Claim(ClaimVerdict.BUSY, expires)
    return Claim(ClaimVerdict.BUSY)  # expired meanwhile: the next try claims it


# --- store URLs -------------------------------------------------------------------------------

SCHEMES = {"sqlite": "sqlite", "postgresql": "postgres", "postgres": "postgres"}
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A store URL read: its kind, where, and amqtask's own options (from the query string).

    `sqlite:///var/lib/app/tasks.db` (three slashes and a relative path, four for an absolute
    one read as `sqlite:////abs/path`; also `sqlite:///:memory:`), or
    `postgresql://user@host:5432/db?schema=amqtask&claim_ttl=30`. `schema` (PostgreSQL: the
    schema holding amqtask's tables, default `amqtask`) and `claim_ttl` (seconds) are amqtask's;
    other query parameters go to the driver.
    """

    kind: str
    target: str  # a file path (sqlite) or the URL the driver gets (postgres)
    schema: str = "amqtask"
    claim_ttl: float = DEFAULT_CLAIM_TTL
    options: dict[str, str] = field(default_factory=dict)


def parse_store_url(url: str) -> StoreURL:
    """Read a store URL. Raises `ValueError` naming what is wrong (never the password)."""
    parts = urlsplit(url)
    kind = SCHEMES.get(parts.scheme.lower())
    if kind is None:
        raise ValueError(
            f"unsupported store URL scheme {parts.scheme!r}: use sqlite:///PATH or "
            "postgresql://USER@HOST/DATABASE"
        )
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    schema = query.pop("schema", "amqtask")
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"store schema must be a lower-case SQL identifier, got {schema!r}")
    try:
        claim_ttl = float(query.pop("claim_ttl", DEFAULT_CLAIM_TTL))
    except ValueError:
        raise ValueError("store option claim_ttl must be a number of seconds") from None
    if not claim_ttl > 0:
        raise ValueError(f"store option claim_ttl must be positive, got {claim_ttl}")
    if kind == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path:
            raise ValueError(f"expected sqlite:///PATH (three slashes), got {url!r}")
        return StoreURL(kind, path, schema, claim_ttl, query)
    target = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), ""))
    return StoreURL(kind, target, schema, claim_ttl, query)


# --- durations for `amqtask tasks --since` ----------------------------------------------------

_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>s|m|h|d|w)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `1h`, `2d`, `1w`, or combined (`1h30m`). Raises `ValueError`."""
    text = text.strip().lower()
    total, end = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != end:
            break
        total += float(match["n"]) * _UNITS[match["unit"]]
        end = match.end()
    if not text or end != len(text):
        raise ValueError(f"expected a duration such as 30s, 15m, 1h or 2d, got {text!r}")
    return timedelta(seconds=total)
