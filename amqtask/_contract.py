"""Task contracts: what a task is called, what it takes and returns, and where it is queued.

A contract module imports amqtask and pydantic only; producers and workers both import it, and only
the worker attaches handlers (see `App.handler`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Generic, TypeVar, overload

from pydantic import BaseModel

from amqtask._exceptions import ContractError
from amqtask.routing import MAX_DELAY_SECONDS, default_queue_name, routing_key

DEFAULT_KEEP_RESULT = 86_400.0  # seconds a finished task's record is kept in a task store: a day

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out")

_WILDCARD = {"*", "#"}  # topic wildcards: a queue name ends the delay routing key
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


class QueueType(StrEnum):
    """RabbitMQ queue type of a contract's work queue."""

    QUORUM = "quorum"  # replicated, durable, poison-message aware: the default
    CLASSIC = "classic"


class Overflow(StrEnum):
    """What a queue with `max_length` does when full."""

    REJECT_PUBLISH = "reject-publish"  # the publish is nacked: `send` raises, nothing is lost
    DROP_HEAD = "drop-head"  # the oldest message is dead-lettered to make room


class LeaderLocator(StrEnum):
    """Which node RabbitMQ makes a new quorum queue's leader (`x-queue-leader-locator`)."""

    BALANCED = "balanced"  # the node leading the fewest queues: leaders spread over the cluster
    CLIENT_LOCAL = "client-local"  # the node the declaring client is connected to


class Isolation(StrEnum):
    """Where a contract's handler runs, whatever the worker's `--pool`."""

    PROCESS = "process"  # in a child process of the worker's process pool
    NONE = "none"  # in the worker process: `async def` on the event loop, `def` in a thread


class Calls(StrEnum):
    """How `App.call` publishes a contract's requests."""

    # Persistent and confirmed before the wait for the reply, in the work queue.
    DURABLE = "durable"
    # Transient, in a classic call queue of their own, and the caller waits for the reply at
    # once: faster, and a request in flight is lost with its broker node (the caller then gets
    # `CallTimeout`).
    TRANSIENT = "transient"


@dataclass(frozen=True, slots=True)
class Retry:
    """How a failing task is retried: on the broker, through the delay levels, with backoff.

    `attempts` counts executions, the first included: `attempts=1` never retries. Attempt n
    (n >= 2) waits `min(initial * backoff ** (n - 2), max_delay)` seconds after the failure
    before it runs (rounded up to whole seconds). Only exceptions that are instances of one of
    `on` are retried; others go straight to the dead-letter queue.
    """

    attempts: int = 5
    backoff: float = 2.0
    initial: float = 1.0
    max_delay: float = 600.0
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ContractError(f"Retry.attempts must be an integer, got {self.attempts!r}")
        if self.attempts < 1:
            raise ContractError(f"Retry.attempts must be at least 1, got {self.attempts}")
        numbers = (self.backoff, self.initial, self.max_delay)
        if (
            not all(math.isfinite(n) for n in numbers)
            or self.backoff < 1
            or self.initial <= 0
            or not self.initial <= self.max_delay <= MAX_DELAY_SECONDS
        ):
            raise ContractError(
                "Retry needs finite backoff >= 1, initial > 0 and initial <= max_delay <= "
                f"{MAX_DELAY_SECONDS} s, got backoff={self.backoff}, initial={self.initial}, "
                f"max_delay={self.max_delay}"
            )
        on = (self.on,) if isinstance(self.on, type) else tuple(self.on)
        if not on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise ContractError(f"Retry.on must be exception classes, got {self.on!r}")
        object.__setattr__(self, "on", on)

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (2 for the first retry)."""
        try:
            return min(self.initial * self.backoff ** max(attempt - 2, 0), self.max_delay)
        except OverflowError:
            return self.max_delay

    def retries(self, exc: BaseException, attempt: int) -> bool:
        """Whether a failure of attempt number `attempt` with `exc` gets another attempt."""
        return attempt < self.attempts and isinstance(exc, self.on)


NO_RETRY = Retry(attempts=1)

DEFAULT_DELIVERY_LIMIT = 10
"""Redeliveries a quorum queue allows before dead-lettering: the guard against a message that
kills its worker before it can be acked (each crash means one redelivery)."""


@dataclass(frozen=True, slots=True)
class Contract(Generic[In, Out]):
    """A task's name, input and output models, queue and version.

    Build one with `amqtask.contract(...)`. Contracts are immutable and hashable; two contracts
    with the same name and version are the same task.
    """

    name: str
    input: type[In]
    output: type[Out] | None
    queue: str
    queue_type: QueueType = QueueType.QUORUM
    max_length: int | None = None
    overflow: Overflow = Overflow.REJECT_PUBLISH
    version: int = 1
    retry: Retry = Retry()
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    calls: Calls = Calls.DURABLE
    # Where and how long the handler runs: worker-side settings, unknown to the broker.
    time_limit: float | None = None
    soft_time_limit: float | None = None
    isolation: Isolation | None = None  # None: the worker's --pool decides
    python: str | None = None  # another interpreter for the process (isolation "process")
    launcher: tuple[str, ...] = ()  # a command prefix for the process (bwrap, a container)
    # With a task store (`App(store=...)`): claim each task id before running it, and how long
    # a finished task's record and result are kept (seconds).
    deduplicate: bool = False
    keep_result: float = DEFAULT_KEEP_RESULT
    # Quorum queues in a cluster, fixed when a queue is created (None: the app's default).
    replicas: int | None = None
    leader_locator: LeaderLocator | None = None

    @property
    def routing_key(self) -> str:
        """The key this contract's messages are published with on the task exchange."""
        return routing_key(self.name, self.version)

    @property
    def key(self) -> tuple[str, int]:
        """(name, version): what identifies the task in a message's headers."""
        return (self.name, self.version)

    def __repr__(self) -> str:
        return f"<Contract {self.name} v{self.version} queue={self.queue!r}>"


