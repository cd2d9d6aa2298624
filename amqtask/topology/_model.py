"""The desired topology as immutable values, derived from contracts. No I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from amqtask._contract import Calls, Contract, LeaderLocator, Overflow, QueueType
from amqtask._exceptions import ContractError
from amqtask.routing import (
    DELAY_LEVELS,
    Names,
    call_queue_name,
    call_routing_key,
    dead_letter_queue_name,
    deliver_pattern,
    due_queue_name,
    level_pattern,
    level_ttl_ms,
)

ArgValue = str | int | bool
Arguments = tuple[tuple[str, ArgValue], ...]


def arguments(mapping: Mapping[str, ArgValue]) -> Arguments:
    """Freeze a mapping of queue/exchange arguments into a sorted, hashable tuple."""
    return tuple(sorted(mapping.items()))


# Arguments that only say where a new quorum queue's replicas and leader go. RabbitMQ 3.10
# compares both on redeclare (a different or missing value is a 406), yet neither changes what
# the queue does: `declare` reports a difference on an existing queue as a note and leaves the
# queue alone (`rabbitmq-queues grow` and `rebalance` move replicas and leaders afterwards).
CREATION_ONLY = frozenset({"x-quorum-initial-group-size", "x-queue-leader-locator"})

# A quorum dead-letter queue's delivery limit: none in effect. People read dead letters
# (`amqtask dlq list`, the dashboard) without acking and hand them back, and on a quorum queue
# each hand-back counts as a delivery: RabbitMQ 4.x gives quorum queues a limit of 20 unless
# told otherwise, past which a letter would be dropped. -1, 4.x's "no limit", drops a letter at
# its first hand-back on 3.10 (checked on 3.10.8), so the largest 32-bit value stands for it on
# both. A dead-letter queue declared without it is left as is (`Step.by_policy`).
DEAD_LETTER_DELIVERY_LIMIT = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Placement:
    """Where RabbitMQ puts a new quorum queue: how many nodes hold a replica, and which node
    leads it. None leaves it to the broker (3 replicas; the declaring client's node leads)."""

    replicas: int | None = None
    leader_locator: LeaderLocator | None = None

    def __post_init__(self) -> None:
        if self.replicas is not None and (
            isinstance(self.replicas, bool)
            or not isinstance(self.replicas, int)
            or self.replicas < 1
        ):
            raise ContractError(f"replicas must be at least 1, got {self.replicas!r}")
        if self.leader_locator is not None:
            try:
                object.__setattr__(self, "leader_locator", LeaderLocator(self.leader_locator))
            except ValueError as exc:
                raise ContractError(str(exc)) from None

    def of(self, contract: Contract[Any, Any]) -> Placement:
        """The contract's own placement, with this one's values where it has none."""
        return Placement(
            contract.replicas if contract.replicas is not None else self.replicas,
            contract.leader_locator if contract.leader_locator is not None else self.leader_locator,
        )

    def arguments(self) -> dict[str, ArgValue]:
        args: dict[str, ArgValue] = {}
        if self.replicas is not None:
            args["x-quorum-initial-group-size"] = self.replicas
        if self.leader_locator is not None:
            args["x-queue-leader-locator"] = self.leader_locator.value
        return args


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
    """Routes `exchange`'s messages matching `routing_key` to a queue, or to an exchange."""

    exchange: str
    queue: str  # the destination's name: an exchange's when `to_exchange`
    routing_key: str
    to_exchange: bool = False

    kind = "binding"

    @property
    def destination_kind(self) -> str:
        return "exchange" if self.to_exchange else "queue"

    @property
    def name(self) -> str:
        arrow = "=> exchange " if self.to_exchange else "-> "
        return f"{self.exchange} {arrow}{self.queue} [{self.routing_key}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "exchange": self.exchange,
            "destination_kind": self.destination_kind,
            "destination": self.queue,
            "routing_key": self.routing_key,
        }


Entity = Exchange | Queue | Binding


