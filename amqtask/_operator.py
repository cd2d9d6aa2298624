"""What operators do to work queues and workers besides `status` and `dlq`: purge a work queue,
and see which workers consume each queue (`amqtask purge`, `amqtask workers`).

Who consumes is read from the management HTTP API: `/api/consumers/{vhost}` lists each consumer
with its queue, prefetch and connection, and `/api/connections` when each connection opened. A
worker names its connection after itself (`worker_connection_name`): host, pid, concurrency,
prefetch, pool and start time, readable in the management UI too; consumers of other programs
are listed by their connection's name. The naming and the report are pure; `purge` and the API
calls are the only I/O.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiormq.exceptions

from amqtask import _wallclock
from amqtask._app import App
from amqtask._contract import Contract
from amqtask._exceptions import AmqtaskError
from amqtask._status import Management, ManagementUnavailable
from amqtask._transport import open_connection
from amqtask._urls import vhost_of
from amqtask.routing import due_queue_name

WORKER_MARK = " worker "
_FIELDS = ("host", "pid", "concurrency", "prefetch", "pool", "started")


def worker_connection_name(
    app_name: str, *, concurrency: int, prefetch: int, pool: str, started: datetime | None = None
) -> str:
    """The connection name a worker process announces itself by, e.g.
    `amqtask worker host=web-1 pid=4242 concurrency=10 prefetch=10 pool=thread
    started=2025-01-01T12:00:00+00:00`."""
    when = (started or _wallclock.utc_now()).replace(microsecond=0).isoformat()
    values = (socket.gethostname(), os.getpid(), concurrency, prefetch, pool, when)
    return (
        app_name + WORKER_MARK + " ".join(f"{k}={v}" for k, v in zip(_FIELDS, values, strict=True))
    )


def parse_worker_name(name: str) -> dict[str, Any] | None:
    """The fields of a `worker_connection_name`, or None for a connection of something else."""
    app, sep, rest = name.rpartition(WORKER_MARK)
    if not sep:
        return None
    fields: dict[str, Any] = {}
    for word in rest.split():
        key, eq, value = word.partition("=")
        if not eq or key not in _FIELDS:
            return None
        fields[key] = (
            int(value) if key in ("pid", "concurrency", "prefetch") and value.isdigit() else value
        )
    if "host" not in fields or "pid" not in fields:
        return None
    return {"app": app, **fields}


@dataclass(slots=True)
class WorkerView:
    """One connection consuming the app's queues: a worker process, or another program."""

    connection: str  # its name
    peer: str  # host:port the broker sees
    connected_at: str | None  # ISO 8601, UTC
    worker: dict[str, Any] | None  # parsed from its name; None for another program
    queues: dict[str, int] = field(default_factory=dict)  # queue -> prefetch of its consumer

    def to_dict(self) -> dict[str, Any]:
        fields = self.worker or {}
        return {
            "connection": self.connection,
            "peer": self.peer,
            "connected_at": self.connected_at,
            "amqtask_worker": self.worker is not None,
            **{key: fields.get(key) for key in _FIELDS},
            "queues": dict(sorted(self.queues.items())),
        }


def _millis(value: Any) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return datetime.fromtimestamp(value / 1000, UTC).replace(microsecond=0).isoformat()


