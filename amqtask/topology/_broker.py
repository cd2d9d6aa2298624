"""The only I/O in topology/: observe the broker and apply a plan over AMQP.

AMQP 0-9-1 has no "describe" method. An entity's existence is read with a passive declare; its
arguments are checked by redeclaring it with the desired ones, which is a no-op when they are equal
and a PRECONDITION_FAILED (406) naming the first differing argument when they are not. Either
failure closes the channel, so every probe runs on a short-lived channel of its own.

RabbitMQ 3.10 compares only the arguments the queue's type knows; an unknown one that differs is
silently ignored on redeclare, so it cannot be seen here (the management API shows it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection

from amqtask._exceptions import Conflict, TopologyConflict, TopologyMissing
from amqtask.topology._model import Binding, Exchange, Queue, Topology, arguments
from amqtask.topology._plan import (
    Observation,
    ObservationKey,
    Plan,
    make_plan,
    parse_precondition,
)

_MAX_CONFLICTS = 32  # more differing arguments than a queue can have: stop rather than loop


async def _declare(channel: AbstractChannel, entity: Exchange | Queue, *, passive: bool) -> None:
    if isinstance(entity, Exchange):
        await channel.declare_exchange(
            entity.name,
            aio_pika.ExchangeType(entity.type),
            durable=entity.durable,
            arguments=dict(entity.arguments),
            passive=passive,
        )
    else:
        await channel.declare_queue(
            entity.name,
            durable=entity.durable,
            arguments=dict(entity.arguments),
            passive=passive,
        )


async def _probe(connection: AbstractConnection, entity: Exchange | Queue) -> Observation:
    try:
        async with connection.channel(publisher_confirms=False) as channel:
            await _declare(channel, entity, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return Observation(exists=False)
    # The broker names one differing argument at a time: redeclare with the broker's value in
    # its place to find the next one, until the declaration matches.
    conflicts: list[Conflict] = []
    probe = entity
    for _ in range(_MAX_CONFLICTS):
        try:
            async with connection.channel(publisher_confirms=False) as channel:
                await _declare(channel, probe, passive=False)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            conflict = parse_precondition(str(exc.args[0] if exc.args else exc), entity)
            if conflict is None or conflict in conflicts:
                raise
            conflicts.append(conflict)
            probe = _with_broker_value(probe, conflict)
        else:
            break
    return Observation(exists=True, conflicts=tuple(conflicts))


def _with_broker_value(entity: Exchange | Queue, conflict: Conflict) -> Exchange | Queue:
    if conflict.argument in ("type", "durable") and isinstance(entity, Exchange):
        return replace(entity, **{conflict.argument: conflict.actual})
    if conflict.argument == "durable":
        return replace(entity, durable=bool(conflict.actual))
    args = {k: v for k, v in entity.arguments if k != conflict.argument}
    if conflict.actual is not None:
        args[conflict.argument] = conflict.actual
    return replace(entity, arguments=arguments(args))


async def observe(connection: AbstractConnection, topology: Topology) -> Plan:
    """Read the broker's state of every exchange and queue and return the plan. Changes nothing."""
    observed: dict[ObservationKey, Observation] = {}
    declared: tuple[Exchange | Queue, ...] = (*topology.exchanges, *topology.queues)
    for entity in declared:
        observed[(entity.kind, entity.name)] = await _probe(connection, entity)
    return make_plan(topology, observed)


async def apply(connection: AbstractConnection, plan: Plan) -> None:
    """Declare the plan's missing entities, re-assert its bindings, then remove retired ones.

    Retired bindings go last: until the bindings replacing them exist, a message they would
    route could otherwise find no queue, and a dead-lettered message that finds none is dropped.
    Unbinding is idempotent on RabbitMQ (3.10: a binding, queue or exchange that is absent
    answers unbind-ok), so a retired binding that is already gone costs nothing.
    Raises `TopologyConflict` (changing nothing) when the plan holds a conflict.
    """
    if plan.conflicts:
        raise TopologyConflict(plan.conflicts)
    async with connection.channel(publisher_confirms=False) as channel:
        raw = await channel.get_underlay_channel()
        for entity in plan.to_apply:
            if isinstance(entity, Binding) and entity.to_exchange:
                await raw.exchange_bind(
                    destination=entity.queue, source=entity.exchange, routing_key=entity.routing_key
                )
            elif isinstance(entity, Binding):
                await raw.queue_bind(
                    queue=entity.queue, exchange=entity.exchange, routing_key=entity.routing_key
                )
            else:
                await _declare(channel, entity, passive=False)
        for binding in plan.to_remove:
            if binding.to_exchange:
                await raw.exchange_unbind(
                    destination=binding.queue,
                    source=binding.exchange,
                    routing_key=binding.routing_key,
                )
            else:
                await raw.queue_unbind(
                    queue=binding.queue, exchange=binding.exchange, routing_key=binding.routing_key
                )


async def ensure_exists(
    connection: AbstractConnection, topology: Topology, queues: Iterable[str]
) -> None:
    """Raise `TopologyMissing` unless the named queues and the exchanges exist (passive only)."""
    missing = []
    wanted: list[Exchange | Queue] = [*topology.exchanges, *(topology.queue(n) for n in queues)]
    for entity in wanted:
        try:
            async with connection.channel(publisher_confirms=False) as channel:
                await _declare(channel, entity, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            missing.append(f"{entity.kind} {entity.name!r}")
    if missing:
        raise TopologyMissing(missing)
