"""`amqtask status`: per task, what waits in its queue, who consumes it, what died, what is delayed.

Two sources, one report:

* **AMQP** (always used): a passive `queue.declare` returns whether a queue exists, its
  ready-message count and its consumer count, current to the moment, and nothing more. Unacked
  deliveries and publish/deliver counts are not visible over AMQP: without the management API
  they are reported as unknown (null), never as 0.
* **The management HTTP API** (`GET /api/queues/{vhost}/{name}`, the `rabbitmq_management`
  plugin), when given: adds unacked counts, the messages held in dead-letter hand-over, and the
  broker's publish and deliver counters and rates. The broker refreshes these statistics every
  few seconds (`collect_statistics_interval`, 5 s by default; a new quorum queue may take longer
  to show any), so they lag behind AMQP's counts. Unreachable, it is skipped with a warning.

Delayed messages wait in the namespace's delay levels, shared by all its tasks; their sum is
reported once. Those whose delay is over wait in their work queue's due queue, reported per task.
A quorum queue that dead-letters at least once (work queues, due queues, delay levels) keeps each
message until its target confirmed it: a target that refuses (full) or cannot answer (no leader)
leaves messages in this hand-over, counted in neither ready nor unacked. With `--watch`, rates
come from successive samples: in and out (msgs/s) from the management counters, and the net
change of the backlog from either source.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiormq.exceptions
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection

from amqtask._app import App
from amqtask._contract import Contract
from amqtask._resource import AsyncResource
from amqtask._transport import open_connection
from amqtask._urls import safe_url, vhost_of
from amqtask.routing import DELAY_LEVELS, Names, dead_letter_queue_name, due_queue_name

UNKNOWN_OVER_AMQP = (
    "unacked, dl-pending, in/out rates, and each quorum queue's leader and members online "
    "need the management API (--management-url); over AMQP a queue that lost its quorum looks "
    "empty"
)


class Source(StrEnum):
    AMQP = "amqp"  # passive declares only
    MANAGEMENT = "amqp+management"  # passive declares, plus the management API's numbers


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue as the broker reported it; None where the source cannot tell."""

    name: str
    exists: bool
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None
    published: int | None = None  # cumulative count of messages published into the queue
    delivered: int | None = None  # cumulative deliveries and basic.gets (`deliver_get`)
    publish_rate: float | None = None  # the broker's own rates (msgs/s)
    deliver_rate: float | None = None
    # Dead-lettered at least once but not yet confirmed by the target (quorum queues): neither
    # ready nor unacked, invisible over AMQP.
    dead_letter_pending: int | None = None
    # A quorum queue's replicas in a cluster (management API only): the node leading it (None
    # while it has none), the nodes holding a replica, and those of them running.
    leader: str | None = None
    members: tuple[str, ...] | None = None
    online: tuple[str, ...] | None = None

    @property
    def quorum_lost(self) -> bool | None:
        """Whether a quorum queue lost its quorum: no leader, or fewer than a majority of its
        members online. It then takes no publish and delivers nothing. None if unknown."""
        if self.members is None or self.online is None:
            return None
        majority = len(self.members) // 2 + 1
        return self.leader is None or len(set(self.online) & set(self.members)) < majority

    @property
    def messages(self) -> int | None:
        """Ready plus unacked where both are known, else ready."""
        if self.ready is None:
            return None
        return self.ready + (self.unacked or 0)


@dataclass(frozen=True, slots=True)
class Sample:
    """Every queue status looks at, read at one moment from one source."""

    source: Source
    queues: Mapping[str, QueueStats]
    taken_at: float = field(default_factory=time.monotonic)
    warnings: tuple[str, ...] = ()


# --- what to look at (pure) -------------------------------------------------------------------


def delay_queues(names: Names) -> tuple[str, ...]:
    return tuple(names.delay_level(level) for level in range(DELAY_LEVELS))


def queues_of(contracts: Iterable[Contract[Any, Any]], names: Names) -> tuple[str, ...]:
    """Work queues, their due and dead-letter queues, and the delay levels, each once."""
    wanted: dict[str, None] = {}
    for contract in sorted(contracts, key=lambda c: (c.name, c.version)):
        wanted[contract.queue] = None
        wanted[due_queue_name(contract.queue)] = None
        wanted[dead_letter_queue_name(contract.queue)] = None
    wanted.update(dict.fromkeys(delay_queues(names)))
    return tuple(wanted)


# --- the management API -----------------------------------------------------------------------


class ManagementUnavailable(Exception):
    """The management API could not be asked (unreachable, refused, or not the API)."""


