"""What the broker keeps about schedules: records in the namespace's scheduler queue. Pure.

The scheduler queue (`{namespace}.scheduler`) is a log of JSON records:

    snapshot  every schedule's progress and who was active: written at each takeover, and
              whenever the log has grown, after which the records it covers are acked
    advance   the cursors and fired ticks of one round of ticks
    pause     an operator paused or resumed a schedule (`amqtask schedules APP pause NAME`)
    sync      a marker a scheduler sends itself: once it comes back, every record published
              before it has been delivered (the queue is FIFO)
    query     `amqtask schedules` asks the active scheduler for its state (answered, not kept)

Records merge to the same state in any order and any number of times: cursors and fired ticks
by their maximum, pause state by the latest `at`. A record read twice, or a snapshot and the
records it covers read together after a takeover, changes nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

FORMAT = 1  # the records' layout; a scheduler refuses to lead on records of a newer one


@dataclass(slots=True)
class Progress:
    """One schedule's state on the broker.

    `cursor`: every tick due at or before it is handled (fired or given up); None for a schedule
    no scheduler has seen yet. `fired`: the due time of the last tick fired. `paused` is what
    the pause record with the latest `paused_at` said.
    """

    cursor: int | None = None
    fired: int | None = None
    paused: bool = False
    paused_at: int | None = None

    def merge(self, other: Progress) -> None:
        self.advance(other.cursor, other.fired)
        if other.paused_at is not None:
            self.set_paused(other.paused, other.paused_at)

    def advance(self, cursor: int | None = None, fired: int | None = None) -> None:
        if fired is not None:
            self.fired = fired if self.fired is None else max(self.fired, fired)
            cursor = fired if cursor is None else max(cursor, fired)
        if cursor is not None:
            self.cursor = cursor if self.cursor is None else max(self.cursor, cursor)

    def set_paused(self, paused: bool, at: int) -> None:
        """Apply a pause (or resume) made at `at`; the latest one decides, a pause on a tie.

        A resume also moves the cursor to its time: the ticks that fell due while the schedule
        was paused are not fired afterwards, whichever record is read first.
        """
        if not paused:
            self.advance(cursor=at)
        latest = self.paused_at
        if latest is None or at > latest or (at == latest and paused):
            self.paused, self.paused_at = paused, at

    def to_dict(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "fired": self.fired,
            "paused": self.paused,
            "paused_at": self.paused_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Progress:
        return cls(
            cursor=_int(data.get("cursor")),
            fired=_int(data.get("fired")),
            paused=bool(data.get("paused", False)),
            paused_at=_int(data.get("paused_at")),
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """A scheduler process: where it runs, and since when it has been active."""

    host: str
    pid: int
    id: str  # random per process: two processes on one host with a reused pid differ
    since: int | None = None  # when it became active, milliseconds since the epoch

    @classmethod
    def here(cls) -> Identity:
        return cls(socket.gethostname(), os.getpid(), os.urandom(6).hex())

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "id": self.id, "since": self.since}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Identity:
        return cls(str(data["host"]), int(data["pid"]), str(data["id"]), _int(data.get("since")))


@dataclass(frozen=True, slots=True)
class Snapshot:
    schedules: Mapping[str, Progress]
    leader: Identity | None
    at: int


@dataclass(frozen=True, slots=True)
class Advance:
    cursors: Mapping[str, int]
    fired: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Pause:
    schedule: str
    paused: bool
    at: int
    by: str = ""


@dataclass(frozen=True, slots=True)
class Sync:
    id: str


@dataclass(frozen=True, slots=True)
class Query:
    pass


Record = Snapshot | Advance | Pause | Sync | Query


class RecordError(ValueError):
    """A message in the scheduler queue that is not a record this version reads."""


def _int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"expected an integer, got {value!r}")
    return value


def encode(record: Record) -> bytes:
    data: dict[str, Any]
    if isinstance(record, Snapshot):
        data = {
            "kind": "snapshot",
            "at": record.at,
            "leader": None if record.leader is None else record.leader.to_dict(),
            "schedules": {name: p.to_dict() for name, p in sorted(record.schedules.items())},
        }
    elif isinstance(record, Advance):
        data = {"kind": "advance", "cursors": record.cursors, "fired": record.fired}
    elif isinstance(record, Pause):
        data = {
            "kind": "pause",
            "schedule": record.schedule,
            "paused": record.paused,
            "at": record.at,
            "by": record.by,
        }
    elif isinstance(record, Sync):
        data = {"kind": "sync", "id": record.id}
    else:
        data = {"kind": "query"}
    return orjson.dumps({"format": FORMAT, **data})


def decode(body: bytes) -> Record:
    """Read a record. Raises `RecordError` for anything else (another format, junk)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RecordError("not a JSON object")
    if data.get("format") != FORMAT:
        raise RecordError(f"record format {data.get('format')!r}, this version reads {FORMAT}")
    try:
        return _record(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RecordError(f"malformed {data.get('kind')!r} record: {exc!r}") from None


def _record(data: Mapping[str, Any]) -> Record:
    kind = data.get("kind")
    if kind == "snapshot":
        leader = data.get("leader")
        return Snapshot(
            schedules={
                str(name): Progress.from_dict(entry) for name, entry in data["schedules"].items()
            },
            leader=None if leader is None else Identity.from_dict(leader),
            at=int(data["at"]),
        )
    if kind == "advance":
        return Advance(
            cursors={str(k): int(v) for k, v in data["cursors"].items()},
            fired={str(k): int(v) for k, v in data["fired"].items()},
        )
    if kind == "pause":
        return Pause(str(data["schedule"]), bool(data["paused"]), int(data["at"]), str(data["by"]))
    if kind == "sync":
        return Sync(str(data["id"]))
    if kind == "query":
        return Query()
    raise RecordError(f"unknown record kind {kind!r}")


@dataclass(slots=True)
class Ledger:
    """The merged state of every record read: each schedule's progress and the last leader.

    Entries of schedules this app does not have are kept (a rolling deploy may bring them
    back), a few bytes each.
    """

    schedules: dict[str, Progress] = field(default_factory=dict)
    leader: Identity | None = None
    leader_at: int = -1  # `at` of the snapshot that named `leader`

    def of(self, name: str) -> Progress:
        progress = self.schedules.get(name)
        if progress is None:
            progress = self.schedules[name] = Progress()
        return progress

    def apply(self, record: Record) -> set[str]:
        """Merge a record; return the names of the schedules it touched."""
        if isinstance(record, Snapshot):
            for name, progress in record.schedules.items():
                self.of(name).merge(progress)
            if record.leader is not None and record.at > self.leader_at:
                self.leader, self.leader_at = record.leader, record.at
            return set(record.schedules)
        if isinstance(record, Advance):
            for name, cursor in record.cursors.items():
                self.of(name).advance(cursor=cursor)
            for name, fired in record.fired.items():
                self.of(name).advance(fired=fired)
            return {*record.cursors, *record.fired}
        if isinstance(record, Pause):
            self.of(record.schedule).set_paused(record.paused, record.at)
            return {record.schedule}
        return set()

    def snapshot(self, leader: Identity | None, at: int) -> Snapshot:
        """Everything as one record; `leader` None keeps the last one named."""
        if leader is None:
            leader = self.leader
        copies = {name: Progress(**p.to_dict()) for name, p in self.schedules.items()}
        return Snapshot(copies, leader, at)