@dataclass(frozen=True, slots=True)
class Topology:
    """Exchanges, queues and bindings, each once, in declaration order.

    `retired` are bindings an earlier version of amqtask declared and this one must not leave in
    place: `declare` removes them. They are not among `entities`, which is what is wanted.
    """

    exchanges: tuple[Exchange, ...] = ()
    queues: tuple[Queue, ...] = ()
    bindings: tuple[Binding, ...] = ()
    names: Names = field(default_factory=Names)
    retired: tuple[Binding, ...] = ()

    @property
    def entities(self) -> tuple[Entity, ...]:
        return (*self.exchanges, *self.queues, *self.bindings)

    def queue(self, name: str) -> Queue:
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)

    def bindings_of(self, queue: str) -> tuple[Binding, ...]:
        return tuple(b for b in self.bindings if b.queue == queue and not b.to_exchange)


def work_queue(
    contract: Contract[Any, Any], names: Names, placement: Placement = Placement()
) -> Queue:
    """The work queue a contract needs, with its dead-letter routing and length limit."""
    return Queue(
        contract.queue,
        arguments=_consumed_arguments(contract, names, contract.max_length, placement),
    )


def due_queue(
    contract: Contract[Any, Any], names: Names, placement: Placement = Placement()
) -> Queue:
    """The queue where a contract's delayed sends and retries arrive once their delay is over.

    Like the work queue (type, dead-letter routing to the work queue's dead-letter queue,
    delivery limit), but never bounded: the delay levels dead-letter into it at least once, and
    a full target would make the level's dead-letter worker hold its messages, and every other
    queue's behind them, until `dead_letter_worker_publisher_confirm_timeout` (180 s).
    """
    return Queue(
        due_queue_name(contract.queue),
        arguments=_consumed_arguments(contract, names, None, placement),
    )


def _consumed_arguments(
    contract: Contract[Any, Any], names: Names, max_length: int | None, placement: Placement
) -> Arguments:
    """Arguments of a queue the contract's workers consume: its work queue or its due queue."""
    args: dict[str, ArgValue] = {
        "x-queue-type": contract.queue_type.value,
        "x-dead-letter-exchange": names.dead_letter_exchange,
        # The work queue's name, also for its due queue: dead letters land in `{queue}.dead`.
        "x-dead-letter-routing-key": contract.queue,
    }
    if max_length is not None:
        args["x-max-length"] = max_length
        args["x-overflow"] = contract.overflow.value
    bounded_drop_head = max_length is not None and contract.overflow is Overflow.DROP_HEAD
    if contract.queue_type is QueueType.QUORUM:
        # Each crash of a worker before its ack is one redelivery: past the limit, the broker
        # dead-letters the message instead of feeding it to the next worker.
        args["x-delivery-limit"] = contract.delivery_limit
    if contract.queue_type is QueueType.QUORUM and not bounded_drop_head:
        # Quorum queues dead-letter at-most-once unless asked; at-least-once keeps a message in
        # the source queue until the dead-letter queue confirmed it, and needs reject-publish.
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = Overflow.REJECT_PUBLISH.value
    if contract.queue_type is QueueType.QUORUM:
        args.update(placement.of(contract).arguments())
    return arguments(args)


def call_queue(contract: Contract[Any, Any], names: Names) -> Queue:
    """The queue a contract's transient calls wait in (`calls="transient"`).

    Classic and durable: the queue survives a restart (it is part of the declared topology),
    the transient requests in it do not. A classic queue takes a transient message without a
    disk write or a Raft round; a request is worth no more, since its caller gives up at its
    timeout anyway. Requests that expire in it are dead-lettered to the work queue's
    dead-letter queue, like those of durable calls; `max_length` bounds it like the work queue.
    No delivery limit (classic queues have none): a request that kills its worker is redelivered
    until it expires, and a worker drops one whose caller stopped waiting unrun.
    """
    args: dict[str, ArgValue] = {
        "x-queue-type": QueueType.CLASSIC.value,
        "x-dead-letter-exchange": names.dead_letter_exchange,
        "x-dead-letter-routing-key": contract.queue,
    }
    if contract.max_length is not None:
        args["x-max-length"] = contract.max_length
        args["x-overflow"] = contract.overflow.value
    return Queue(call_queue_name(contract.queue), arguments=arguments(args))


