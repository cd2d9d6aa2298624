"""Task contracts: what a task is called, what it takes and returns, and where it is queued.

A contract module imports amqtask and pydantic only; producers and workers both import it, and only
the worker attaches handlers (see `App.handler`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar, overload

from pydantic import BaseModel

from amqtask._exceptions import ContractError
from amqtask.routing import default_queue_name, routing_key

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


class QueueType(StrEnum):
    """RabbitMQ queue type of a contract's work queue."""

    QUORUM = "quorum"  # replicated, durable, poison-message aware: the default
    CLASSIC = "classic"


class Overflow(StrEnum):
    """What a queue with `max_length` does when full."""

    REJECT_PUBLISH = "reject-publish"  # the publish is nacked: `send` raises, nothing is lost
    DROP_HEAD = "drop-head"  # the oldest message is dead-lettered to make room


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
) -> Contract[In, Any]:
    """Declare a task.

    `name` is the task's stable identity (letters, digits and `._:-`); `input` a pydantic model
    that every message is validated against at both ends; `returns` the model of the result that
    `App.call` hands back. `queue` defaults to the name (see the naming convention in the README).
    `max_length` bounds the work queue's ready messages; with the default overflow
    `reject-publish` a full queue makes `send` raise `QueueFull` instead of losing messages.

    Raises `ContractError` for an invalid name, version, model or limit.
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
    if not queue or len(queue.encode()) > 200 or queue.startswith("amq."):
        raise ContractError(
            f"task {name!r}: invalid queue name {queue!r} "
            "(1-200 bytes, and 'amq.' is reserved by RabbitMQ)"
        )
    try:
        queue_type = QueueType(queue_type)
        overflow = Overflow(overflow)
    except ValueError as exc:
        raise ContractError(f"task {name!r}: {exc}") from None
    return Contract(
        name=name,
        input=input,
        output=returns,
        queue=queue,
        queue_type=queue_type,
        max_length=max_length,
        overflow=overflow,
        version=version,
    )