@overload
def contract(
    name: str,
    input: type[In],
    *,
    returns: None = None,
    queue: str | None = None,
    queue_type: QueueType | str = QueueType.QUORUM,
    max_length: int | None = None,
    overflow: Overflow | str = Overflow.REJECT_PUBLISH,
    version: int = 1,
    retry: Retry | None = None,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    calls: Calls | str = Calls.DURABLE,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    isolation: Isolation | str | None = None,
    python: str | None = None,
    launcher: Sequence[str] = (),
    deduplicate: bool = False,
    keep_result: float | timedelta = DEFAULT_KEEP_RESULT,
    replicas: int | None = None,
    leader_locator: LeaderLocator | str | None = None,
) -> Contract[In, None]: ...


@overload
def contract(
    name: str,
    input: type[In],
    *,
    returns: type[Out],
    queue: str | None = None,
    queue_type: QueueType | str = QueueType.QUORUM,
    max_length: int | None = None,
    overflow: Overflow | str = Overflow.REJECT_PUBLISH,
    version: int = 1,
    retry: Retry | None = None,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    calls: Calls | str = Calls.DURABLE,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    isolation: Isolation | str | None = None,
    python: str | None = None,
    launcher: Sequence[str] = (),
    deduplicate: bool = False,
    keep_result: float | timedelta = DEFAULT_KEEP_RESULT,
    replicas: int | None = None,
    leader_locator: LeaderLocator | str | None = None,
) -> Contract[In, Out]: ...


