"""`TestApp`: the same apps, contracts and handlers on an in-memory broker with a virtual clock.

Only the transport is swapped: sends and calls are encoded and decoded as on the wire, the real
`Worker` consumes, runs the handlers and settles every outcome, and the broker acts on the
topology the contracts derive (TTLs, dead-letter routing, length limits, delivery limits). What
amqtask does on the broker (retries through the delay levels, dead letters, replies) therefore
happens here as it does there, only at the speed of the clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

from amqtask import _codec, _schedule_admin, _wallclock
from amqtask._app import App, Handler
from amqtask._contract import Contract
from amqtask._dead_letters import last_death_reason
from amqtask._exceptions import PublishError, PublishInterrupted
from amqtask._scheduler import Scheduler
from amqtask._worker import Worker, WorkerSettings
from amqtask.routing import dead_letter_queue_name, due_queue_name
from amqtask.rpc import Caller
from amqtask.testing._broker import MemoryBroker
from amqtask.testing._clock import VirtualClock, seconds_of
from amqtask.testing._messages import CURRENT_DELIVERY, Crash, MemoryDelivery, Message
from amqtask.testing._messages import Stage as _Stage
from amqtask.testing._transport import MemoryTransport

DEFAULT_WORKER = WorkerSettings(concurrency=10, shutdown_timeout=2.0)
_QUIET_TURNS = 5  # loop turns without a change before the system counts as settled
_SCHEDULER_SLEEP = 3600.0  # seconds a scheduler sleeps at most with no tick due (see below)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message in a dead-letter queue, with why it is there."""

    message: Message
    reason: str | None  # `amqtask-reason`, else the broker's (expired, maxlen, delivery_limit...)
    error: str | None
    error_type: str | None
    attempt: int | None
    task: str | None

    @classmethod
    def of(cls, message: Message) -> DeadLetter:
        headers = message.headers
        return cls(
            message=message,
            reason=last_death_reason(headers),
            error=_codec.header_text(headers.get(_codec.ERROR)),
            error_type=_codec.header_text(headers.get(_codec.ERROR_TYPE)),
            attempt=_codec.header_int(headers.get(_codec.ATTEMPT)),
            task=_codec.header_text(headers.get(_codec.TASK)),
        )

    @property
    def message_id(self) -> str | None:
        return self.message.message_id

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.message.headers

    @property
    def body(self) -> bytes:
        return self.message.body


@dataclass(slots=True)
class _Installed:
    transport: Any
    caller: Caller
    handlers: dict[tuple[str, int], Handler]
    store_interval: float | None  # the store's batching interval, restored on exit


