"""The worker: consume, then for each delivery decode once, run, settle once. At-least-once.

The pipeline a delivery takes (`_process`):
1. `_codec.open_envelope` decodes it into an `Envelope` and never raises: a message that is
   not a task of this worker carries its `problem` (the dead letter's reason).
2. `_run` turns it into an `Outcome` value: refused (not a task), expired (a call nobody awaits),
   or what the handler did, run by the contract's executor (`amqtask._execution`: the event loop
   for `async def`, threads for plain `def`; `amqtask._pool`: child processes), chosen once, at
   construction, with its time limits.
3. `Settler.settle` (`amqtask._settle`) maps the outcome to ack, retry, dead letter, reply or
   release, in one place that cannot raise and has a bound on every wait.

Shutdown before a handler finished leaves its delivery unacked: the broker redelivers it.
A new step (time limits, revocation, a task store) plugs into this pipeline as a step or an
executor, not as another branch that settles on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from amqtask import _codec, _control, _operator, _tracing
from amqtask._app import App, Handler
from amqtask._contract import Calls, Isolation, _check_limits
from amqtask._exceptions import AmqtaskError
from amqtask._execution import (
    Executor,
    Expired,
    Failed,
    LoopExecutor,
    Outcome,
    Refused,
    Rejected,
    ThreadExecutor,
    execute,
)
from amqtask._metrics import WorkerMetrics
from amqtask._pool import ChildPool, Environment, ProcessExecutor, Recycling, import_path
from amqtask._settle import Settled, Settler
from amqtask._transport import IncomingDelivery, Subscription
from amqtask.routing import call_queue_name, due_queue_name

if TYPE_CHECKING:
    from amqtask.store._tracker import Tracker

log = structlog.get_logger("amqtask.worker")

POOLS = ("thread", "process")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How many tasks run at once, how many deliveries are held, how long shutdown waits; where
    handlers run and for how long.

    `pool="thread"` runs `async def` handlers on the event loop and plain `def` in threads;
    `pool="process"` runs every handler in child processes (`concurrency` of them), and so do
    contracts with `isolation="process"` under either pool. `time_limit` and `soft_time_limit`
    (seconds) apply to contracts that set none. `max_tasks_per_child` and `max_memory_per_child`
    (MiB of resident memory, checked after each task) replace a child with a fresh one.

    With `pool="process"` the prefetch defaults to four deliveries per child (Celery's default
    multiplier), and that many tasks may be in flight: those beyond the children wait for the
    next free child, so that a child never waits for the broker.
    """

    concurrency: int = 10
    prefetch: int | None = None  # default: concurrency (4 x concurrency for the process pool)
    shutdown_timeout: float = 30.0
    pool: str = "thread"
    time_limit: float | None = None
    soft_time_limit: float | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.prefetch is not None and self.prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {self.prefetch}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        _check_limits("the worker", self.time_limit, self.soft_time_limit, ValueError)
        if self.max_tasks_per_child is not None and self.max_tasks_per_child < 1:
            raise ValueError(
                f"max_tasks_per_child must be at least 1, got {self.max_tasks_per_child}"
            )
        if self.max_memory_per_child is not None and not self.max_memory_per_child > 0:
            raise ValueError(
                f"max_memory_per_child must be positive (MiB), got {self.max_memory_per_child}"
            )

    @property
    def effective_prefetch(self) -> int:
        if self.prefetch is not None:
            return self.prefetch
        return 4 * self.concurrency if self.pool == "process" else self.concurrency

    @property
    def in_flight(self) -> int:
        """Deliveries taken into handling at once: the concurrency, or for the process pool
        also those waiting for a free child."""
        if self.pool == "process":
            return max(self.concurrency, self.effective_prefetch)
        return self.concurrency


