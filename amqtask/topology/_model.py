"""The desired topology as immutable values, derived from contracts. No I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from amqtask._contract import Contract, Overflow, QueueType
from amqtask._exceptions import ContractError
from amqtask.routing import Names, dead_letter_queue_name

ArgValue = str | int | bool
Arguments = tuple[tuple[str, ArgValue], ...]


def arguments(mapping: Mapping[str, ArgValue]) -> Arguments:
    """Freeze a mapping of queue/exchange arguments into a sorted, hashable tuple."""
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: str = "direct"
    durable: bool = True
    arguments: Arguments = ()

    kind = "exchange"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "type": self.type,
            "durable": self.durable,
            "arguments": dict(self.arguments),
        }


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    durable: bool = True
    arguments: Arguments = ()

    kind = "queue"

    @property
    def type(self) -> str:
        # A queue without x-queue-type is classic, as RabbitMQ itself assumes.
        return str(dict(self.arguments).get("x-queue-type", "classic"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "type": self.type,
            "durable": self.durable,
            "arguments": dict(self.arguments),
        }


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str

    kind = "binding"

    @property
    def name(self) -> str:
        return f"{self.exchange} -> {self.queue} [{self.routing_key}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "exchange": self.exchange,
            "queue": self.queue,
            "routing_key": self.routing_key,
        }


Entity = Exchange | Queue | Binding


@dataclass(frozen=True, slots=True)
class Topology:
    """Exchanges, queues and bindings, each once, in declaration order."""

    exchanges: tuple[Exchange, ...] = ()
    queues: tuple[Queue, ...] = ()
    bindings: tuple[Binding, ...] = ()
    names: Names = field(default_factory=Names)

    @property
    def entities(self) -> tuple[Entity, ...]:
        return (*self.exchanges, *self.queues, *self.bindings)

    def queue(self, name: str) -> Queue:
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)

    def bindings_of(self, queue: str) -> tuple[Binding, ...]:
        return tuple(binding for binding in self.bindings if binding.queue == queue)


def work_queue(contract: Contract[Any, Any], names: Names) -> Queue:
    """The work queue a contract needs, with its dead-letter routing and length limit."""
    args: dict[str, ArgValue] = {
        "x-queue-type": contract.queue_type.value,
        "x-dead-letter-exchange": names.dead_letter_exchange,
        "x-dead-letter-routing-key": contract.queue,
    }
    if contract.max_length is not None:
        args["x-max-length"] = contract.max_length
        args["x-overflow"] = contract.overflow.value
    bounded_drop_head = contract.max_length is not None and contract.overflow is Overflow.DROP_HEAD
    if contract.queue_type is QueueType.QUORUM and not bounded_drop_head:
        # Quorum queues dead-letter at-most-once unless asked; at-least-once keeps a message in
        # the source queue until the dead-letter queue confirmed it, and needs reject-publish.
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = Overflow.REJECT_PUBLISH.value
    return Queue(contract.queue, arguments=arguments(args))


def dead_letter_queue(contract: Contract[Any, Any]) -> Queue:
    return Queue(
        dead_letter_queue_name(contract.queue),
        arguments=arguments({"x-queue-type": contract.queue_type.value}),
    )


def derive(contracts: Iterable[Contract[Any, Any]], names: Names | None = None) -> Topology:
    """Compute every exchange, queue and binding the contracts need.

    Raises `ContractError` when two contracts share a queue but disagree on its arguments.
    """
    names = names or Names()
    exchanges = (
        Exchange(names.task_exchange, "direct"),
        Exchange(names.dead_letter_exchange, "direct"),
    )
    queues: dict[str, tuple[Queue, Contract[Any, Any]]] = {}
    bindings: dict[Binding, None] = {}
    for contract in contracts:
        for queue in (work_queue(contract, names), dead_letter_queue(contract)):
            seen = queues.setdefault(queue.name, (queue, contract))
            if seen[0] != queue:
                raise ContractError(
                    f"queue {queue.name!r} is shared by {seen[1].name!r} and {contract.name!r} "
                    f"with different settings: {dict(seen[0].arguments)} != {dict(queue.arguments)}"
                )
        bindings[Binding(names.task_exchange, contract.queue, contract.routing_key)] = None
        bindings[
            Binding(
                names.dead_letter_exchange,
                dead_letter_queue_name(contract.queue),
                contract.queue,
            )
        ] = None
    return Topology(
        exchanges=exchanges,
        queues=tuple(queue for queue, _ in queues.values()),
        bindings=tuple(bindings),
        names=names,
    )
