"""What the dashboard shows, read by the functions the CLI uses (`amqtask status`, `dlq`,
`schedules`, `workers`, `tasks`, `contracts export`); nothing here talks HTTP.

The status is sampled in the background every `interval` seconds (one AMQP connection for
passive declares, the management API when given) and kept: the overview answers from the latest
sample, never with a broker round trip of its own, so it costs the same with hundreds of queues.
The in and out rates of each task over the last `history` seconds are kept in a ring buffer for
the charts. A broker that cannot be reached is reported in the overview's `error` and tried again
at the next tick; the server keeps serving.

Blocking management API calls (urllib) run in a thread (`asyncio.to_thread`), so the event loop
serving the pages never waits for them.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import Any

import structlog

from amqtask import (
    _cluster,
    _control,
    _dead_letters,
    _evolution,
    _operator,
    _schedule_admin,
    _status,
)
from amqtask import _wallclock as wallclock
from amqtask._app import App
from amqtask._contract import Contract
from amqtask._urls import safe_url
from amqtask.routing import dead_letter_queue_name

log = structlog.get_logger("amqtask.dashboard")

INTERVAL = 2.0  # seconds between status samples
HISTORY = 600.0  # seconds of rates kept for the charts
CLUSTER_EVERY = 5  # samples between two reads of the cluster's nodes and leaders
MANAGEMENT_RETRY = 15  # samples after which a management API that failed is asked again
MAX_PAGE = 200  # dead letters per page at most
MAX_SCAN_WAITERS = 1  # reads of one dead-letter queue that may wait while another runs
INSPECT_TIMEOUT = 1.0  # seconds the workers have to answer `inspect`
SCHEDULES_TIMEOUT = 1.0  # seconds the active scheduler has to answer


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


class NotFound(Exception):
    """A task, schedule or letter the app does not have: answered with 404."""


class Busy(Exception):
    """A dead-letter queue is being read and another read already waits: answered with 429."""


class Unavailable(Exception):
    """The broker, the management API or the store cannot be asked now: answered with 503."""


def _version() -> str | None:
    try:
        return importlib.metadata.version("amqtask")
    except importlib.metadata.PackageNotFoundError:
        return None


class DashboardData:
    """The app's state as the dashboard shows it: sampled status and rates, and reads and
    actions on demand (dead letters, schedules, workers, tasks, contracts)."""

    def __init__(
        self,
        app: App,
        *,
        management: _status.Management | None = None,
        app_path: str | None = None,
        interval: float = INTERVAL,
        history: float = HISTORY,
    ) -> None:
        self.app = app
        self.management = management
        self.app_path = app_path
        self.interval = interval
        self.contracts = sorted(app.contracts, key=lambda c: (c.name, c.version))
        self._sampler = _status.Sampler(app, management, listing=True)
        self._previous: _status.Sample | None = None
        self._overview: dict[str, Any] | None = None
        self._error: str | None = None
        self._sampled_at: float | None = None
        self._cluster: dict[str, Any] = {"available": False, "nodes": [], "balanced": None}
        slots = max(int(history / interval), 1)
        self._times: deque[float] = deque(maxlen=slots)
        self._rates: dict[str, tuple[deque[float | None], deque[float | None]]] = {
            contract.name: (deque(maxlen=slots), deque(maxlen=slots)) for contract in self.contracts
        }
        self._first = asyncio.Event()
        self._ticks = 0
        self._task: asyncio.Task[None] | None = None
        self._connected = False  # the app's own connection, opened for revoke
        self._connect_lock = asyncio.Lock()
        # One reader of a dead-letter queue at a time: letters one scan holds unacked are
        # invisible to another, whose page would skip them.
        self._scans: dict[str, asyncio.Lock] = {}
        self._scan_waiters: dict[str, int] = {}  # by queue: requests waiting for its lock
        self._schedules_lock = asyncio.Lock()
        self._workers_lock = asyncio.Lock()
        self._workers_cache: tuple[float, dict[str, Any]] | None = None
        self._schedules_cache: tuple[float, dict[str, Any]] | None = None

    # --- the background sampler ---------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with suppress(Exception):
            await self._sampler.close()
        if self._connected:
            with suppress(Exception):
                await self.app.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.tick()
            except Exception as exc:  # a bug or a surprise must not stop the sampling for good
                log.exception("dashboard_sampler_failed")
                self._error = f"sampling failed: {' '.join(str(exc).split()) or type(exc).__name__}"
                self._first.set()
            await asyncio.sleep(max(self.interval - (loop.time() - started), 0.1))

    async def tick(self) -> None:
        """Take one sample (and every few, the cluster's nodes); never raises."""
        self._ticks += 1
        if (
            self._sampler.management is None
            and self.management is not None
            and self._ticks % MANAGEMENT_RETRY == 0
        ):
            self._sampler.management = self.management  # it may answer again
        try:
            sample = await asyncio.wait_for(self._sampler.sample(), self.app.connect_timeout + 10.0)
        except Exception as exc:
            await self._failed(exc)
            return
        data = _status.report(self.app.contracts, self.app.names, sample, self._previous)
        self._previous = sample
        now = wallclock.now()
        self._times.append(now)
        by_task = {row["task"]: row for row in data["tasks"]}
        for contract in self.contracts:
            stats = sample.queues.get(contract.queue)
            ins, outs = self._rates[contract.name]
            row = by_task.get(contract.name)
            # The broker's own rates where the management API gives them (smoothed over its
            # statistics interval), else those of two samples.
            rate_in = stats.publish_rate if stats is not None else None
            rate_out = stats.deliver_rate if stats is not None else None
            if rate_in is None and row is not None:
                rate_in = row["rates"]["in"]
            if rate_out is None and row is not None:
                rate_out = row["rates"]["out"]
            ins.append(rate_in)
            outs.append(rate_out)
        if self._sampler.management is not None and (
            self._ticks % CLUSTER_EVERY == 1 or not self._cluster["available"]
        ):
            self._cluster = await self._read_cluster(self._sampler.management)
        elif self._sampler.management is None:
            self._cluster = {"available": False, "nodes": [], "balanced": None}
        self._overview, self._error, self._sampled_at = data, None, now
        self._first.set()

    async def _failed(self, exc: BaseException) -> None:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        self._error = f"broker unreachable: {reason}"
        self._previous = None
        log.warning("dashboard_sample_failed", error=self._error)
        # The connection may be broken: the next tick opens a new one.
        with suppress(Exception):
            await asyncio.wait_for(self._sampler.close(), 2.0)
        self._sampler._connection = None
        now = wallclock.now()
        self._times.append(now)
        for ins, outs in self._rates.values():
            ins.append(None)
            outs.append(None)
        self._first.set()

    async def _read_cluster(self, management: _status.Management) -> dict[str, Any]:
        try:
            nodes, leaders = await asyncio.to_thread(
                lambda: (_cluster.nodes(management), _cluster.all_leaders(management))
            )
        except _status.ManagementUnavailable:
            return {"available": False, "nodes": [], "balanced": None}
        except Exception as exc:  # an answer cut short (IncompleteRead), not JSON, ...
            log.warning("dashboard_cluster_failed", error=repr(exc))
            return {"available": False, "nodes": [], "balanced": None}
        running = [node["name"] for node in nodes if node["running"]]
        return {
            "available": True,
            "nodes": [{**node, "leaders": leaders.get(node["name"], 0)} for node in nodes],
            "balanced": _cluster.balanced([leaders.get(name, 0) for name in running]),
        }

    # --- config, overview, rates --------------------------------------------------------------

    def config(self, *, read_only: bool) -> dict[str, Any]:
        return {
            "app": self.app_path,
            "namespace": self.app.names.namespace,
            "broker": safe_url(self.app.url),
            "management": self.management is not None,
            "read_only": read_only,
            "store": self.app.store is not None,
            "schedules": bool(self.app.schedules),
            "version": _version(),
        }

    async def overview(self) -> tuple[bool, dict[str, Any]]:
        """(ok, the JSON): the latest sample's report; not ok while the broker is unreachable."""
        if not self._first.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), self.app.connect_timeout + 5.0)
        data = dict(self._overview) if self._overview is not None else self._empty()
        data.update(
            generated_at=_iso(wallclock.now()),
            sampled_at=_iso(self._sampled_at),
            error=self._error,
            cluster=self._cluster,
        )
        if self._overview is None and self._error is None:
            data["error"] = "no sample yet"
        return data["error"] is None, data

    def _empty(self) -> dict[str, Any]:
        return {
            "source": None,
            "namespace": self.app.names.namespace,
            "tasks": [],
            "delayed": {"messages": None},
            "no_quorum": [],
            "warnings": [],
            "notes": [],
        }

    def rates(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "t": list(self._times),
            "tasks": {
                name: {"in": list(ins), "out": list(outs)}
                for name, (ins, outs) in self._rates.items()
            },
        }

    # --- dead letters -------------------------------------------------------------------------

    def contract(self, task: str) -> Contract[Any, Any]:
        """The newest version of task `task` (they share a dead-letter queue when they share a
        work queue). Raises `NotFound`."""
        matches = [contract for contract in self.contracts if contract.name == task]
        if not matches:
            raise NotFound(f"no task {task!r} in this app")
        return matches[-1]

    @asynccontextmanager
    async def _scan_lock(self, contract: Contract[Any, Any]) -> AsyncIterator[None]:
        """Hold the queue's scan lock. With a scan running and another already waiting, raises
        `Busy` rather than queueing a third: each waits for a whole scan of the queue."""
        queue = contract.queue
        lock = self._scans.setdefault(queue, asyncio.Lock())
        if lock.locked() and self._scan_waiters.get(queue, 0) >= MAX_SCAN_WAITERS:
            raise Busy(f"the dead letters of {contract.name!r} are being read: try again")
        self._scan_waiters[queue] = self._scan_waiters.get(queue, 0) + 1
        try:
            await lock.acquire()
        finally:
            self._scan_waiters[queue] -= 1
        try:
            yield
        finally:
            lock.release()

    def dead_letter_queues(self) -> dict[str, Any]:
        rows = {row["task"]: row for row in (self._overview or {}).get("tasks", [])}
        seen: dict[str, dict[str, Any]] = {}
        for contract in self.contracts:
            row = rows.get(contract.name)
            seen[contract.name] = {
                "task": contract.name,
                "queue": contract.queue,
                "dead_letter_queue": dead_letter_queue_name(contract.queue),
                "count": None if row is None else row["dead_letters"],
            }
        return {"queues": list(seen.values())}

    async def dead_letters(self, task: str, offset: int, limit: int) -> dict[str, Any]:
        contract = self.contract(task)
        limit = max(1, min(limit, MAX_PAGE))
        offset = max(offset, 0)
        async with self._scan_lock(contract):
            count, page = await _dead_letters.page_dead_letters(
                self.app, contract, offset=offset, limit=limit
            )
        return {
            "task": task,
            "dead_letter_queue": dead_letter_queue_name(contract.queue),
            "count": count,
            "offset": offset,
            "limit": limit,
            # A row's key is its position: two copies of one message id are two rows.
            "letters": [
                {**letter.to_dict(), "position": offset + i} for i, letter in enumerate(page)
            ],
        }

    async def dead_letter(self, task: str, message_id: str) -> dict[str, Any]:
        contract = self.contract(task)
        async with self._scan_lock(contract):
            found = await _dead_letters.find_dead_letter(self.app, contract, message_id)
        if found is None:
            raise NotFound(f"no dead letter {message_id!r} in the dead letters of {task!r}")
        return {"letter": found.to_dict()}

    async def replay(
        self, task: str, ids: list[str] | None, selection: _dead_letters.Selection | None = None
    ) -> dict[str, Any]:
        """As `amqtask dlq replay`: each copy confirmed by the broker before its letter goes.
        All letters, those with a message id in `ids`, or one copy per pair of `selection`."""
        contract = self.contract(task)
        async with self._scan_lock(contract):
            replayed = await _dead_letters.replay(self.app, contract, ids=ids, selection=selection)
            return {"replayed": replayed}

    async def purge(
        self,
        task: str,
        ids: list[str] | None,
        selection: _dead_letters.Selection | None = None,
        *,
        seen: int | None = None,
    ) -> dict[str, Any]:
        """Delete the letters named, or all of them: with `seen`, the count the user confirmed,
        nothing if the queue holds more (`_dead_letters.MoreThanSeen`)."""
        contract = self.contract(task)
        async with self._scan_lock(contract):
            if ids is None and selection is None:
                return {"purged": await _dead_letters.purge(self.app, contract, seen=seen)}
            deleted = await _dead_letters.delete_dead_letters(
                self.app, contract, ids or (), selection=selection
            )
            return {"purged": deleted}

    # --- schedules ----------------------------------------------------------------------------

    async def schedules(self) -> dict[str, Any]:
        if not self.app.schedules:
            return {
                "queue": self.app.names.scheduler_queue,
                "source": None,
                "active": None,
                "last_active": None,
                "schedules": [],
            }
        # Every open page polls: one read at a time, its answer kept for a sampling interval
        # (a read with no scheduler running takes the scheduler queue over for a moment).
        async with self._schedules_lock:
            loop = asyncio.get_running_loop()
            cached = self._schedules_cache
            if cached is not None and loop.time() - cached[0] < self.interval:
                return cached[1]
            listing = await _schedule_admin.read_state(self.app, timeout=SCHEDULES_TIMEOUT)
            data = _schedule_admin.report(self.app, listing, round(wallclock.now() * 1000))
            self._schedules_cache = (loop.time(), data)
            return data

    async def set_paused(self, name: str, paused: bool) -> dict[str, Any]:
        if name not in {item.name for item in self.app.schedules}:
            raise NotFound(f"no schedule {name!r} in this app")
        await _schedule_admin.set_paused(self.app, name, paused)
        self._schedules_cache = None
        return {"name": name, "paused": paused}

    # --- workers ------------------------------------------------------------------------------

    async def workers(self) -> dict[str, Any]:
        """Who consumes the app's queues (the management API, as `amqtask workers`), merged by
        connection name with what the running workers answer to `inspect` (in flight,
        concurrency, pool). Workers that answer but the API does not list (no API) are listed
        from their answer alone."""
        async with self._workers_lock:  # one inspect at a time, kept for an interval
            loop = asyncio.get_running_loop()
            cached = self._workers_cache
            if cached is None or loop.time() - cached[0] >= self.interval:
                cached = (loop.time(), await self._read_workers())
                self._workers_cache = cached
            return cached[1]

    async def _read_workers(self) -> dict[str, Any]:
        listed, inspected = await asyncio.gather(self._listed_workers(), self._inspected_workers())
        report, error = listed
        answers = {answer["name"]: answer for answer in inspected}
        rows = [_worker(view, answers.pop(view["connection"], None)) for view in report]
        rows += [_answered(answer) for answer in answers.values()]
        data: dict[str, Any] = {
            "workers": sorted(rows, key=lambda row: str(row["name"])),
            "available": error is None and self.management is not None,
            "inspected": bool(inspected),
        }
        if error is not None:
            data["error"] = error
        return data

    async def _listed_workers(self) -> tuple[list[dict[str, Any]], str | None]:
        if self.management is None:
            return [], None
        try:
            report = await asyncio.to_thread(_operator.fetch_workers, self.app, self.management)
        except _status.ManagementUnavailable as exc:
            return [], str(exc)
        return list(report["workers"]), None

    async def _inspected_workers(self) -> list[dict[str, Any]]:
        try:
            return await _control.inspect_workers(self.app, timeout=INSPECT_TIMEOUT)
        except Exception as exc:  # the listing from the API stands without it
            log.info("dashboard_inspect_failed", error=repr(exc))
            return []

    # --- tasks (the store) --------------------------------------------------------------------

    async def tasks(
        self,
        *,
        task_id: str | None,
        state: str | None,
        task: str | None,
        since: datetime | None,
        limit: int,
    ) -> dict[str, Any]:
        if self.app.store is None:
            return {"store": False, "tasks": []}
        if task_id:
            info = await self.app.task(task_id)
            infos = [] if info is None else [info]
        else:
            infos = await self.app.tasks(state=state, task=task, since=since, limit=limit)
        return {"store": True, "tasks": [_listed(info.to_dict()) for info in infos]}

    async def task(self, task_id: str) -> dict[str, Any]:
        if self.app.store is None:
            raise NotFound("this app has no task store")
        info = await self.app.task(task_id)
        if info is None:
            raise NotFound(f"the task store knows no task {task_id!r}")
        data = info.to_dict()
        return {"task": data, "timeline": timeline(data)}

    async def revoke(self, task_id: str, *, terminate: bool) -> dict[str, Any]:
        if self.app.store is None:
            raise NotFound("this app has no task store")
        async with self._connect_lock:  # two first revokes at once: one connection, not two
            if not self._connected:
                await self.app.connect()  # the broadcast to running workers publishes
                self._connected = True
        await self.app.revoke(task_id, terminate=terminate)
        return {"id": task_id, "revoked": True}

    # --- contracts ----------------------------------------------------------------------------

    def contracts_export(self) -> dict[str, Any]:
        return _evolution.export(
            self.app.contracts, namespace=self.app.names.namespace, schedules=self.app.schedules
        )