class Worker:
    """Consumes the queues of the app's contracts that have handlers."""

    def __init__(
        self,
        app: App,
        settings: WorkerSettings | None = None,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if not app.handlers:
            raise AmqtaskError("the app has no handlers: register them with @app.handler(...)")
        self.app = app
        self.settings = settings or WorkerSettings()
        self._slots = asyncio.Semaphore(self.settings.in_flight)
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.concurrency, thread_name_prefix="amqtask-handler"
        )
        self._pools: dict[Environment, ChildPool] = {}
        self._executors = {key: self._executor_for(h, metrics) for key, h in app.handlers.items()}
        self._settler = Settler(
            app.transport,
            app.names,
            # A worker never waits without bound: with no app-wide bound, 30 s.
            publish_timeout=app.publish_timeout or 30.0,
        )
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()  # every delivery's task, started or waiting
        self._running: set[asyncio.Task[Any]] = set()  # those whose handler has started
        self._stopping = False
        self._contracts = app.handled
        self.counts: dict[str, int] = defaultdict(int)
        self.metrics = metrics
        self._watch: asyncio.Task[None] | None = None
        self.abandoned = 0  # handlers still running when shutdown gave up on them
        self._tracker: Tracker | None = None  # with a task store (`amqtask.store._tracker`)
        self._logs_info = True  # whether a task_succeeded line is written (set at start)
        self._control = _control.ControlListener(
            app.names.control_exchange, lambda: _control.reply_of(self)
        )

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue this worker consumes: each handled work queue, then its due queue, and
        its call queue when a handled contract has transient calls."""
        return tuple(self._work_queue_of)

    @property
    def _work_queue_of(self) -> dict[str, str]:
        """Each consumed queue and the work queue whose tasks it holds.

        A due queue holds the work queue's delayed sends and retries, a call queue its transient
        calls: they run with the same handlers and are retried, answered and dead-lettered under
        the work queue's name.
        """
        contracts = [handler.contract for handler in self.app.handlers.values()]
        work = dict.fromkeys(contract.queue for contract in contracts)
        calls = {c.queue for c in contracts if c.calls is Calls.TRANSIENT}
        return {
            source: queue
            for queue in work
            for source in (
                queue,
                due_queue_name(queue),
                *((call_queue_name(queue),) if queue in calls else ()),
            )
        }

    async def start(self) -> None:
        """Connect, check the queues exist, and start consuming.

        Raises `TopologyMissing` when `amqtask declare` has not created the queues.
        """
        prefetch = self.settings.effective_prefetch
        self._logs_info = _logs_info()
        self._announce(prefetch)
        try:
            await self.app.connect(queues=self.queues)
            if self.app.store is not None:
                self._tracker = await self._start_tracker()
            for pool in self._pools.values():
                await pool.start()
            await self._control.start(self.app.transport)  # answers `amqtask status`
            for source, queue in self._work_queue_of.items():
                subscription = await self.app.transport.consume(
                    source, self._consumer(queue), prefetch=prefetch
                )
                self._subscriptions.append(subscription)
        except BaseException:
            if self._subscriptions:
                # Consuming had begun (a SIGTERM cancels a start still subscribing to its other
                # queues): handlers already running finish as on any stop, or are abandoned.
                await self.stop()
                raise
            self._executor.shutdown(wait=False)
            await self._close_pools()
            if self._tracker is not None:
                await self._tracker.stop()
            await self._control.stop()
            await self.app.close()
            raise
        if self.metrics is not None:
            self.metrics.prefetch.set(prefetch)
            self._watch = asyncio.create_task(self._watch_connection(self.metrics))
        log.info(
            "worker_started",
            queues=list(self.queues),
            tasks=sorted(f"{name} v{version}" for name, version in self._contracts),
            concurrency=self.settings.concurrency,
            prefetch=prefetch,
            pool=self.settings.pool,
            children=sum(pool.size for pool in self._pools.values()),
        )

    async def _start_tracker(self) -> Tracker:
        """The store step (`amqtask.store._tracker`); waits for no store: raises
        `StoreUnavailable` (retried like a broker that is down) so no revoked task runs."""
        from amqtask.store._tracker import Tracker

        tasks = self.app._tasks
        assert tasks is not None
        tracker = Tracker(tasks.store, tasks.recorder, self.app.names, self.app.transport)
        await tracker.start()
        return tracker

    def _announce(self, prefetch: int) -> None:
        """Name the connection after this worker process (host, pid, settings, start time), so
        `amqtask workers` and the management UI show who consumes each queue."""
        transport = self.app.transport
        base = getattr(transport, "name", None)
        if isinstance(base, str):
            base = base.split(_operator.WORKER_MARK)[0]  # a worker started again on this app
            transport.name = _operator.worker_connection_name(  # type: ignore[attr-defined]
                base,
                concurrency=self.settings.concurrency,
                prefetch=prefetch,
                pool=self.settings.pool,
            )

    def _executor_for(self, handler: Handler, metrics: WorkerMetrics | None) -> Executor:
        """Where a contract's handler runs, with which limits (see the WorkerSettings doc).

        Raises `AmqtaskError` for a hard time limit on a thread, and for a handler that a child
        process could not find by import path.
        """
        contract, settings = handler.contract, self.settings
        hard = contract.time_limit if contract.time_limit is not None else settings.time_limit
        soft = (
            contract.soft_time_limit
            if contract.soft_time_limit is not None
            else settings.soft_time_limit
        )
        if soft is not None and hard is not None and soft >= hard:
            soft = None  # a contract's own hard limit comes first: the worker's soft one is moot
        isolation = contract.isolation
        if isolation is None:
            isolation = Isolation.PROCESS if settings.pool == "process" else Isolation.NONE
        if isolation is Isolation.NONE:
            if handler.is_async:
                return LoopExecutor(soft_time_limit=soft, time_limit=hard)
            if hard is not None:
                raise AmqtaskError(
                    f"task {contract.name!r}: its handler is a plain def, run in a thread, and a "
                    f"thread cannot be stopped at its time limit ({hard:g} s). Run it in a "
                    "process (worker --pool process, or the contract's isolation='process'), "
                    "make it async, or give it only a soft_time_limit"
                )
            return ThreadExecutor(self._executor, soft_time_limit=soft)
        environment = Environment(contract.python or sys.executable, contract.launcher)
        path = handler.path or import_path(handler.func, contract.name)
        pool = self._pools.get(environment)
        if pool is None:
            recycling = Recycling(settings.max_tasks_per_child, settings.max_memory_per_child)
            pool = ChildPool(environment, settings.concurrency, [], recycling, metrics)
            self._pools[environment] = pool
        native = environment.native
        input_model = import_path(contract.input, contract.name, "input model") if native else None
        pool.preload(path, input_model)
        return ProcessExecutor(
            pool,
            path,
            input_model=input_model,
            output=contract.output,
            soft_time_limit=soft,
            time_limit=hard,
        )

    async def _close_pools(self) -> None:
        for pool in self._pools.values():
            await pool.close()

    async def _watch_connection(self, metrics: WorkerMetrics) -> None:
        while True:
            metrics.set_connected(self.app.transport.connected)
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """Stop consuming, let running handlers finish (up to `shutdown_timeout`), and close.

        Handlers still running after the timeout are cancelled and their messages left unacked,
        so the broker redelivers them.
        """
        if self._stopping:
            return
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        for subscription in self._subscriptions:
            await subscription.cancel()
        for pool in self._pools.values():
            pool.drain()  # tasks still waiting for a child never start: left unacked
        running = set(self._running)
        log.info("worker_stopping", in_flight=len(running), timeout=self.settings.shutdown_timeout)
        if running:
            _, pending = await asyncio.wait(running, timeout=self.settings.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                self.abandoned = len(pending)
                log.warning("worker_abandoned_tasks", count=len(pending))
                await asyncio.wait(pending, timeout=1.0)
        for task in self._tasks:
            task.cancel()  # deliveries that never started: they stay unacked
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self._close_pools()  # after the handlers: no child is busy any more
        if self._tracker is not None:
            await self._tracker.stop()
        await self._control.stop()
        await self.app.close()  # writes the store records still queued
        log.info("worker_stopped", **dict(self.counts))

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until `stop` is set, then stop gracefully."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def _consumer(self, queue: str) -> Any:
        async def on_message(delivery: IncomingDelivery) -> None:
            # Our own task, not the client library's delivery task: aiormq cancels those when the
            # connection drops, which would abort a handler halfway. A handler runs to its end;
            # if its channel died meanwhile, the ack fails, is logged, and the broker redelivers.
            task = asyncio.create_task(self._guarded(queue, delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_message

    async def _guarded(self, queue: str, delivery: IncomingDelivery) -> None:
        async with self._slots:
            if self._stopping:
                return  # not started: left unacked, redelivered once our channel closes
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            metrics = self.metrics
            if metrics is not None:
                metrics.received.labels(*_task_labels(delivery)).inc()
                metrics.in_flight.inc()
            try:
                await self._process(queue, delivery)
            finally:
                self._running.discard(task)
                if metrics is not None:
                    metrics.in_flight.dec()

    async def _process(self, queue: str, delivery: IncomingDelivery) -> None:
        """Decode once, run, settle once: every delivery ends acked, retried, dead-lettered,
        answered or released, whatever the message or the handler did."""
        started = time.perf_counter()
        envelope = _codec.open_envelope(delivery, queue, self._contracts)
        if not (_tracing.ENABLED and _tracing.wanted(delivery.headers)):
            outcome = await self._run_guarded(envelope)
            settled = await self._settler.settle(envelope, outcome)
        else:
            with contextlib.ExitStack() as stack:
                span = _enter_span(stack, envelope)
                outcome = await self._run_guarded(envelope)
                settled = await self._settler.settle(envelope, outcome)
                with _bookkeeping(envelope, "trace"):
                    _tracing.settled(
                        span, settled.outcome, settled.details, **_trace_error(outcome)
                    )
        with _bookkeeping(envelope, "record"):
            if self._tracker is not None:
                self._tracker.settled(envelope, outcome, settled)  # recorded, batched
            self._outcome(settled, envelope, started)

    async def _run_guarded(self, envelope: _codec.Envelope) -> Outcome:
        """`_run`, whose own steps (a store, tracing) failing fails the task, never leaves the
        delivery unsettled. Only the worker's cancellation of it passes through."""
        try:
            return await self._run(envelope)
        except Exception as exc:
            log.exception("pipeline_step_failed", message_id=envelope.message_id, error=repr(exc))
            return Failed(exc)

    async def _run(self, envelope: _codec.Envelope) -> Outcome:
        """The envelope's outcome: its problem, an expired call, or what its handler did."""
        if envelope.problem is not None:
            return Refused(envelope.problem)
        if _codec.call_expired(envelope.delivery):
            return Expired()  # the caller has given up: nobody would read the result
        assert envelope.contract is not None
        handler = self.app.handlers[envelope.contract.key]
        executor = self._executors[envelope.contract.key]
        if self._tracker is None:
            return await execute(executor, handler.func, envelope.payload)
        # The store's step: revoked, claimed elsewhere or already done, or run (revocable).
        return await self._tracker.run(
            envelope,
            lambda: execute(executor, handler.func, envelope.payload),
            terminable=not isinstance(executor, ThreadExecutor),
        )

    def _outcome(self, settled: Settled, envelope: _codec.Envelope, started: float) -> None:
        outcome = settled.outcome
        self.counts[outcome] += 1
        seconds = time.perf_counter() - started
        task = envelope.task
        if self.metrics is not None:
            _, version = _task_labels(envelope.delivery)
            reason = settled.details.get("reason")
            self.metrics.outcome(outcome, task, version, seconds, reason)
        if outcome in _INFO_OUTCOMES:
            if not self._logs_info:
                return  # filtered out: build no line
            level = log.info
        else:
            level = log.warning
        level(
            "call_expired" if outcome == "expired" else f"task_{outcome}",
            task=task,
            message_id=envelope.message_id,
            duration_ms=round(seconds * 1000, 3),
            outcome=outcome,
            **settled.details,
        )