def dead_letter_queue(contract: Contract[Any, Any], placement: Placement = Placement()) -> Queue:
    args: dict[str, ArgValue] = {"x-queue-type": contract.queue_type.value}
    if contract.queue_type is QueueType.QUORUM:
        args["x-delivery-limit"] = DEAD_LETTER_DELIVERY_LIMIT  # browsing never drops a letter
        args.update(placement.of(contract).arguments())
    return Queue(dead_letter_queue_name(contract.queue), arguments=arguments(args))


def delay_levels(
    names: Names, placement: Placement = Placement()
) -> tuple[list[Exchange], list[Queue], list[Binding]]:
    """The delay levels' exchanges, queues and bindings (see `amqtask.routing._delay`)."""
    exchanges = [Exchange(names.delay_deliver_exchange, "topic")]
    queues, bindings = [], []
    for level in reversed(range(DELAY_LEVELS)):
        name = names.delay_level(level)
        exchanges.append(Exchange(name, "topic"))
        queues.append(
            Queue(
                name,
                arguments=arguments(
                    {
                        "x-queue-type": QueueType.QUORUM.value,
                        "x-message-ttl": level_ttl_ms(level),
                        # No dead-letter routing key: the message keeps its delay key.
                        "x-dead-letter-exchange": names.after_level(level),
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": Overflow.REJECT_PUBLISH.value,
                        **placement.arguments(),
                    }
                ),
            )
        )
        bindings.append(Binding(name, name, level_pattern(level, "1")))
        bindings.append(
            Binding(name, names.after_level(level), level_pattern(level, "0"), to_exchange=True)
        )
    return exchanges, queues, bindings


def scheduler_queue(names: Names, placement: Placement = Placement()) -> Queue:
    """The schedulers' queue: a log of the schedules' state, whose single active consumer is
    the one active scheduler (see `amqtask._scheduler`).

    Quorum, so the state survives a node's loss; no delivery limit is set (on RabbitMQ 3.10
    there is none by default), and each takeover rewrites the state anyway, so a record is
    returned by a failing scheduler only a few times before it is replaced.
    """
    args: dict[str, ArgValue] = {
        "x-queue-type": QueueType.QUORUM.value,
        "x-single-active-consumer": True,
        **placement.arguments(),
    }
    return Queue(names.scheduler_queue, arguments=arguments(args))