def _worker(view: Mapping[str, Any], answer: Mapping[str, Any] | None) -> dict[str, Any]:
    """A row of `amqtask workers --json`, with the worker's `inspect` answer when it gave one."""
    row = {
        "name": view["connection"],
        "host": view["host"],
        "pid": view["pid"],
        "peer": view["peer"],
        "amqtask_worker": view["amqtask_worker"],
        "queues": sorted(view["queues"]),
        "prefetch": view["prefetch"],
        "pool_type": view["pool"],
        "since": view["started"] or view["connected_at"],
        "connected_at": view["connected_at"],
        "concurrency": view["concurrency"],
        "in_flight": None,
        "running": None,
        "processed": None,
        "pool": None,
    }
    if answer is not None:
        row.update(_from_answer(answer))
    return row


def _answered(answer: Mapping[str, Any]) -> dict[str, Any]:
    """A worker known only by its `inspect` answer (no management API, or not listed yet)."""
    return {
        "name": answer.get("name"),
        "host": answer.get("host"),
        "pid": answer.get("pid"),
        "peer": None,
        "amqtask_worker": True,
        "queues": sorted(answer.get("queues") or []),
        "prefetch": answer.get("prefetch"),
        "pool_type": answer.get("pool_type"),
        "since": answer.get("started_at"),
        "connected_at": None,
        **_from_answer(answer),
    }


