"""`amqtask declare` and App.plan/declare against the real broker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask.topology import State

from .conftest import AppFactory, delete_topology, run_amqtask, write_app_module


class Job(BaseModel):
    n: int


async def test_declare_creates_everything_then_changes_nothing_the_second_time(
    make_app: AppFactory, unique: str
) -> None:
    app = make_app([amqtask.contract(f"{unique}.job", Job)])

    first = await app.declare()
    second = await app.plan()

    assert {step.entity.name for step in first.steps if step.state is State.MISSING} == {
        entity.name for entity in app.topology.entities
    }
    assert second.missing == ()
    assert second.conflicts == ()
    assert {step.state for step in second.steps} == {State.UP_TO_DATE, State.UNVERIFIED}


async def test_declare_dry_run_changes_nothing(make_app: AppFactory, unique: str) -> None:
    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    # plan() is what --dry-run prints: observing must not create anything.
    await app.plan()
    plan = await app.plan()
    assert set(plan.missing) == set(app.topology.entities)


async def test_conflicting_queue_argument_is_reported_not_crashed_on(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    bounded = amqtask.contract(f"{unique}.job", Job, max_length=10)
    app = make_app([bounded])
    async with amqp.channel() as channel:
        await channel.declare_queue(
            bounded.queue, durable=True, arguments={"x-queue-type": "quorum", "x-max-length": 99}
        )

    plan = await app.plan()
    with pytest.raises(amqtask.TopologyConflict) as caught:
        await app.declare()

    error = caught.value
    assert {c.entity for c in error.conflicts} == {bounded.queue}
    # Every differing argument is named with both values, not only the first the broker saw.
    found = {c.argument: (c.expected, c.actual) for c in error.conflicts}
    assert found["x-max-length"] == (10, 99)
    assert found["x-dead-letter-exchange"] == (app.names.dead_letter_exchange, None)
    assert f"queue {bounded.queue!r}: argument 'x-max-length' is 99 on the broker" in str(error)
    assert plan.conflicts == error.conflicts
    # Nothing was applied: the exchanges the plan wanted are still missing.
    assert (await app.plan()).missing == plan.missing


async def test_conflicting_exchange_type_is_reported(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    async with amqp.channel() as channel:
        await channel.declare_exchange(app.names.task_exchange, "topic", durable=True)

    with pytest.raises(amqtask.TopologyConflict) as caught:
        await app.declare()

    assert (caught.value.entity, caught.value.argument) == (app.names.task_exchange, "type")
    assert (caught.value.expected, caught.value.actual) == ("direct", "topic")


# --- the command ------------------------------------------------------------------------------


def _write_app_module(tmp_path: Path, broker_url: str, unique: str, max_length: int) -> str:
    return write_app_module(
        tmp_path,
        broker_url,
        unique,
        job=f'amqtask.contract("{unique}.job", Job, max_length={max_length})',
    )


def _declare(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_amqtask(tmp_path, "declare", *args)


async def test_declare_command_is_idempotent_and_prints_json(
    tmp_path: Path, broker_url: str, unique: str
) -> None:
    target = _write_app_module(tmp_path, broker_url, unique, 5)
    app_topology = amqtask.topology.derive(
        [amqtask.contract(f"{unique}.job", Job, max_length=5)], amqtask.routing.Names(unique)
    )
    try:
        dry = _declare(tmp_path, target, "--dry-run", "--json")
        first = _declare(tmp_path, target)
        second = _declare(tmp_path, target, "--json")
    finally:
        await delete_topology(broker_url, app_topology)

    assert dry.returncode == 0, dry.stderr
    dry_plan = json.loads(dry.stdout)
    assert dry_plan["applied"] is False
    assert {e["state"] for e in dry_plan["entities"]} == {"missing"}
    queue = next(e for e in dry_plan["entities"] if e["name"] == f"{unique}.job")
    assert queue["kind"] == "queue"
    assert queue["type"] == "quorum"
    assert queue["durable"] is True
    assert queue["arguments"]["x-max-length"] == 5
    assert queue["bindings"] == [
        {"exchange": f"{unique}.tasks", "routing_key": f"{unique}.job.v1"},
        {"exchange": f"{unique}.delay.deliver", "routing_key": "*." * 20 + f"{unique}.job"},
    ]

    assert first.returncode == 0, first.stderr
    assert f"applied: created {len(app_topology.entities)}" in first.stdout

    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["summary"] == {"missing": 0, "conflicts": 0, "up_to_date": True}
    assert {e["state"] for e in again["entities"]} == {"up-to-date", "unverified"}


async def test_declare_command_conflict_exits_1_naming_entity_argument_and_values(
    tmp_path: Path, broker_url: str, unique: str, amqp: AbstractConnection
) -> None:
    target = _write_app_module(tmp_path, broker_url, unique, 5)
    async with amqp.channel() as channel:
        await channel.declare_queue(
            f"{unique}.job", durable=True, arguments={"x-queue-type": "quorum", "x-max-length": 7}
        )
    try:
        result = _declare(tmp_path, target)
    finally:
        async with amqp.channel() as channel:
            await channel.queue_delete(f"{unique}.job")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"queue '{unique}.job'" in result.stderr
    assert "'x-max-length' is 7 on the broker but the contracts want 5" in result.stderr
    assert "[conflict]" in result.stdout
