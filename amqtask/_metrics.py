"""Prometheus metrics and a health endpoint for a worker (`amqtask worker --metrics-port`).

Served from a small thread of its own, so a busy or blocked event loop still answers scrapes:

    GET /metrics   Prometheus text format (HEAD too)
    GET /health    200 while the broker connection is up (or lost for less than the grace
                   period), 503 once it has been lost and not restored for longer (HEAD too)

Label values come from fixed sets only: a task name that is none of the app's contracts is
counted as `unknown`, a version no contract has as `unknown`, a dead-letter reason amqtask does
not define as `other`. Anyone who can publish to a work queue can invent task names; a label value
per name would grow the worker's memory and every scrape without bound.

The series of every contract the worker handles exist from the start, at 0, so `rate()` and
`increase()` see its first task (a series born at 1 shows no increase). The registry also holds
the process's own metrics (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
`process_open_fds`, ...), the Python GC's and `python_info`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Collection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase

from amqtask._codec import Reasons

if TYPE_CHECKING:
    from amqtask._app import App

DEFAULT_HEALTH_GRACE = 10.0  # seconds a reconnect may take before the worker reports unhealthy
UNKNOWN_TASK = "unknown"  # the task label of a name that is none of the app's contracts
UNKNOWN_VERSION = "unknown"  # the version label of a version none of them has
OTHER_REASON = "other"  # the reason label of a reason amqtask does not define
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

M = TypeVar("M", bound=MetricWrapperBase)


class BoundedLabels(Generic[M]):
    """A labelled metric whose label values come from fixed sets.

    `labels(*values)` takes one value per label, as prometheus_client's does; a value outside its
    label's set is replaced by that label's fallback, so the metric never has more children than
    the sets allow.
    """

    def __init__(self, metric: M, *allowed: tuple[Collection[str], str]) -> None:
        self.metric = metric
        self._allowed = allowed  # per label: (the values kept, the fallback for the rest)

    def labels(self, *values: str | None) -> M:
        kept = [
            value if value in known else fallback
            for value, (known, fallback) in zip(values, self._allowed, strict=True)
        ]
        return self.metric.labels(*kept)


# Reasons a task of a handled contract can be dead-lettered for: their series exist from the start.
HANDLER_REASONS = (
    Reasons.HANDLER_ERROR,
    Reasons.REJECTED,
    Reasons.TIME_LIMIT,
    Reasons.CRASHED,
    Reasons.INVALID_PAYLOAD,
    Reasons.INVALID_RESULT,
)


def _reasons() -> frozenset[str]:
    """Every reason code amqtask writes to a dead letter's `amqtask-reason` header."""
    return frozenset(
        value
        for name, value in vars(Reasons).items()
        if not name.startswith("_") and isinstance(value, str)
    )