def _from_answer(answer: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "concurrency": answer.get("concurrency"),
        "in_flight": answer.get("in_flight"),
        "running": answer.get("running"),
        "processed": answer.get("processed"),
        "pool": answer.get("pool"),
    }


_LISTED = (
    "id",
    "task",
    "version",
    "state",
    "attempts",
    "queued_at",
    "due_at",
    "started_at",
    "finished_at",
    "updated_at",
    "worker",
    "error_type",
    "error",
    "reason",
)


def _listed(data: Mapping[str, Any]) -> dict[str, Any]:
    return {key: data[key] for key in _LISTED}


def timeline(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the store's row tells of a task's life, oldest first: sent (queued, or scheduled
    with a delay), the last start, and where it is now. The store keeps a task's latest state,
    not each attempt: earlier attempts show as `attempts`, not as events."""
    events: list[dict[str, Any]] = []
    if task["queued_at"] is not None:
        sent = "scheduled" if task["due_at"] is not None else "queued"
        events.append({"event": sent, "at": task["queued_at"]})
    if task["started_at"] is not None:
        events.append({"event": "started", "at": task["started_at"]})
    state = task["state"]
    if state in ("retrying", "succeeded", "failed", "revoked"):
        events.append({"event": state, "at": task["finished_at"] or task["updated_at"]})
    return events


def parse_since(text: str) -> datetime:
    """An ISO 8601 time, or a duration back from now (30s, 15m, 1h, 2d, 1w). Raises ValueError."""
    from amqtask.store import parse_duration

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return wallclock.utc_now() - parse_duration(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