class _Unreachable(ManagementUnavailable):
    """Nothing answered at one management URL."""


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _rate(stats: Mapping[str, Any], key: str) -> float | None:
    details = stats.get(f"{key}_details")
    if isinstance(details, Mapping) and isinstance(details.get("rate"), int | float):
        return float(details["rate"])
    return None


def _dead_letter_pending(payload: Mapping[str, Any]) -> int | None:
    """Messages held in dead-letter hand-over: RabbitMQ 3.10 reports `messages_dlx` for quorum
    queues; otherwise what `messages` holds beyond ready and unacked (0 for a classic queue,
    which dead-letters at once, at most once)."""
    reported = _int(payload.get("messages_dlx"))
    if reported is not None:
        return reported
    total, ready, unacked = (
        _int(payload.get(key)) for key in ("messages", "messages_ready", "messages_unacknowledged")
    )
    if total is None or ready is None or unacked is None:
        return None
    return max(total - ready - unacked, 0)


def parse_management_queue(name: str, payload: Mapping[str, Any]) -> QueueStats:
    """A queue from the management API's JSON (`GET /api/queues/{vhost}/{name}`).

    A queue that never saw traffic has no `message_stats`: its counters are 0.
    """
    stats = payload.get("message_stats")
    stats = stats if isinstance(stats, Mapping) else {}
    quorum = payload.get("type") == "quorum"
    return QueueStats(
        name=name,
        exists=True,
        ready=_int(payload.get("messages_ready")),
        unacked=_int(payload.get("messages_unacknowledged")),
        dead_letter_pending=_dead_letter_pending(payload),
        consumers=_int(payload.get("consumers")),
        published=_int(stats.get("publish", 0)),
        delivered=_int(stats.get("deliver_get", 0)),
        publish_rate=_rate(stats, "publish"),
        deliver_rate=_rate(stats, "deliver_get"),
        leader=_text(payload.get("leader")) if quorum else _text(payload.get("node")),
        members=_names(payload.get("members")) if quorum else None,
        online=_names(payload.get("online")) if quorum else None,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _names(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        return None
    return tuple(item for item in value if isinstance(item, str))


@dataclass(frozen=True, slots=True)
class Management:
    """Where the management API answers and how to log in (from its URL, else the AMQP URL's).

    In a cluster every node's API shows the whole cluster: `fallbacks` are other nodes' APIs,
    asked in turn when one cannot be reached.
    """

    base_url: str  # scheme://host:port[/prefix], without credentials
    username: str
    password: str = field(repr=False)  # never in a repr, a log line or a traceback
    timeout: float = 5.0
    fallbacks: tuple[str, ...] = ()

    @classmethod
    def from_urls(cls, management_url: str, amqp_url: str, timeout: float = 5.0) -> Management:
        """From one management URL, or several separated by `,` or `;` (one per node)."""
        bases: list[str] = []
        credentials: tuple[str | None, str | None] = (None, None)
        for url in (part.strip() for part in re.split(r"[,;]", management_url)):
            if not url:
                continue
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"expected http(s)://[user:pass@]host:port, got {safe_url(url)!r}")
            if not bases:
                credentials = (parts.username, parts.password)
            netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
            bases.append(urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")))
        if not bases:
            raise ValueError("expected http(s)://[user:pass@]host:port, got nothing")
        amqp = urlsplit(amqp_url)
        username = credentials[0] or amqp.username or "guest"
        password = credentials[1] or amqp.password or "guest"
        return cls(bases[0], unquote(username), unquote(password), timeout, tuple(bases[1:]))

    def get(self, path: str) -> Any:
        """GET `path` under /api and parse it; None for a 404. Raises `ManagementUnavailable`."""
        return self._request("GET", path)

    def post(self, path: str) -> None:
        """POST (no body) to `path` under /api. Raises `ManagementUnavailable`."""
        self._request("POST", path)

    def _request(self, method: str, path: str) -> Any:
        unreachable: ManagementUnavailable | None = None
        for base in (self.base_url, *self.fallbacks):
            try:
                return self._ask(base, method, path)
            except _Unreachable as exc:
                unreachable = exc  # another node's API may answer
        assert unreachable is not None
        raise unreachable

    def _ask(self, base: str, method: str, path: str) -> Any:
        request = urllib.request.Request(f"{base}/api{path}", method=method)
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        # A POST answers with no content: RabbitMQ refuses it (406) to a client that accepts
        # JSON only.
        request.add_header("Accept", "application/json" if method == "GET" else "*/*")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise ManagementUnavailable(
                f"the management API at {base} answered HTTP {exc.code} {exc.reason}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Unreachable(f"cannot reach the management API at {base}: {reason}") from None
        if method != "GET":
            return None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ManagementUnavailable(
                f"{base} did not answer with JSON: is it the management API?"
            ) from None

    def queue(self, vhost: str, name: str) -> QueueStats:
        payload = self.get(f"/queues/{quote(vhost, safe='')}/{quote(name, safe='')}")
        if payload is None:
            return QueueStats(name, exists=False)
        if not isinstance(payload, Mapping):
            raise ManagementUnavailable(f"unexpected answer for queue {name!r}: {payload!r}"[:200])
        return parse_management_queue(name, payload)

    def queues(self, vhost: str, names: Sequence[str]) -> dict[str, QueueStats]:
        return {name: self.queue(vhost, name) for name in names}

    def listed_queues(self, vhost: str, names: Sequence[str]) -> dict[str, QueueStats]:
        """`names` from one listing of the vhost's queues (`GET /api/queues/{vhost}`, only the
        columns read here): one request instead of one per queue, for an app of hundreds."""
        columns = ",".join(_LISTED_COLUMNS)
        payload = self.get(f"/queues/{quote(vhost, safe='')}?columns={columns}")
        if payload is None:
            payload = []  # no such vhost: no queue exists
        if not isinstance(payload, list):
            raise ManagementUnavailable(f"unexpected answer for the queues of {vhost!r}")
        found = {
            item["name"]: item
            for item in payload
            if isinstance(item, Mapping) and isinstance(item.get("name"), str)
        }
        return {
            name: parse_management_queue(name, found[name])
            if name in found
            else QueueStats(name, exists=False)
            for name in names
        }


# What `parse_management_queue` reads: a listing asks for these alone.
_LISTED_COLUMNS = (
    "name",
    "type",
    "messages",
    "messages_ready",
    "messages_unacknowledged",
    "messages_dlx",
    "consumers",
    "message_stats",
    "leader",
    "node",
    "members",
    "online",
)


def merge(amqp: QueueStats, management: QueueStats | None) -> QueueStats:
    """AMQP's current existence, ready and consumer counts, with the management API's unacked
    and dead-letter hand-over counts, counters and rates (which lag by the broker's statistics
    interval)."""
    if management is None or not management.exists or not amqp.exists:
        return amqp
    return replace(
        amqp,
        unacked=management.unacked,
        dead_letter_pending=management.dead_letter_pending,
        published=management.published,
        delivered=management.delivered,
        publish_rate=management.publish_rate,
        deliver_rate=management.deliver_rate,
        leader=management.leader,
        members=management.members,
        online=management.online,
    )


# --- AMQP -------------------------------------------------------------------------------------


async def _passive(connection: AbstractConnection, names: Sequence[str]) -> dict[str, QueueStats]:
    """Passive declares: ready count and consumers per queue; a 404 means the queue is missing.

    A 404 closes the channel, so a new one is opened after each missing queue.
    """
    found: dict[str, QueueStats] = {}
    channel: AbstractChannel | None = None
    try:
        for name in names:
            if channel is None or channel.is_closed:
                channel = await connection.channel(publisher_confirms=False)
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                found[name] = QueueStats(name, exists=False)
                channel = None
                continue
            result = queue.declaration_result
            found[name] = QueueStats(
                name,
                exists=True,
                ready=result.message_count or 0,
                consumers=result.consumer_count or 0,
            )
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()
    return found


class Sampler(AsyncResource):
    """Reads the queues status shows over one AMQP connection (opened on first need, kept for
    `--watch`), and from the management API too when given and reachable."""

    def __init__(
        self, app: App, management: Management | None = None, *, listing: bool = False
    ) -> None:
        self.app = app
        self.management = management
        # One listing of the vhost's queues per sample rather than a request per queue.
        self.listing = listing
        self.vhost = vhost_of(app.url)
        self.queues = queues_of(app.contracts, app.names)
        self._connection: AbstractConnection | None = None

    async def sample(self) -> Sample:
        if self._connection is None:
            self._connection = await open_connection(
                self.app.urls, name="amqtask-status", timeout=self.app.connect_timeout
            )
        queues = await _passive(self._connection, self.queues)
        if self.management is None:
            return Sample(Source.AMQP, queues)
        try:
            read = self.management.listed_queues if self.listing else self.management.queues
            extra = await asyncio.to_thread(read, self.vhost, self.queues)
        except ManagementUnavailable as exc:
            # Not asked again: a watch keeps one source, so its rates stay comparable.
            self.management = None
            return Sample(Source.AMQP, queues, warnings=(f"{exc}; falling back to AMQP",))
        merged = {name: merge(stats, extra.get(name)) for name, stats in queues.items()}
        return Sample(Source.MANAGEMENT, merged)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


# --- the report (pure) ------------------------------------------------------------------------


def _per_second(before: int | None, after: int | None, seconds: float) -> float | None:
    if before is None or after is None or seconds <= 0:
        return None
    return round((after - before) / seconds, 2)


def rates(
    previous: QueueStats | None, current: QueueStats, seconds: float | None
) -> dict[str, float | None]:
    """In, out and net (backlog change) rates in msgs/s.

    From two samples `seconds` apart when there is a previous one; else the broker's own rates
    (management only). Over AMQP only the net change can be known.
    """
    if previous is None or seconds is None:
        net = None
        if current.publish_rate is not None and current.deliver_rate is not None:
            net = round(current.publish_rate - current.deliver_rate, 2)
        return {"in": current.publish_rate, "out": current.deliver_rate, "net": net}
    return {
        "in": _per_second(previous.published, current.published, seconds),
        "out": _per_second(previous.delivered, current.delivered, seconds),
        "net": _per_second(previous.messages, current.messages, seconds),
    }


def _pending(queues: Iterable[QueueStats]) -> int | None:
    """Messages held in dead-letter hand-over by the existing `queues`; None if unknown."""
    counts = [queue.dead_letter_pending for queue in queues if queue.exists]
    if not counts or any(count is None for count in counts):
        return None
    return sum(count for count in counts if count is not None)


def report(
    contracts: Iterable[Contract[Any, Any]],
    names: Names,
    sample: Sample,
    previous: Sample | None = None,
) -> dict[str, Any]:
    """The JSON form of `amqtask status`: one row per contract, the delay levels, warnings.

    Unknown numbers are None (null), never 0: over AMQP alone, unacked counts, dead-letter
    hand-over and in/out rates.
    """
    seconds = sample.taken_at - previous.taken_at if previous is not None else None
    rows = []
    for contract in sorted(contracts, key=lambda c: (c.name, c.version)):
        queue = sample.queues.get(contract.queue) or QueueStats(contract.queue, exists=False)
        dead_name = dead_letter_queue_name(contract.queue)
        dead = sample.queues.get(dead_name) or QueueStats(dead_name, exists=False)
        due_name = due_queue_name(contract.queue)
        due = sample.queues.get(due_name) or QueueStats(due_name, exists=False)
        before = previous.queues.get(contract.queue) if previous is not None else None
        rows.append(
            {
                "task": contract.name,
                "version": contract.version,
                "queue": contract.queue,
                "queue_type": contract.queue_type.value,
                "exists": queue.exists,
                "ready": queue.ready,
                "due_queue": due_name,
                # Delayed sends and retries whose delay is over, waiting for a worker.
                "due": due.ready,
                "unacked": queue.unacked,
                "consumers": queue.consumers,
                "dead_letter_queue": dead_name,
                "dead_letters": dead.messages,
                "dead_letter_pending": _pending((queue, due)) if queue.exists else None,
                "rates": rates(before, queue, seconds)
                if queue.exists
                else {"in": None, "out": None, "net": None},
                # In a cluster (management API): who leads the work queue, members online.
                "leader": queue.leader,
                "members": None if queue.members is None else len(queue.members),
                "members_online": None if queue.online is None else len(queue.online),
            }
        )
    levels = [sample.queues.get(name) for name in delay_queues(names)]
    present = [level for level in levels if level is not None and level.exists]
    missing = [
        name
        for name, level in zip(delay_queues(names), levels, strict=True)
        if level is None or not level.exists
    ]
    notes = [UNKNOWN_OVER_AMQP] if sample.source is Source.AMQP else []
    lost = [
        {
            "queue": stats.name,
            "members": len(stats.members or ()),
            "members_online": len(stats.online or ()),
            "leader": stats.leader,
        }
        for name in queues_of(contracts, names)
        if (stats := sample.queues.get(name)) is not None and stats.quorum_lost
    ]
    return {
        "source": sample.source.value,
        "namespace": names.namespace,
        "tasks": rows,
        "delayed": {
            "messages": sum(level.messages or 0 for level in present) if present else None,
            "dead_letter_pending": _pending(present),
            "levels": len(levels),
            "missing_levels": missing,
        },
        # Queues that lost their quorum (management API): they take and deliver nothing.
        "no_quorum": lost,
        "warnings": [*sample.warnings, *_no_quorum_warnings(lost, set(delay_queues(names)))],
        "notes": notes,
        "interval": round(seconds, 3) if seconds is not None else None,
    }


_NO_QUORUM = "NO QUORUM:"


def _no_quorum_warnings(lost: Sequence[Mapping[str, Any]], levels: set[str]) -> list[str]:
    """A line per queue that lost its quorum; the delay levels share one."""
    lines = [no_quorum_warning(queue) for queue in lost if queue["queue"] not in levels]
    lost_levels = [queue["queue"] for queue in lost if queue["queue"] in levels]
    if lost_levels:
        lines.append(
            f"{_NO_QUORUM} {len(lost_levels)} of the {len(levels)} delay levels "
            f"({', '.join(lost_levels[:3])}{', ...' if len(lost_levels) > 3 else ''}) lost their "
            "quorum: delayed sends and retries are refused or time out, and those waiting there "
            "stay until a majority of their nodes is back"
        )
    return lines


def no_quorum_warning(lost: Mapping[str, Any]) -> str:
    """The loud line for a queue that lost its quorum."""
    return (
        f"{_NO_QUORUM} queue {lost['queue']!r} has {lost['members_online']} of its "
        f"{lost['members']} members online"
        + ("" if lost["leader"] is None else f" (last leader {lost['leader']})")
        + ": sends to it are refused or time out and its workers get nothing until a majority of "
        "its nodes is back; its counts read 0"
    )


def _cell(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


_HEADERS = (
    "task",
    "queue",
    "ready",
    "due",
    "unacked",
    "consumers",
    "dead",
    "dl-pending",
    "in/s",
    "out/s",
    "net/s",
    "leader",
    "online",
)


def _placement_cells(row: Mapping[str, Any], *, known: bool) -> tuple[str, str]:
    """The leader and online/members cells: `?` over AMQP, `none` for a quorum queue without
    a leader, `-` for members of a classic queue (one node)."""
    if not known:
        return "?", "?"
    members, online = row["members"], row["members_online"]
    if members is None:
        return row["leader"] or "?", "-"
    return row["leader"] or "none", f"{online}/{members}"


def render(data: Mapping[str, Any]) -> str:
    """`amqtask status` as text: a table, the delay levels, and what could not be known."""
    via = "AMQP and the management API" if data["source"] == Source.MANAGEMENT else "AMQP"
    lines = [f"status of namespace {data['namespace']!r} via {via}"]
    # First: it matters most.
    lines.extend(warning for warning in data["warnings"] if warning.startswith(_NO_QUORUM))
    rows: list[tuple[str, ...]] = []
    missing: list[str] = []
    for row in data["tasks"]:
        subject = f"{row['task']} v{row['version']}"
        if not row["exists"]:
            rows.append((subject, row["queue"], "missing", *[""] * (len(_HEADERS) - 3)))
            missing.append(row["queue"])
            continue
        r = row["rates"]
        rows.append(
            (
                subject,
                row["queue"],
                _cell(row["ready"]),
                _cell(row["due"]),
                _cell(row["unacked"]),
                _cell(row["consumers"]),
                _cell(row["dead_letters"]),
                _cell(row["dead_letter_pending"]),
                "-" if r["in"] is None else _cell(r["in"]),
                "-" if r["out"] is None else _cell(r["out"]),
                "-" if r["net"] is None else _cell(r["net"]),
                *_placement_cells(row, known=data["source"] == Source.MANAGEMENT),
            )
        )
    widths = [max(len(row[i]) for row in (_HEADERS, *rows)) for i in range(len(_HEADERS))]
    for row in (_HEADERS, *rows):
        cells = [
            cell.ljust(width) if index < 2 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    delayed = data["delayed"]
    if delayed["messages"] is None:
        lines.append("delayed: ? (no delay level exists: run amqtask declare)")
    else:
        gaps = len(delayed["missing_levels"])
        lines.append(
            f"delayed: {delayed['messages']} message(s) in the delay levels of "
            f"{data['namespace']!r} (all tasks)"
            + (f"; {gaps} of {delayed['levels']} levels missing" if gaps else "")
        )
        lines.append(
            f"dl-pending in the delay levels: {_cell(delayed['dead_letter_pending'])} "
            "(dead-lettered, not yet taken by the next hop)"
        )
    if missing:
        lines.append(f"missing queue(s): {', '.join(missing)}: run amqtask declare")
    lines.extend(f"? {note}" for note in data["notes"])
    lines.extend(
        f"warning: {warning}"
        for warning in data["warnings"]
        if not warning.startswith(_NO_QUORUM)  # already at the top
    )
    return "\n".join(lines)