class WorkerMetrics:
    """The worker's counters, histogram and gauges, on a registry of their own.

    Task labels are the names of `app`'s contracts, or `unknown`; version labels their versions,
    or `unknown`; reason labels are amqtask's reason codes, or `other` (see the module's
    docstring). Without `registry`, a registry of its own with the process collectors.
    """

    def __init__(self, app: App, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = r = registry
        task = (frozenset(contract.name for contract in app.contracts), UNKNOWN_TASK)
        version = (frozenset(str(contract.version) for contract in app.contracts), UNKNOWN_VERSION)
        reason = (_reasons(), OTHER_REASON)
        labels = ["task", "version"]
        self.received = BoundedLabels(
            Counter("amqtask_tasks_received", "Deliveries taken", labels, registry=r),
            task,
            version,
        )
        self.succeeded = BoundedLabels(
            Counter("amqtask_tasks_succeeded", "Tasks whose handler returned", labels, registry=r),
            task,
            version,
        )
        self.failed = BoundedLabels(
            Counter(
                "amqtask_tasks_failed",
                "Handler runs that raised (each attempt)",
                labels,
                registry=r,
            ),
            task,
            version,
        )
        self.retried = BoundedLabels(
            Counter(
                "amqtask_tasks_retried",
                "Retries scheduled through the delay levels",
                labels,
                registry=r,
            ),
            task,
            version,
        )
        self.dead_lettered = BoundedLabels(
            Counter(
                "amqtask_tasks_dead_lettered",
                "Messages sent to a dead-letter queue",
                [*labels, "reason"],
                registry=r,
            ),
            task,
            version,
            reason,
        )
        self.duration = BoundedLabels(
            Histogram(
                "amqtask_task_duration_seconds",
                "Handler duration",
                labels,
                registry=r,
                buckets=_DURATION_BUCKETS,
            ),
            task,
            version,
        )
        for contract in app.handled.values():
            pair = (contract.name, str(contract.version))
            for metric in (self.received, self.succeeded, self.failed, self.retried):
                metric.labels(*pair)
            self.duration.labels(*pair)
            for why in HANDLER_REASONS:
                self.dead_lettered.labels(*pair, why)
        self.in_flight = Gauge("amqtask_tasks_in_flight", "Handlers running now", registry=r)
        self.prefetch = Gauge(
            "amqtask_prefetch", "Unacked deliveries allowed per queue", registry=r
        )
        self.connected = Gauge(
            "amqtask_broker_connected", "1 while the broker connection is up", registry=r
        )
        # The process pool (worker --pool process, or contracts with isolation="process").
        # Label values are fixed by amqtask, or the environments of the app's contracts.
        self.pool_children = Gauge(
            "amqtask_pool_children",
            "Child processes alive, per environment (interpreter and launcher)",
            ["environment"],
            registry=r,
        )
        self.pool_recycled = Counter(
            "amqtask_pool_children_recycled",
            "Children replaced after max_tasks_per_child tasks or above max_memory_per_child",
            ["why"],
            registry=r,
        )
        self.pool_crashed = Counter(
            "amqtask_pool_children_crashed",
            "Children that died while running a task (its task failed with reason crashed)",
            registry=r,
        )
        self.pool_killed = Counter(
            "amqtask_pool_children_killed",
            "Children killed mid-task: at a hard time limit, or when shutdown gave up on them",
            ["reason"],
            registry=r,
        )
        self._lost_since: float | None = None

    def outcome(
        self,
        outcome: str,
        task: str | None,
        version: str | None,
        seconds: float,
        reason: str | None,
    ) -> None:
        """Record one delivery's end, as the worker logs it."""
        if outcome == "succeeded":
            self.succeeded.labels(task, version).inc()
            self.duration.labels(task, version).observe(seconds)
        elif outcome == "retried":
            self.failed.labels(task, version).inc()
            self.retried.labels(task, version).inc()
            self.duration.labels(task, version).observe(seconds)
        elif outcome == "failed":
            self.failed.labels(task, version).inc()
            self.dead_lettered.labels(task, version, reason or Reasons.HANDLER_ERROR).inc()
            self.duration.labels(task, version).observe(seconds)
        elif outcome == "rejected":
            self.dead_lettered.labels(task, version, reason or Reasons.REJECTED).inc()

    def set_connected(self, up: bool) -> None:
        self.connected.set(1 if up else 0)
        if up:
            self._lost_since = None
        elif self._lost_since is None:
            self._lost_since = time.monotonic()

    def healthy(self, grace: float = DEFAULT_HEALTH_GRACE) -> bool:
        lost = self._lost_since
        return lost is None or time.monotonic() - lost < grace


DEFAULT_HOST = "0.0.0.0"  # every IPv4 interface: what a scraper in another container reaches


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves /metrics and /health for `metrics` on `host` (every IPv4 interface by default;
    an IPv6 address such as `::` works too). Raises `OSError` when it cannot bind."""

    def __init__(
        self,
        metrics: WorkerMetrics | SchedulerMetrics,
        port: int,
        host: str = DEFAULT_HOST,
        health_grace: float = DEFAULT_HEALTH_GRACE,
    ) -> None:
        handler = _handler(metrics, health_grace)
        server = _Server6 if ":" in host else _Server
        self._server = server((host.strip("[]"), port), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="amqtask-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(
    metrics: WorkerMetrics | SchedulerMetrics, grace: float
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:  # load balancers and uptime checks probe with HEAD
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            path = self.path.split("?")[0]
            if path == "/metrics":
                body = generate_latest(metrics.registry)
                self._reply(200, CONTENT_TYPE_LATEST, body, send_body)
            elif path == "/health":
                ok = metrics.healthy(grace)
                body = b"ok\n" if ok else b"broker lost\n"
                self._reply(200 if ok else 503, "text/plain", body, send_body)
            else:
                self._reply(404, "text/plain", b"try /metrics or /health\n", send_body)

        def _reply(self, status: int, content_type: str, body: bytes, send_body: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes are not worth a log line each

    return Handler


class SchedulerMetrics:
    """A scheduler's counters and gauges: on a registry of its own (`amqtask scheduler
    --metrics-port`), or on a worker's (`amqtask worker --scheduler --metrics-port`).

    Schedule labels are the names of `app`'s schedules, or `unknown`; their series exist from
    the start, at 0.
    """

    def __init__(self, app: App, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = r = registry
        names = frozenset(item.name for item in app.schedules)
        self.fired = BoundedLabels(
            Counter(
                "amqtask_schedule_ticks_fired",
                "Ticks published and confirmed by the broker",
                ["schedule"],
                registry=r,
            ),
            (names, UNKNOWN_TASK),
        )
        self.missed = BoundedLabels(
            Counter(
                "amqtask_schedule_ticks_missed",
                "Ticks given up by the misfire policy (older than the catch-up window)",
                ["schedule"],
                registry=r,
            ),
            (names, UNKNOWN_TASK),
        )
        for name in names:
            self.fired.labels(name)
            self.missed.labels(name)
        self.active = Gauge(
            "amqtask_scheduler_active",
            "1 while this process is the active scheduler of its namespace",
            registry=r,
        )
        self.scheduler_connected = Gauge(
            "amqtask_scheduler_connected",
            "1 while the scheduler's broker connection is up (active or standby)",
            registry=r,
        )
        self._lost_since: float | None = None

    def set_connected(self, up: bool) -> None:
        self.scheduler_connected.set(1 if up else 0)
        if up:
            self._lost_since = None
        elif self._lost_since is None:
            self._lost_since = time.monotonic()

    def healthy(self, grace: float = DEFAULT_HEALTH_GRACE) -> bool:
        lost = self._lost_since
        return lost is None or time.monotonic() - lost < grace