_INFO_OUTCOMES = frozenset({"succeeded", "retried", "revoked", "skipped"})


def _logs_info() -> bool:
    """Whether the worker's log writes info events (per-task lines) under the logging
    configuration in force: below that level, a task's outcome costs no line built."""
    enabled = getattr(log, "is_enabled_for", None)
    return True if enabled is None else bool(enabled(logging.INFO))


def _task_labels(delivery: _codec.Delivery) -> tuple[str, str]:
    """The task and version a delivery names, for metric labels (a missing version means 1)."""
    headers = delivery.headers or {}
    task = _codec.header_text(headers.get(_codec.TASK)) or "unknown"
    return task, _codec.header_text(headers.get(_codec.VERSION, 1)) or "unknown"


@contextlib.contextmanager
def _bookkeeping(envelope: _codec.Envelope, what: str) -> Iterator[None]:
    """After the delivery settled: a failure to trace, record or log it is logged, not raised."""
    try:
        yield
    except Exception as exc:
        log.exception(f"{what}_failed", message_id=envelope.message_id, error=repr(exc))


def _enter_span(stack: contextlib.ExitStack, envelope: _codec.Envelope) -> Any:
    """The delivery's process span entered on `stack`, or None if tracing fails to start one."""
    try:
        return stack.enter_context(_tracing.processing(**_trace_fields(envelope)))
    except Exception as exc:
        log.exception("trace_failed", message_id=envelope.message_id, error=repr(exc))
        return None


def _trace_fields(envelope: _codec.Envelope) -> dict[str, Any]:
    """What the process span says of a delivery (see `amqtask._tracing`)."""
    delivery, contract = envelope.delivery, envelope.contract
    return {
        "headers": delivery.headers or {},
        "destination": envelope.queue if contract is None else contract.routing_key,
        "queue": envelope.queue,
        "exchange": getattr(delivery, "exchange", None),
        "routing_key": getattr(delivery, "routing_key", None),
        "message_id": delivery.message_id,
        "correlation_id": delivery.correlation_id if envelope.is_call else None,
        "task": envelope.task,
        "version": None if contract is None else contract.version,
        "attempt": envelope.attempt,
        "body_size": len(delivery.body),
    }


def _trace_error(outcome: Outcome) -> dict[str, Any]:
    """The process span's `error.type` (and exception) for an outcome that is a failure."""
    match outcome:
        case Failed(exc):
            return {"error": _tracing.error_type(exc), "exc": exc}
        case Rejected():
            return {"error": _codec.Reasons.REJECTED}
        case Refused(problem):
            return {"error": problem.reason}
    return {}
