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

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection

from amqtask._exceptions import TopologyConflict, TopologyMissing
from amqtask.topology._model import Binding, Exchange, Queue, Topology
from amqtask.topology._plan import (
    Observation,
    ObservationKey,
    Plan,
    make_plan,
    parse_precondition,
)


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
    try:
        async with connection.channel(publisher_confirms=False) as channel:
            await _declare(channel, entity, passive=False)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        conflict = parse_precondition(str(exc.args[0] if exc.args else exc), entity)
        if conflict is None:
            raise
        return Observation(exists=True, conflict=conflict)
    return Observation(exists=True)


async def observe(connection: AbstractConnection, topology: Topology) -> Plan:
    """Read the broker's state of every exchange and queue and return the plan. Changes nothing."""
    observed: dict[ObservationKey, Observation] = {}
    for entity in (*topology.exchanges, *topology.queues):
        observed[(entity.kind, entity.name)] = await _probe(connection, entity)
    return make_plan(topology, observed)


async def apply(connection: AbstractConnection, plan: Plan) -> None:
    """Declare the plan's missing entities and re-assert its bindings.

    Raises `TopologyConflict` (changing nothing) when the plan holds a conflict.
    """
    if plan.conflicts:
        raise TopologyConflict(plan.conflicts)
    async with connection.channel(publisher_confirms=False) as channel:
        raw = await channel.get_underlay_channel()
        for entity in plan.to_apply:
            if isinstance(entity, Binding):
                await raw.queue_bind(
                    queue=entity.queue, exchange=entity.exchange, routing_key=entity.routing_key
                )
            else:
                await _declare(channel, entity, passive=False)


async def ensure_exists(
    connection: AbstractConnection, topology: Topology, queues: Iterable[str]
) -> None:
    """Raise `TopologyMissing` unless the named queues and the exchanges exist (passive only)."""
    missing = []
    wanted = [*topology.exchanges, *(topology.queue(name) for name in queues)]
    for entity in wanted:
        try:
            async with connection.channel(publisher_confirms=False) as channel:
                await _declare(channel, entity, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            missing.append(f"{entity.kind} {entity.name!r}")
    if missing:
        raise TopologyMissing(missing)
