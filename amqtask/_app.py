"""The app: contracts, handlers, a connection, confirmed sends and calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from pydantic import BaseModel

from amqtask import _codec, _tracing, _wallclock, topology
from amqtask._contract import Contract, In, Isolation, LeaderLocator, Out, Overflow
from amqtask._exceptions import ContractError, PublishNacked, QueueFull, ScheduleError, StoreError
from amqtask._execution import is_async
from amqtask._failover import Failover
from amqtask._resource import AsyncResource
from amqtask._schedule import Schedule
from amqtask._transport import DEFAULT_CONNECT_TIMEOUT, AioPikaTransport, Transport
from amqtask._urls import split_urls
from amqtask.routing import DEFAULT_NAMESPACE, Names, delay_routing_key, delay_seconds
from amqtask.rpc import Caller

if TYPE_CHECKING:
    from amqtask.store import Store, TaskInfo
    from amqtask.store._client import TaskClient

# How long `send` retries a publish the broker refused (not for a full queue) without a timeout.
_NACK_RETRY = 30.0

HandlerFunc = Callable[[Any], Awaitable[Any]] | Callable[[Any], Any]
F = TypeVar("F", bound=HandlerFunc)


@dataclass(frozen=True, slots=True)
class Handler:
    """A contract's handler and how to run it."""

    contract: Contract[Any, Any]
    func: HandlerFunc
    is_async: bool
    path: str | None = None  # `module:qualname`, when registered by path (`App.handler_at`)


def _seconds_until(delay: timedelta | float | None, eta: datetime | None) -> float | None:
    if delay is not None and eta is not None:
        raise ValueError("pass either delay or eta, not both")
    if eta is not None:
        if eta.tzinfo is None:
            raise ValueError("eta must be timezone-aware (e.g. datetime.now(UTC) + ...)")
        # A moment already past runs at once, after the shortest delay.
        return max((eta - _wallclock.utc_now()).total_seconds(), 0.001)
    if isinstance(delay, timedelta):
        return delay.total_seconds()
    return delay