def workers_report(
    contracts: Iterable[Contract[Any, Any]],
    consumers: Sequence[Mapping[str, Any]],
    connections: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Per work queue of `contracts` (and its due queue), the workers consuming it; from the
    management API's consumer and connection lists (of the app's vhost)."""
    tasks: dict[str, list[str]] = {}
    for contract in contracts:
        tasks.setdefault(contract.queue, []).append(f"{contract.name} v{contract.version}")
    watched = {queue: work for work in tasks for queue in (work, due_queue_name(work))}
    # A consumer names its connection by address ("10.0.0.7:51234 -> 10.0.0.2:5672"); the
    # connection list has the name the client gave it and when it opened.
    given: dict[str, str] = {}
    opened: dict[str, str | None] = {}
    for connection in connections:
        if not isinstance(connection, Mapping):
            continue
        name = str(connection.get("name"))
        properties = connection.get("client_properties") or {}
        given[name] = str(
            connection.get("user_provided_name") or properties.get("connection_name") or name
        )
        opened[name] = _millis(connection.get("connected_at"))
    views: dict[str, WorkerView] = {}
    for consumer in consumers:
        queue = (consumer.get("queue") or {}).get("name")
        if queue not in watched:
            continue
        details = consumer.get("channel_details") or {}
        address = str(details.get("connection_name") or "?")
        name = given.get(address, address)
        view = views.get(address)
        if view is None:
            peer = f"{details.get('peer_host', '?')}:{details.get('peer_port', '?')}"
            worker = parse_worker_name(name)
            view = views[address] = WorkerView(name, peer, opened.get(address), worker)
        prefetch = consumer.get("prefetch_count")
        view.queues[queue] = prefetch if isinstance(prefetch, int) else -1
    queues = []
    for work, names in sorted(tasks.items()):
        serving = [
            view.to_dict()
            for view in sorted(views.values(), key=lambda v: v.connection)
            if work in view.queues
        ]
        queues.append({"queue": work, "tasks": sorted(names), "workers": serving})
    return {"queues": queues, "workers": [v.to_dict() for v in views.values()]}


def render_workers(report: Mapping[str, Any]) -> str:
    lines = []
    for queue in report["queues"]:
        lines.append(f"{queue['queue']}  ({', '.join(queue['tasks'])})")
        if not queue["workers"]:
            lines.append("    no consumer")
        for w in queue["workers"]:
            prefetch = w["queues"].get(queue["queue"])
            if w["amqtask_worker"]:
                lines.append(
                    f"    {w['host']} pid {w['pid']}  concurrency {w['concurrency']}  "
                    f"prefetch {prefetch}  pool {w['pool']}  started {w['started']}  "
                    f"connected {w['connected_at'] or '?'}  from {w['peer']}"
                )
                lines.extend(_inspected(w))
            else:
                lines.append(
                    f"    {w['connection']!r} (not an amqtask worker)  prefetch {prefetch}  "
                    f"from {w['peer']}"
                )
    count = sum(1 for w in report["workers"] if w["amqtask_worker"])
    lines.append(f"{count} worker process(es)")
    return "\n".join(lines)


def pool_summary(pool: Mapping[str, Any]) -> str:
    """A process pool as a worker answered `inspect` (`amqtask._control.pool_reply`):
    `4/4 alive, 1 busy, recycled 0, crashed 1, killed on time limit 1`."""
    return (
        f"{pool.get('alive')}/{pool.get('size')} alive, {pool.get('busy')} busy, "
        f"recycled {pool.get('recycled')}, crashed {pool.get('crashed')}, "
        f"killed on time limit {pool.get('killed_time_limit')}"
    )


def _inspected(worker: Mapping[str, Any]) -> list[str]:
    """What a worker answered over the control exchange (`amqtask._control`), if it did."""
    if worker.get("in_flight") is None:
        return []
    children = worker.get("pool_children")
    line = f"      in flight {worker['in_flight']}"
    if isinstance(children, Mapping):
        line += f"  children {pool_summary(children)}"
    return [line]


def fetch_workers(app: App, management: Management) -> dict[str, Any]:
    """The workers report from the management API. Raises `ManagementUnavailable`."""
    vhost = quote(vhost_of(app.url), safe="")
    consumers = management.get(f"/consumers/{vhost}") or []
    connections = management.get(f"/vhosts/{vhost}/connections") or []
    if not isinstance(consumers, list) or not isinstance(connections, list):
        raise ManagementUnavailable(
            f"unexpected answer from the management API at {management.base_url}"
        )
    return workers_report(app.contracts, consumers, connections)


async def purge(app: App, contract: Contract[Any, Any]) -> dict[str, int]:
    """Delete the ready messages of `contract`'s work queue and of its due queue (delayed sends
    and retries whose delay is over); returns how many each held. Unacked deliveries (running
    now) are not touched. Raises `AmqtaskError` for a queue that does not exist."""
    connection = await open_connection(app.urls, name="amqtask-purge", timeout=app.connect_timeout)
    purged: dict[str, int] = {}
    async with connection:
        for name in (contract.queue, due_queue_name(contract.queue)):
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise AmqtaskError(
                    f"queue {name!r} does not exist: run `amqtask declare` first"
                ) from None
            result = await asyncio.wait_for(queue.purge(), app.connect_timeout)
            purged[name] = int(result.message_count or 0)
            await channel.close()
    return purged