class TestApp:
    """Run `apps` on one in-memory broker, with a worker for each app that has handlers.

    ```
    async with TestApp(app) as t:
        task_id = await app.send(resize, Resize(path="a.png", width=64))
        await t.advance(minutes=30)   # delays, retries and TTLs fall due on the virtual clock
        assert t.attempts(task_id) == 5
    ```

    On entering, each app's transport is replaced by a `MemoryTransport` (restored on exit), its
    topology declared (unless `declare=False`) and a `Worker` started with `worker` settings for
    each app with handlers (unless `workers=False`); apps without handlers are connected. Each
    app with schedules gets a started `Scheduler` (unless `schedulers=False`), active once
    entered, which fires them on the virtual clock. The virtual clock (`clock`) is installed on
    the running event loop. `drain_timeout` bounds, in real seconds, how long `drain` and
    `advance` wait for handlers.
    """

    __test__ = False  # not a test class, whatever pytest makes of its name

    def __init__(
        self,
        *apps: App,
        worker: WorkerSettings = DEFAULT_WORKER,
        workers: bool = True,
        schedulers: bool = True,
        declare: bool = True,
        drain_timeout: float = 10.0,
    ) -> None:
        if not apps:
            raise ValueError("TestApp needs at least one app")
        self.apps = apps
        self.broker = MemoryBroker()
        self.workers: list[Worker] = []
        self.schedulers: list[Scheduler] = []
        self.drain_timeout = drain_timeout
        self._settings = worker
        self._start_workers = workers
        self._start_schedulers = schedulers
        self._declare = declare
        self._clock: VirtualClock | None = None
        self._installed: dict[int, _Installed] = {}
        self._wallclock: Any = None
        self._runs_lock = threading.Lock()
        self._threads = 0  # calls running in threads now (see `_count_threads`)
        self._counting: tuple[asyncio.AbstractEventLoop, Any] | None = None  # loop, replaced

    @property
    def clock(self) -> VirtualClock:
        """The virtual clock (available once entered)."""
        if self._clock is None:
            raise RuntimeError("the clock runs once the TestApp is entered: `async with TestApp`")
        return self._clock

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        clock = self._clock = VirtualClock.of()
        self._count_threads(asyncio.get_running_loop())
        self._wallclock = _wallclock.set_source(clock.now)
        clock.settle = clock.finish = self._quiesce
        try:
            for app in self.apps:
                self._install(app)
            if self._declare:
                for app in self.apps:
                    await app.declare()
            for app in self.apps:
                if self._start_workers and app.handlers:
                    worker = Worker(app, self._settings)
                    await worker.start()
                    self.workers.append(worker)
                else:
                    await app.connect()
            for app in self.apps:
                if self._start_schedulers and app.schedules:
                    await self.start_scheduler(app)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            for scheduler in self.schedulers:
                await scheduler.stop()
            for worker in self.workers:
                await worker.stop()  # which closes its app
            for app in self.apps:
                await app.close()
        finally:
            self.schedulers.clear()
            self.workers.clear()
            for app in self.apps:
                self._uninstall(app)
            self.broker.close()
            self._uncount_threads()
            if self._wallclock is not None:
                _wallclock.set_source(self._wallclock)
                self._wallclock = None
            if self._clock is not None:
                self._clock.settle = self._clock.finish = _settled

    def _install(self, app: App) -> None:
        if isinstance(app.transport, MemoryTransport):
            raise RuntimeError(f"app {app!r} already runs in memory (one TestApp at a time)")
        tasks = app._tasks
        self._installed[id(app)] = _Installed(
            app.transport,
            app._caller,
            app.handlers,
            None if tasks is None else tasks.recorder.interval,
        )
        transport = MemoryTransport(self.broker)
        app.transport = transport
        app._caller = Caller(transport, app.names.task_exchange)
        if tasks is not None:
            tasks._transport = transport  # revocations are broadcast on the in-memory broker
            # Records are written at once rather than gathered for 2 ms, so that `drain` and
            # `advance` can wait until the store holds what happened.
            tasks.recorder.interval = 0.0
        app.handlers = {key: self._wrap(handler) for key, handler in app.handlers.items()}

    def _uninstall(self, app: App) -> None:
        installed = self._installed.pop(id(app), None)
        if installed is not None:
            app.transport = installed.transport
            app._caller = installed.caller
            app.handlers = installed.handlers
            if app._tasks is not None and installed.store_interval is not None:
                app._tasks._transport = installed.transport
                app._tasks.recorder.interval = installed.store_interval

    async def start_scheduler(self, app: App | None = None) -> Scheduler:
        """Start a scheduler replica of `app` (default: the first app with schedules) on the
        in-memory broker, stopped on exit. It becomes the active one when no other is (it is
        once this returns), else it stands by and takes over when the active one stops:
        `await t.schedulers[0].stop()`, time passing, then a replica shows the misfire policy.

        Raises `ScheduleError` for an app without schedules.
        """
        if app is None:
            app = next((a for a in self.apps if a.schedules), self.apps[0])
        scheduler = Scheduler(app)
        # The virtual wall clock never steps, so nothing is gained by looking at it every
        # second; ticks, pauses and queries wake the scheduler anyway.
        scheduler.max_sleep = _SCHEDULER_SLEEP
        self.schedulers.append(scheduler)
        await scheduler.start()
        await self._quiesce()  # it has taken over, or stands by
        return scheduler

    async def pause(self, schedule: str) -> None:
        """Pause `schedule` as `amqtask schedules APP pause NAME` does: a record on the scheduler
        queue, applied by the active scheduler and kept for any that takes over. Raises
        `ScheduleError` for a name no app has."""
        await _schedule_admin.set_paused(self._scheduling(schedule), schedule, True)

    async def resume(self, schedule: str) -> None:
        """Resume `schedule` (`amqtask schedules APP resume NAME`): it fires again from its next
        due time; the ticks due while it was paused never fire."""
        await _schedule_admin.set_paused(self._scheduling(schedule), schedule, False)

    async def schedules(self, app: App | None = None) -> list[dict[str, Any]]:
        """One row per schedule of `app` (default: the first app with schedules), as `amqtask
        schedules APP --json` lists them: `next_due`, `last_fired`, `last_message_id`,
        `paused`, ..., read from the active scheduler (or off the scheduler queue)."""
        if app is None:
            app = next((a for a in self.apps if a.schedules), self.apps[0])
        listing = await _schedule_admin.read_state(app)
        return _schedule_admin.rows(app, listing, round(self.clock.now() * 1000))

    def _scheduling(self, schedule: str) -> App:
        for app in self.apps:
            if any(item.name == schedule for item in app.schedules):
                return app
        return self.apps[0]  # set_paused names the schedules it knows

    # --- handlers: counting runs, crashing on demand ----------------------------------------

    def _wrap(self, handler: Handler) -> Handler:
        """`handler` reporting to the broker when it runs, and dying when a crash is armed."""
        func, broker = handler.func, self.broker
        if self._in_child_process(handler):
            return handler  # the worker imports it by path in a child: it stays as it is
        if handler.is_async:

            async def on_loop(payload: Any) -> Any:
                delivery = CURRENT_DELIVERY.get()
                if delivery is None:
                    return await _awaited(func(payload))
                self._started(delivery, _Stage.ON_LOOP)
                try:
                    if delivery.crash is not None and delivery.crash.before_handler:
                        await _die(broker, delivery)
                    result = await _awaited(func(payload))
                    if delivery.crash is not None:
                        await _die(broker, delivery)
                    return result
                finally:
                    delivery.stage = _Stage.SETTLING

            return dataclasses.replace(handler, func=on_loop)
        loop = asyncio.get_running_loop()

        def in_thread(payload: Any) -> Any:
            delivery = CURRENT_DELIVERY.get()
            if delivery is None:
                return func(payload)
            self._started(delivery, _Stage.IN_THREAD)
            try:
                if delivery.crash is not None and delivery.crash.before_handler:
                    loop.call_soon_threadsafe(broker.crash, delivery)
                    return None
                result = func(payload)
                if delivery.crash is not None:
                    loop.call_soon_threadsafe(broker.crash, delivery)
                return result
            finally:
                delivery.stage = _Stage.SETTLING

        return dataclasses.replace(handler, func=in_thread)

    def _in_child_process(self, handler: Handler) -> bool:
        """Whether the worker runs `handler` in a child process (`isolation="process"`)."""
        isolation = getattr(handler.contract, "isolation", None)
        if isolation is None:
            return getattr(self._settings, "pool", "thread") == "process"
        return str(isolation) == "process"

    def _started(self, delivery: MemoryDelivery, stage: _Stage) -> None:
        delivery.stage = stage
        with self._runs_lock:
            self.broker.runs[delivery.message_id or ""] += 1
        if stage is _Stage.ON_LOOP:
            self.broker.activity += 1

    # --- time -------------------------------------------------------------------------------

    async def drain(self, *, timeout: float | None = None) -> None:
        """Run until nothing is ready: every delivered task has finished and been settled.

        The clock does not jump (it runs with real time): what waits on it (a delay, a retry's
        backoff, a TTL) stays waiting, and a handler that sleeps is waited for in real time.
        Raises `TimeoutError` when tasks are still running after `timeout` real seconds
        (default: the TestApp's `drain_timeout`).
        """
        limit = self.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            await self._quiesce(deadline)
            if not self._in_flight():
                return
            if time.monotonic() > deadline:
                running = ", ".join(sorted(repr(d) for d in self._in_flight()))
                raise TimeoutError(
                    f"drain: still running after {limit} s: {running}. A handler waiting on "
                    "the clock finishes when `advance` moves it past its wait."
                )
            await asyncio.sleep(0.001)

    async def advance(
        self,
        delta: timedelta | float = 0.0,
        *,
        seconds: float = 0.0,
        minutes: float = 0.0,
        hours: float = 0.0,
        days: float = 0.0,
    ) -> None:
        """Move the virtual clock forward and run, in time order, everything that falls due:
        delayed sends, retries, TTL expiries, call timeouts, handlers' sleeps. While it runs the
        clock stands still between its jumps, so what runs in between takes no time.

        It returns once nothing more can run without the clock moving on: a handler whose own
        wait ends after the target is still waiting (`drain` waits for it in real time). A
        30-minute delay followed by five retries takes milliseconds.
        """
        await self.clock.advance(
            seconds_of(delta, seconds=seconds, minutes=minutes, hours=hours, days=days)
        )

    async def _quiesce(self, deadline: float | None = None) -> None:
        """Let run what runs without the clock moving: deliveries reach their handlers, handlers
        in threads finish, outcomes are settled."""
        deadline = time.monotonic() + self.drain_timeout if deadline is None else deadline
        broker = self.broker
        ready = getattr(asyncio.get_running_loop(), "_ready", ())  # asyncio's runnable callbacks
        seen, quiet, waiting = broker.activity, 0, 0
        while True:
            # Spin through the loop while work moves; once it only waits (a thread, a child
            # process), pause a millisecond of real time, in a thread: no loop timer, which the
            # clock held by `advance` would never let fall due.
            if waiting < 100:
                await asyncio.sleep(0)
            else:
                loop = asyncio.get_running_loop()
                await type(loop).run_in_executor(loop, None, time.sleep, 0.001)  # not counted
            if broker.activity != seen:
                seen, quiet, waiting = broker.activity, 0, 0
                continue
            if ready:  # other tasks can run on (a scheduler's round): not settled yet
                quiet = 0
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the event loop kept busy for {self.drain_timeout} s")
                continue
            if not self._busy():
                quiet += 1
                if quiet >= _QUIET_TURNS:
                    return
                continue
            quiet, waiting = 0, waiting + 1
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"still running after {self.drain_timeout} s: "
                    + ", ".join(sorted(repr(d) for d in self._in_flight()))
                )

    def _in_flight(self) -> list[MemoryDelivery]:
        """The deliveries our workers hold (not those of consumers a test made itself)."""
        ours = {id(worker.app.transport) for worker in self.workers}
        return [d for d in self.broker.in_flight.values() if id(d.owner) in ours]

    def _busy(self) -> int:
        """What moves on without the clock moving and without the loop having work ready:
        calls in threads (handlers, the store's), records on their way to the store, deliveries
        in a process-pool child or being settled. Not a handler on the loop (it may wait on the
        clock), nor a delivery waiting for a slot such handlers hold, or for a claim."""
        if self._threads:
            return self._threads
        writing = sum(app._tasks.recorder.pending for app in self.apps if app._tasks is not None)
        if writing:
            return writing  # records on their way to the store (in its thread)
        in_flight = self._in_flight()
        slots: Counter[object] = Counter(
            d.owner for d in in_flight if d.stage is not _Stage.HANDED_OVER
        )
        return sum(
            d.stage in (_Stage.IN_THREAD, _Stage.SETTLING)
            or (
                d.stage is _Stage.HANDED_OVER
                and slots[d.owner] < self._settings.concurrency
                and self._in_child(d)
            )
            for d in in_flight
        )

    def _in_child(self, delivery: MemoryDelivery) -> bool:
        """Whether a process-pool child runs `delivery`'s handler (no stage tells its progress:
        the child talks to the worker over pipes)."""
        task = _codec.header_text(delivery.headers.get(_codec.TASK))
        version = _codec.header_int(delivery.headers.get(_codec.VERSION), 1)
        return any(
            self._in_child_process(handler)
            for app in self.apps
            if (handler := app.handlers.get((task or "", version or 1))) is not None
        )

    def _count_threads(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count the calls the loop hands to threads (`run_in_executor`, `to_thread`): the
        store's, handlers' in threads. Undone by `_uncount_threads`."""
        original = loop.run_in_executor
        replaced = vars(loop).get("run_in_executor")  # another TestApp's, on the same loop

        def counted(executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
            future = original(executor, func, *args)
            self._threads += 1
            future.add_done_callback(self._thread_done)
            return future

        loop.run_in_executor = counted  # type: ignore[method-assign,assignment]
        self._counting = (loop, replaced)

    def _thread_done(self, _future: asyncio.Future[Any]) -> None:
        self._threads -= 1
        self.broker.activity += 1

    def _uncount_threads(self) -> None:
        counting, self._counting = self._counting, None
        if counting is None:
            return
        loop, replaced = counting
        if replaced is None:
            del loop.run_in_executor
        else:
            loop.run_in_executor = replaced  # type: ignore[method-assign]

    # --- looking inside ---------------------------------------------------------------------

    def attempts(self, task_id: str) -> int:
        """How often a handler ran for the message `task_id` (a `send`'s return value)."""
        return self.broker.runs.get(task_id, 0)

    def dead_letters(self, contract: Contract[Any, Any]) -> list[DeadLetter]:
        """The messages in the dead-letter queue of `contract`'s work queue, oldest first."""
        return [
            DeadLetter.of(message)
            for message in self.broker.messages(dead_letter_queue_name(contract.queue))
        ]

    def queued(self, contract: Contract[Any, Any]) -> list[Message]:
        """The messages ready in `contract`'s work queue and due queue (not those delivered,
        nor delayed ones still waiting)."""
        return [
            *self.broker.messages(contract.queue),
            *self.broker.messages(due_queue_name(contract.queue)),
        ]

    def sent(self, contract: Contract[Any, Any]) -> list[Message]:
        """Every task of `contract` the apps sent or called (at once or delayed), in order;
        retried copies are not among them. `Message.json()` reads the payload."""
        entries = {
            exchange
            for app in self.apps
            for exchange in (app.names.task_exchange, app.names.delay_entry_exchange)
        }
        return [
            message
            for message in self.broker.published
            if message.exchange in entries
            and _codec.header_text(message.headers.get(_codec.TASK)) == contract.name
            and _codec.header_int(message.headers.get(_codec.VERSION), 1) == contract.version
            and _codec.ATTEMPT not in message.headers
        ]

    # --- failure injection ------------------------------------------------------------------

    def fail_next_publish(
        self,
        error: type[BaseException] | BaseException = PublishInterrupted,
        *,
        task: Contract[Any, Any] | str | None = None,
        stored: bool = False,
    ) -> None:
        """Make the next publish (of `task`'s messages, or any) fail with `error`.

        A class of `PublishError` (`PublishInterrupted`, `QueueFull`, `PublishNacked`,
        `PublishTimeout`, `Unroutable`) is raised as the transport would, naming the task and
        message; an instance is raised as it is. With `stored`, the message is stored first (a
        confirm lost on the way back). It applies to sends, calls (where `PublishInterrupted`
        becomes the `ConnectionLost` a call raises) and the worker's own publishes: retries,
        dead letters and replies.
        """
        name = task.name if isinstance(task, Contract) else task

        def make(task_name: str, message_id: str) -> BaseException:
            if isinstance(error, BaseException):
                return error
            text = (
                f"task {task_name!r}: message {message_id} was not confirmed "
                f"({error.__name__}, injected by TestApp.fail_next_publish)"
            )
            if issubclass(error, PublishError):
                return error(text, task=task_name, message_id=message_id)
            return error(text)

        self.broker.fail_next_publish(make, task=name, stored=stored)

    def crash_next(self, contract: Contract[Any, Any], *, before_handler: bool = False) -> None:
        """The worker dies during the next run of `contract`'s handler.

        The handler runs to its end (or, with `before_handler`, not at all), then its task is
        cancelled before anything is settled: no ack, retry, dead letter or reply. The broker
        requeues the message, marked redelivered, and a worker runs it again; on a quorum queue
        that counts against the contract's `delivery_limit`. Use it to check that a handler is
        idempotent.
        """
        self.broker.arm_crash(contract.name, Crash(before_handler=before_handler))

    def redeliver(self, task_id: str) -> None:
        """Deliver the finished (acked) task `task_id` once more, marked redelivered, as the
        broker does when an ack is lost. Raises `KeyError` for a task not acked yet."""
        self.broker.redeliver(task_id)

    def eta(self, delta: timedelta | float) -> datetime:
        """The virtual wall clock plus `delta`: an `eta=` for `send`."""
        return self.clock.utcnow() + (
            delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        )


async def _awaited(result: Any) -> Any:
    # As the executors do: an awaitable returned by a handler is awaited on the loop.
    return await result if inspect.isawaitable(result) else result


async def _settled() -> None:
    await asyncio.sleep(0)


async def _die(broker: MemoryBroker, delivery: MemoryDelivery) -> None:
    """Crash the worker's task running `delivery` (this very task)."""
    if delivery.worker_task is None:
        delivery.worker_task = asyncio.current_task()
    broker.crash(delivery)
    await asyncio.sleep(0)  # raises the cancellation here, as a dying process stops here