class App(AsyncResource):
    """Contracts, their handlers, and one broker connection.

    Producers and workers build the same app from the same contracts; only workers register
    handlers. Use it as an async context manager to connect and close.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        contracts: Iterable[Contract[Any, Any]],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        publish_timeout: float | None = 30.0,
        call_timeout: float = 30.0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        name: str = "amqtask",
        transport: Transport | None = None,
        store: str | Store | None = None,
        failover: Failover | str = Failover.ORDER,
        replicas: int | None = 3,
        leader_locator: LeaderLocator | str | None = LeaderLocator.BALANCED,
        schedules: Iterable[Schedule] = (),
    ) -> None:
        """`url` is the broker's URL, or its nodes' URLs: a list, or one string separated by `,`
        or `;`. They are tried in the `failover` order ("order" as given, "shuffle" a random
        order each round) at start and on every reconnect (the README's "Running on a cluster").
        `replicas` and `leader_locator` are the default replica count and leader locator of the
        quorum queues `declare` creates; a contract's own win.
        `publish_timeout` bounds how long `send` waits for a confirm (None: no bound);
        `call_timeout` is how long `call` waits for a reply unless told otherwise;
        `connect_timeout` bounds each connect (TCP, TLS and the AMQP handshake) and reconnect.
        `store` (a URL, `sqlite:///tasks.db` or `postgresql://...`, or an `amqtask.store.Store`)
        keeps task state, results and revocations (the README's "Task store"); without it
        nothing of the store is imported.
        `schedules` (`amqtask.schedule(...)`) are the periodic tasks a scheduler fires
        (`amqtask scheduler`, `amqtask worker --scheduler`; the README's "Periodic tasks").

        Raises `ContractError` when two contracts share a name and version, or a queue with
        different settings; `ScheduleError` for two schedules of one name or a schedule whose
        contract is not among `contracts`; `ValueError` for a `connect_timeout` that is not
        positive.
        """
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        self.urls = split_urls(url)
        self.url = self.urls[0]
        self.placement = topology.Placement(
            replicas, None if leader_locator is None else LeaderLocator(leader_locator)
        )
        self.names = Names(namespace)
        self.publish_timeout = publish_timeout
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self._contracts: dict[tuple[str, int], Contract[Any, Any]] = {}
        for contract in contracts:
            if contract.key in self._contracts and self._contracts[contract.key] != contract:
                raise ContractError(f"task {contract.name!r} v{contract.version} is defined twice")
            self._contracts[contract.key] = contract
        self.schedules: tuple[Schedule, ...] = self._own_schedules(schedules)
        self.topology = topology.derive(
            self._contracts.values(),
            self.names,
            revocations=store is not None,
            placement=self.placement,
            scheduler=bool(self.schedules),
        )
        self.handlers: dict[tuple[str, int], Handler] = {}
        self.transport: Transport = transport or AioPikaTransport(
            self.urls, name=name, connect_timeout=connect_timeout, failover=failover
        )
        self._caller = Caller(self.transport, self.names.task_exchange)
        self._tasks: TaskClient | None = None
        if store is not None:
            from amqtask.store import open_store
            from amqtask.store._client import TaskClient

            opened = open_store(store) if isinstance(store, str) else store
            self._tasks = TaskClient(opened, self._contracts, self.names, self.transport)

    @property
    def contracts(self) -> tuple[Contract[Any, Any], ...]:
        return tuple(self._contracts.values())

    def _own_schedules(self, schedules: Iterable[Schedule]) -> tuple[Schedule, ...]:
        owned: dict[str, Schedule] = {}
        for item in schedules:
            if not isinstance(item, Schedule):
                raise ScheduleError(f"expected amqtask.schedule(...), got {item!r}")
            if item.name in owned:
                raise ScheduleError(f"schedule {item.name!r} is defined twice")
            if self._contracts.get(item.contract.key) != item.contract:
                raise ScheduleError(
                    f"schedule {item.name!r}: task {item.contract.name!r} "
                    f"v{item.contract.version} is not among this app's contracts; pass it to "
                    "App(contracts=[...])"
                )
            owned[item.name] = item
        return tuple(owned.values())

    def contract(self, name: str, version: int | None = None) -> Contract[Any, Any]:
        """Look a contract up by task name (the highest version unless one is given)."""
        found = [c for c in self._contracts.values() if c.name == name]
        if version is not None:
            found = [c for c in found if c.version == version]
        if not found:
            known = ", ".join(sorted({c.name for c in self._contracts.values()}))
            raise ContractError(f"no task {name!r} in this app (known: {known or 'none'})")
        return max(found, key=lambda c: c.version)

    def _own(self, contract: Contract[Any, Any]) -> Contract[Any, Any]:
        if self._contracts.get(contract.key) != contract:
            raise ContractError(
                f"task {contract.name!r} v{contract.version} is not among this app's contracts; "
                "pass it to App(contracts=[...])"
            )
        return contract

    def handler(self, contract: Contract[In, Out]) -> Callable[[F], F]:
        """Register the function that runs `contract`'s tasks (worker side only).

        An `async def` runs on the event loop (also behind a decorator, a `functools.partial` or
        as an object's `async def __call__`); a plain `def` runs in a worker thread, and an
        awaitable it returns is awaited on the loop.
        """
        self._own(contract)

        def register(func: F) -> F:
            if contract.key in self.handlers:
                raise ContractError(f"task {contract.name!r} already has a handler")
            if not callable(func):
                raise ContractError(
                    f"task {contract.name!r}: the handler must be callable, got {func!r}"
                )
            self.handlers[contract.key] = Handler(contract, func, is_async(func))
            return func

        return register

    def handler_at(self, contract: Contract[Any, Any], path: str) -> None:
        """Register the handler at import path `path` (`package.module:function`) without
        importing it here: for a contract whose handler runs in another interpreter
        (`isolation="process"`, `python=...`) with dependencies this one may not have.

        The worker's children import it at start; a worker whose children cannot refuses to
        start. Raises `ContractError` for a contract that does not run in a process, a path
        not of that form, or a second handler.
        """
        self._own(contract)
        if contract.key in self.handlers:
            raise ContractError(f"task {contract.name!r} already has a handler")
        module, _, qualname = path.partition(":")
        parts = [*module.split("."), *qualname.split(".")]
        if not module or not qualname or not all(part.isidentifier() for part in parts):
            raise ContractError(
                f"task {contract.name!r}: expected a path like 'package.module:function', "
                f"got {path!r}"
            )
        if contract.isolation is not Isolation.PROCESS:
            raise ContractError(
                f"task {contract.name!r}: a handler registered by path runs only in a process; "
                "give the contract isolation='process'"
            )

        def not_here(payload: Any) -> Any:
            raise ContractError(f"task {contract.name!r} runs {path} in a child process only")

        self.handlers[contract.key] = Handler(contract, not_here, False, path)

    @property
    def handled(self) -> Mapping[tuple[str, int], Contract[Any, Any]]:
        return {key: handler.contract for key, handler in self.handlers.items()}

    # --- connection -------------------------------------------------------------------------

    def use_urls(self, url: str | Sequence[str]) -> None:
        """Connect to these broker URLs instead (as `url` in the constructor): what the CLI's
        `--url` and `AMQTASK_URL` do. Only before the app connects.

        Raises `ValueError` for no URL, once connected, or for an app with its own transport.
        """
        urls = split_urls(url)
        if not isinstance(self.transport, AioPikaTransport):
            raise ValueError("this app was given its own transport: it does not take URLs")
        self.transport.use_urls(urls)
        self.urls, self.url = urls, urls[0]

    async def connect(self, *, queues: Iterable[str] = ()) -> None:
        """Open the connection, after checking that the exchanges it publishes to (and `queues`)
        exist.

        Raises `TopologyMissing` before `amqtask declare` has run: a publish to a missing
        exchange would close the channel every send shares (404), failing the others with it.
        Raises a `ConnectError` when the broker cannot be connected to within `connect_timeout`
        (`BrokerUnreachable`, `ConnectTimeout`, `AuthenticationFailed`, `VhostRefused`,
        `InvalidURL`).
        """
        names = self.names
        published_to = {names.task_exchange, names.dead_letter_exchange, names.delay_entry_exchange}
        if self._tasks is not None:
            published_to.add(names.revoke_exchange)  # revocations; a worker binds a queue to it
        needed = topology.Topology(
            exchanges=tuple(e for e in self.topology.exchanges if e.name in published_to),
            queues=tuple(self.topology.queue(name) for name in queues),
            names=names,
        )
        await self.transport.ensure_exists(needed, (queue.name for queue in needed.queues))
        await self.transport.connect()
        if self._tasks is not None:
            await self._tasks.connect()

    async def close(self) -> None:
        await self._caller.close()
        if self._tasks is not None:
            await self._tasks.close()  # first: what is recorded is written before the end
        await self.transport.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    # --- producing --------------------------------------------------------------------------

    async def send(
        self,
        contract: Contract[In, Any],
        payload: In | Mapping[str, Any],
        *,
        delay: timedelta | float | None = None,
        eta: datetime | None = None,
        timeout: float | None = None,
        wait_if_full: float = 0.0,
    ) -> str:
        """Validate, publish persistent and mandatory, and wait for the broker's confirm.

        With `delay` (seconds or a timedelta) or `eta` (an aware datetime), the task waits on the
        broker, in the delay levels, and reaches its queue no earlier than asked and at most about
        a second later (whole seconds, rounded up); up to `MAX_DELAY_SECONDS` (12 days).
        Returns the message id (stable across redeliveries: use it for idempotency).
        A contract with `max_length` refuses sends while its queue is full: `send` raises
        `QueueFull` at once, or keeps trying for up to `wait_if_full` seconds first.
        Raises pydantic's `ValidationError` (nothing published), `ValueError` for a bad delay,
        `Unroutable`, `QueueFull`, `PublishNacked`, `PublishInterrupted` when the connection
        dropped before the confirm (the message may or may not be stored), or `PublishTimeout`
        after `timeout` (default: the app's `publish_timeout`; it also bounds a wait while the
        broker blocks publishers).
        """
        self._own(contract)
        message = _codec.encode_task(contract, cast(BaseModel | Mapping[str, Any], payload))
        exchange, routing = self.names.task_exchange, contract.routing_key
        wait = _seconds_until(delay, eta)
        if wait is not None:
            exchange = self.names.delay_entry_exchange
            routing = delay_routing_key(delay_seconds(wait), contract.queue)
        timeout = self.publish_timeout if timeout is None else timeout
        if not _tracing.ENABLED:
            return await self._publish(contract, message, exchange, routing, timeout, wait_if_full)
        span = _tracing.start_send(
            message.headers,
            exchange=exchange,
            routing_key=routing,
            destination=contract.routing_key,
            message_id=message.message_id,
            correlation_id=None,
            task=contract.name,
            version=contract.version,
            body_size=len(message.body),
        )
        try:
            await self._publish(contract, message, exchange, routing, timeout, wait_if_full)
        except BaseException as exc:
            _tracing.end(span, exc)
            raise
        _tracing.end(span)
        return message.message_id

    async def _publish(
        self,
        contract: Contract[Any, Any],
        message: _codec.Outgoing,
        exchange: str,
        routing: str,
        timeout: float | None,
        wait_if_full: float,
    ) -> str:
        """Publish, confirmed; while a `reject-publish` queue is full, retry for `wait_if_full`.

        Any other nack is retried until `timeout` (30 s when None) on a fresh channel: in a
        cluster, a queue refuses publishes while it has no leader (its node died a moment ago)
        and takes them again once one is elected, within a second.
        """
        clock = asyncio.get_running_loop()
        give_up = clock.time() + wait_if_full
        retrying = _NACK_RETRY if timeout is None else timeout
        unavailable_until = clock.time() + retrying
        bounded = (
            contract.max_length is not None
            and contract.overflow is Overflow.REJECT_PUBLISH
            and exchange == self.names.task_exchange  # delayed sends wait in unbounded queues
        )
        pause = 0.05
        while True:
            try:
                await self.transport.publish(
                    exchange,
                    routing,
                    message,
                    task=contract.name,
                    # Retries after a refusal share the one timeout; a full queue's each get it.
                    timeout=timeout
                    if bounded or timeout is None
                    else max(unavailable_until - clock.time(), 0.001),
                )
                if self._tasks is not None:  # after the confirm: the task exists
                    self._tasks.sent(contract, message.message_id, exchange, routing)
                return message.message_id
            except QueueFull:
                raise  # the transport knows it already
            except PublishNacked:
                if not bounded:
                    if clock.time() + pause > unavailable_until:
                        raise PublishNacked(
                            f"task {contract.name!r}: the broker refused message "
                            f"{message.message_id} at every try for {retrying:g} s: its queue is "
                            "unavailable (a quorum queue without a leader, e.g. one that lost the "
                            "majority of its nodes: `amqtask status` shows it); nothing was stored",
                            task=contract.name,
                            message_id=message.message_id,
                        ) from None
                elif clock.time() + pause > give_up:
                    raise QueueFull(
                        f"task {contract.name!r}: queue {contract.queue!r} is full "
                        f"(max_length {contract.max_length}); nothing was stored",
                        task=contract.name,
                        message_id=message.message_id,
                    ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def call(
        self,
        contract: Contract[In, Out],
        payload: In | Mapping[str, Any],
        *,
        timeout: float | None = None,
    ) -> Out:
        """Run `contract`'s task on a worker and return its result, typed as the output model.

        Returns None for a contract without `returns`, once the handler finished. Any number of
        calls may be in flight at once. The request is published like `send` (validated,
        persistent, mandatory, confirmed) with an expiry of `timeout` seconds (default: the
        app's `call_timeout`): a worker never starts a request whose caller stopped waiting.
        Replies are at-most-once and calls are never retried.

        Raises pydantic's `ValidationError` (nothing published); `RemoteError` when the handler
        raised or the worker refused the request, with the remote type, message and traceback;
        `InvalidReply` (a `RemoteError`) when the result does not fit the output model;
        `CallTimeout`; `ConnectionLost` when the connection dropped meanwhile; and `send`'s
        publishing errors (`Unroutable`, `PublishNacked`).
        """
        self._own(contract)
        result = await self._caller.call(
            contract,
            cast(BaseModel | Mapping[str, Any], payload),
            timeout=self.call_timeout if timeout is None else timeout,
        )
        return cast(Out, result)

    # --- the task store ---------------------------------------------------------------------

    @property
    def store(self) -> Store | None:
        """The task store given as `store=`, or None."""
        return None if self._tasks is None else self._tasks.store

    def _store(self) -> TaskClient:
        if self._tasks is None:
            raise StoreError(
                "this app has no task store: pass App(store='sqlite:///tasks.db') or "
                "App(store='postgresql://...')"
            )
        return self._tasks

    async def task(self, task_id: str) -> TaskInfo | None:
        """What the store knows of task `task_id` (the id `send` returned): state, attempts,
        timings, worker, error, result (typed by the contract); None when it knows nothing.

        Raises `StoreError` without a store, `StoreUnavailable`, `StoreMissing`.
        """
        return await self._store().task(task_id)

    async def result(
        self, contract: Contract[Any, Out], task_id: str, *, timeout: float = 60.0
    ) -> Out:
        """Wait for task `task_id` of `contract` to finish and return its result, typed.

        Waits on the store (PostgreSQL: LISTEN/NOTIFY; SQLite: a check every 2 ms), not on the
        caller's connection: any process may ask, while or long after the task ran (for the
        contract's `keep_result`). Raises `RemoteError` for a failed task (dead-lettered: its
        reason, error type, message and traceback), `TaskRevoked`, `ResultTimeout`, and the
        store's errors (`StoreError` without one).
        """
        self._own(contract)
        return cast(Out, await self._store().result(contract, task_id, timeout))

    async def revoke(self, task_id: str, *, terminate: bool = False) -> None:
        """Revoke task `task_id`: it will not run. With `terminate`, also stop it if it runs now.

        Durable: stored first (a worker acks a revoked task without running it, also after a
        restart, and also a delayed or retried copy), then broadcast to running workers. An
        `async def` handler is cancelled at its current await, a process-pool child is killed;
        a plain `def` in a thread cannot be stopped and runs to its end. Raises `StoreError`
        without a store, `StoreUnavailable` (nothing was revoked) and `StoreMissing`.
        """
        await self._store().revoke(task_id, terminate=terminate)

    async def tasks(
        self,
        *,
        state: str | None = None,
        task: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        """Tasks in the store, most recently changed first, optionally of one `state`, one task
        name, changed `since` an aware datetime."""
        stamp = None if since is None else since.timestamp()
        return await self._store().tasks(state=state, task=task, since=stamp, limit=limit)

    # --- topology ---------------------------------------------------------------------------

    async def plan(self) -> topology.Plan:
        """Compare the contracts' topology with the broker. Changes nothing."""
        return await self.transport.plan(self.topology)

    async def declare(self) -> topology.Plan:
        """Create what is missing; return the plan as it stood before.

        Raises `TopologyConflict` (changing nothing) where the broker holds something different.
        With a task store, also creates or migrates its tables (`migrate_store`).
        """
        plan = await self.plan()
        await self.transport.apply(plan)
        if self._tasks is not None:
            await self.migrate_store()
        return plan

    async def migrate_store(self) -> list[int]:
        """Create or migrate the task store's tables; return the schema versions applied now
        (empty when up to date). Raises `StoreError` without a store, `StoreUnavailable`."""
        store = self._store().store
        await store.open()
        return await store.migrate()