def contract(
    name: str,
    input: type[In],
    *,
    returns: type[Any] | None = None,
    queue: str | None = None,
    queue_type: QueueType | str = QueueType.QUORUM,
    max_length: int | None = None,
    overflow: Overflow | str = Overflow.REJECT_PUBLISH,
    version: int = 1,
    retry: Retry | None = None,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    calls: Calls | str = Calls.DURABLE,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    isolation: Isolation | str | None = None,
    python: str | None = None,
    launcher: Sequence[str] = (),
    deduplicate: bool = False,
    keep_result: float | timedelta = DEFAULT_KEEP_RESULT,
    replicas: int | None = None,
    leader_locator: LeaderLocator | str | None = None,
) -> Contract[In, Any]:
    """Declare a task.

    `name` is the task's stable identity (letters, digits and `._:-`); `input` a pydantic model
    that every message is validated against at both ends; `returns` the model of the result that
    `App.call` hands back. `queue` defaults to the name (see the naming convention in the README).
    `max_length` bounds the work queue's ready messages; with the default overflow
    `reject-publish` a full queue makes `send` raise `PublishNacked` instead of losing messages.
    `retry` is the retry policy (default `Retry()`: 5 attempts, 1 s, 2 s, 4 s, 8 s apart);
    `delivery_limit` bounds redeliveries of a message whose worker died before acking (quorum).
    `calls="transient"` sends `App.call`'s requests as transient messages to a classic call queue
    of the work queue's own, without waiting for their confirm: faster calls, and a request in
    flight is lost if its broker node dies (the README's "Transient calls").

    Worker-side settings (the README's "Running user code safely"): `time_limit` and
    `soft_time_limit` in seconds (default: the worker's); `isolation="process"` runs the handler
    in the worker's process pool, `"none"` in the worker process whatever its `--pool`; with
    `python` (a path to another interpreter, e.g. another virtualenv's `bin/python`) and
    `launcher` (a command prefix such as `["bwrap", ...]`) that process runs there.

    With a task store (`App(store=...)`, the README's "Task store"): `deduplicate=True` makes
    the worker claim each task id before running it, so a redelivered or duplicated message is
    not run twice; `keep_result` (seconds or a timedelta, default a day) is how long a finished
    task's record and result are kept.

    In a cluster (the README's "Running on a cluster"), `replicas` is how many nodes hold a copy
    of each quorum queue (`x-quorum-initial-group-size`) and `leader_locator` which node leads a
    new one (`x-queue-leader-locator`); both default to the app's (`App(replicas=3,
    leader_locator="balanced")`) and only take effect when a queue is created.

    Raises `ContractError` for an invalid name, version, model, limit or isolation.
    """
    if not _NAME.fullmatch(name):
        raise ContractError(
            f"invalid task name {name!r}: use letters, digits and '._:-', starting alphanumeric"
        )
    if not (isinstance(input, type) and issubclass(input, BaseModel)):
        raise ContractError(f"task {name!r}: input must be a pydantic model class, got {input!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ContractError(f"task {name!r}: version must be a positive integer, got {version!r}")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ContractError(f"task {name!r}: max_length must be at least 1, got {max_length!r}")
    queue = default_queue_name(name, version) if queue is None else queue
    if not queue or len(queue.encode()) > 200 or queue.startswith("amq.") or _WILDCARD & set(queue):
        raise ContractError(
            f"task {name!r}: invalid queue name {queue!r} "
            "(1-200 bytes, no '*' or '#', and 'amq.' is reserved by RabbitMQ)"
        )
    if (
        isinstance(delivery_limit, bool)
        or not isinstance(delivery_limit, int)
        or delivery_limit < 1
    ):
        raise ContractError(
            f"task {name!r}: delivery_limit must be at least 1, got {delivery_limit!r}"
        )
    try:
        queue_type = QueueType(queue_type)
        overflow = Overflow(overflow)
        calls = Calls(calls)
        isolation = None if isolation is None else Isolation(isolation)
    except ValueError as exc:
        raise ContractError(f"task {name!r}: {exc}") from None
    _check_limits(f"task {name!r}", time_limit, soft_time_limit, ContractError)
    launcher = (launcher,) if isinstance(launcher, str) else tuple(launcher)
    if not all(isinstance(part, str) and part for part in launcher):
        raise ContractError(f"task {name!r}: launcher must be a list of strings, got {launcher!r}")
    if python is not None and (not isinstance(python, str) or not python):
        raise ContractError(f"task {name!r}: python must be a path, got {python!r}")
    if (python is not None or launcher) and isolation is not Isolation.PROCESS:
        raise ContractError(
            f"task {name!r}: python= and launcher= run the handler in a process of its own; "
            "add isolation='process'"
        )
    if isinstance(keep_result, timedelta):
        keep_result = keep_result.total_seconds()
    if (
        isinstance(keep_result, bool)
        or not isinstance(keep_result, int | float)
        or not math.isfinite(keep_result)
        or keep_result <= 0
    ):
        raise ContractError(
            f"task {name!r}: keep_result must be a positive number of seconds, got {keep_result!r}"
        )
    if replicas is not None and (
        isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1
    ):
        raise ContractError(f"task {name!r}: replicas must be at least 1, got {replicas!r}")
    try:
        leader_locator = None if leader_locator is None else LeaderLocator(leader_locator)
    except ValueError as exc:
        raise ContractError(f"task {name!r}: {exc}") from None
    if (replicas is not None or leader_locator is not None) and queue_type is not QueueType.QUORUM:
        raise ContractError(
            f"task {name!r}: replicas and leader_locator place quorum queues; a classic queue "
            "lives on one node"
        )
    return Contract(
        name=name,
        input=input,
        output=returns,
        queue=queue,
        queue_type=queue_type,
        max_length=max_length,
        overflow=overflow,
        version=version,
        retry=Retry() if retry is None else retry,
        delivery_limit=delivery_limit,
        calls=calls,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        isolation=isolation,
        python=python,
        launcher=launcher,
        deduplicate=bool(deduplicate),
        keep_result=float(keep_result),
        replicas=replicas,
        leader_locator=leader_locator,
    )


def _check_limits(
    owner: str, hard: float | None, soft: float | None, error: type[Exception]
) -> None:
    """Time limits are positive finite seconds, and a soft limit comes before the hard one."""
    for label, value in (("time_limit", hard), ("soft_time_limit", soft)):
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise error(f"{owner}: {label} must be a positive number of seconds, got {value!r}")
    if hard is not None and soft is not None and soft >= hard:
        raise error(
            f"{owner}: soft_time_limit ({soft:g} s) must be below time_limit ({hard:g} s), or "
            "the handler never sees it"
        )