def derive(
    contracts: Iterable[Contract[Any, Any]],
    names: Names | None = None,
    *,
    revocations: bool = False,
    placement: Placement = Placement(),
    scheduler: bool = False,
) -> Topology:
    """Compute every exchange, queue and binding the contracts need.

    `placement` is the default replica count and leader locator of the quorum queues (work, due
    and dead-letter queues, delay levels); a contract's own `replicas` and `leader_locator` win.

    With `revocations` (an app with a task store), also the namespace's fanout exchange that
    carries revocations to running workers; each worker binds a queue of its own to it.

    With `scheduler` (an app with schedules), also the namespace's scheduler queue.

    Every app also gets the namespace's control exchange, through which `amqtask status` asks
    the running workers how they are (`amqtask._control`); each worker binds a queue of its own.

    Raises `ContractError` when two contracts share a queue but disagree on its arguments, or
    when a contract's queue (or a queue derived from it) takes a name amqtask derives for
    something else: another queue's due, dead-letter or call queue, or a delay level.

    A contract with transient calls (`calls="transient"`) also gets its work queue's call queue
    (see `call_queue`), bound to the task exchange with the call routing key.
    """
    names = names or Names()
    contracts = list(contracts)
    delay_exchanges, delay_queues, delay_bindings = delay_levels(names, placement)
    exchanges = (
        Exchange(names.task_exchange, "direct"),
        Exchange(names.dead_letter_exchange, "direct"),
        *delay_exchanges,
        *((Exchange(names.revoke_exchange, "fanout"),) if revocations else ()),
        Exchange(names.control_exchange, "fanout"),
    )
    reserved = _reserved_names(contracts, names)
    if scheduler:
        reserved[names.scheduler_queue] = (f"the scheduler queue of {names.namespace!r}", None)
    queues: dict[str, tuple[Queue, Contract[Any, Any]]] = {}
    bindings: dict[Binding, None] = {}
    retired: dict[Binding, None] = {}
    for contract in contracts:
        _check_not_reserved(contract, reserved)
        for queue in (
            work_queue(contract, names, placement),
            due_queue(contract, names, placement),
            dead_letter_queue(contract, placement),
            *((call_queue(contract, names),) if contract.calls is Calls.TRANSIENT else ()),
        ):
            seen = queues.setdefault(queue.name, (queue, contract))
            if seen[0] != queue:
                raise ContractError(
                    f"queue {queue.name!r} is shared by {seen[1].name!r} and {contract.name!r} "
                    f"with different settings: {dict(seen[0].arguments)} != {dict(queue.arguments)}"
                )
        bindings[Binding(names.task_exchange, contract.queue, contract.routing_key)] = None
        if contract.calls is Calls.TRANSIENT:
            calls = call_routing_key(contract.name, contract.version)
            bindings[Binding(names.task_exchange, call_queue_name(contract.queue), calls)] = None
        # The delay key ends in the work queue's name; its last hop goes to the due queue.
        deliver = deliver_pattern(contract.queue)
        bindings[Binding(names.delay_deliver_exchange, due_queue_name(contract.queue), deliver)] = (
            None
        )
        # Before due queues, delayed messages were delivered to the work queue itself: left in
        # place, that binding would deliver each delayed task twice.
        retired[Binding(names.delay_deliver_exchange, contract.queue, deliver)] = None
        bindings[
            Binding(
                names.dead_letter_exchange,
                dead_letter_queue_name(contract.queue),
                contract.queue,
            )
        ] = None
    return Topology(
        exchanges=exchanges,
        queues=(
            *(queue for queue, _ in queues.values()),
            *delay_queues,
            *((scheduler_queue(names, placement),) if scheduler else ()),
        ),
        bindings=(*bindings, *delay_bindings),
        names=names,
        retired=tuple(binding for binding in retired if binding not in bindings),
    )


def _reserved_names(
    contracts: Iterable[Contract[Any, Any]], names: Names
) -> dict[str, tuple[str, str | None]]:
    """Queue names amqtask derives: each with what it is and the work queue it belongs to."""
    reserved: dict[str, tuple[str, str | None]] = {
        names.delay_level(level): (f"delay level {level} of namespace {names.namespace!r}", None)
        for level in range(DELAY_LEVELS)
    }
    for contract in contracts:
        owner = f"queue {contract.queue!r} (task {contract.name!r})"
        for name, what in (
            (due_queue_name(contract.queue), "due queue"),
            (dead_letter_queue_name(contract.queue), "dead-letter queue"),
            *_call_queue_of(contract),
        ):
            reserved.setdefault(name, (f"the {what} of {owner}", contract.queue))
    return reserved


def _check_not_reserved(
    contract: Contract[Any, Any], reserved: Mapping[str, tuple[str, str | None]]
) -> None:
    """Raise `ContractError` when the contract's queue, or its due, dead-letter or call queue,
    takes a name reserved for another queue's due, dead-letter or call queue or a delay level."""
    queue = contract.queue
    for subject, name in (
        ("queue", queue),
        (f"queue {queue!r}: its due queue", due_queue_name(queue)),
        (f"queue {queue!r}: its dead-letter queue", dead_letter_queue_name(queue)),
        *((f"queue {queue!r}: its {what}", name) for name, what in _call_queue_of(contract)),
    ):
        what, owner = reserved.get(name, ("", queue))
        if owner != queue:
            raise ContractError(
                f"task {contract.name!r}: {subject} {name!r} clashes with {what}; "
                "pick another queue name"
            )


def _call_queue_of(contract: Contract[Any, Any]) -> tuple[tuple[str, str], ...]:
    """(name, "call queue") for a contract with transient calls, else nothing."""
    if contract.calls is Calls.TRANSIENT:
        return ((call_queue_name(contract.queue), "call queue"),)
    return ()
