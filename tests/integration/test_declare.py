"""`amqtask declare` and App.plan/declare against the real broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask.topology import State

from .conftest import (
    AppFactory,
    delete_topology,
    depth_is,
    queue_depth,
    run_amqtask,
    wait_for,
    write_app_module,
)


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
    # The deliver binding an earlier version made to the work queue is unbound on every
    # declare: AMQP cannot tell whether it exists, and unbinding an absent one is a no-op.
    assert {step.state for step in second.steps} == {
        State.UP_TO_DATE,
        State.UNVERIFIED,
        State.REMOVED,
    }
    assert second.to_remove == app.topology.retired


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


async def test_declare_removes_the_deliver_binding_to_the_work_queue_an_earlier_version_made(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    # A broker declared before due queues: delayed tasks were delivered to the work queue.
    (old,) = app.topology.retired
    async with amqp.channel() as channel:
        queue = await channel.get_queue(job.queue)
        await queue.bind(old.exchange, old.routing_key)

    plan = await app.declare()
    async with app:
        await app.send(job, Job(n=1), delay=1)
    await wait_for(lambda: depth_is(amqp, f"{job.queue}.due", 1), timeout=10)
    await asyncio.sleep(1.0)  # a second copy would have reached the work queue by now

    assert plan.to_remove == (old,)
    assert f"- binding  {old.name}  [removed]" in plan.render()
    assert await queue_depth(amqp, job.queue) == 0
    assert await queue_depth(amqp, f"{job.queue}.due") == 1


async def test_a_worker_refuses_to_start_until_the_due_queues_are_declared(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    async with amqp.channel() as channel:
        await channel.queue_delete(f"{job.queue}.due")  # as on a broker declared before them

    @app.handler(job)
    async def handle(task: Job) -> None:
        pass

    with pytest.raises(amqtask.TopologyMissing, match=rf"{job.queue}\.due.*amqtask declare"):
        await amqtask.Worker(app).start()


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
    ]
    due = next(e for e in dry_plan["entities"] if e["name"] == f"{unique}.job.due")
    assert "x-max-length" not in due["arguments"]
    assert due["bindings"] == [
        {"exchange": f"{unique}.delay.deliver", "routing_key": "*." * 20 + f"{unique}.job"},
    ]

    assert first.returncode == 0, first.stderr
    assert f"applied: created {len(app_topology.entities)}" in first.stdout

    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["summary"] == {"missing": 0, "conflicts": 0, "removed": 1, "up_to_date": True}
    assert {e["state"] for e in again["entities"]} == {"up-to-date", "unverified", "removed"}


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
