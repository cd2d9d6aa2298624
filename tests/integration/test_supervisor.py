"""`amqtask worker --processes N`: a supervisor, its consuming children, shutdown, replacement,
and a fleet that outlives its broker's absence (on a private node)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask

from .conftest import AppFactory, app_env, records, start_worker, wait_for
from .private_node import QUORUM_REGISTRATION_SETTLE, PrivateNode

SLOW_APP = "tests.integration.apps.slow_app:app"


class Job(BaseModel):  # the same shape as tests/integration/apps/slow_app.py's
    n: int


class Supervised:
    """A `--processes` worker process and the JSON log events of it and its children."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.other: list[bytes] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, env: dict[str, str], *args: str) -> Supervised:
        process = await start_worker(
            SLOW_APP, "--processes", "2", *args, env=env, stderr=asyncio.subprocess.PIPE
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            try:
                self.events.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                self.other.append(line)

    def pids(self, event: str) -> list[int]:
        return [e["pid"] for e in self.events if e["event"] == event]

    def count(self, event: str) -> int:
        return sum(e["event"] == event for e in self.events)

    async def stop(self) -> int:
        """SIGTERM the supervisor and return its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        code = await asyncio.wait_for(self.process.wait(), 40)
        await self._reader
        return code

    def __str__(self) -> str:
        return "\n".join([*map(str, self.events), *(line.decode() for line in self.other)])


async def consumers(amqp: AbstractConnection, queue: str) -> int:
    async with amqp.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count or 0


async def test_two_processes_consume_process_every_task_and_stop_gracefully_on_sigterm(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    job = amqtask.contract(f"{unique}.job", Job)
    producer = make_app([job])
    await producer.declare()
    supervised = await Supervised.start(
        app_env(broker_url, unique, record, TEST_SLEEP="0.05"), "--concurrency", "3"
    )

    await wait_for(lambda: supervised.count("worker_process_started") == 2, timeout=30)
    assert await consumers(amqp, job.queue) == 2
    async with producer:
        await asyncio.gather(*(producer.send(job, {"n": n}) for n in range(40)))
    await wait_for(lambda: set(records(record)[1]) == set(range(40)), timeout=30)
    children = supervised.pids("worker_process_started")

    assert await supervised.stop() == 0, supervised
    assert supervised.count("worker_stopped") == 2, supervised  # each child shut down gracefully
    assert supervised.count("supervisor_stopped") == 1
    assert not any(map(_exists, children))  # exited and reaped
    assert await consumers(amqp, job.queue) == 0
    started, done = records(record)
    assert started == done  # nothing cut off


async def test_a_child_killed_with_sigkill_is_replaced(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    job = amqtask.contract(f"{unique}.job", Job)
    producer = make_app([job])
    await producer.declare()
    supervised = await Supervised.start(app_env(broker_url, unique, record, TEST_SLEEP="0.05"))
    await wait_for(lambda: supervised.count("worker_process_started") == 2, timeout=30)
    victim = supervised.pids("worker_process_started")[0]

    os.kill(victim, signal.SIGKILL)
    await wait_for(lambda: victim in supervised.pids("worker_process_died"), timeout=10)
    await wait_for(lambda: supervised.count("worker_process_started") == 3, timeout=30)
    replacement = supervised.pids("worker_process_started")[2]
    assert replacement != victim
    died = next(e for e in supervised.events if e["event"] == "worker_process_died")
    assert died["exit_code"] == -signal.SIGKILL
    await wait_for(lambda: _consumers_are(amqp, job.queue, 2))

    async with producer:
        await asyncio.gather(*(producer.send(job, {"n": n}) for n in range(20)))
    await wait_for(lambda: set(records(record)[1]) == set(range(20)), timeout=30)
    assert await supervised.stop() == 0, supervised
    assert supervised.count("worker_stopped") == 2, supervised


async def test_the_supervisor_exits_1_when_its_children_cannot_start(
    broker_url: str, unique: str, tmp_path: Path
) -> None:
    # Nothing declared: each child refuses to start for want of its queue.
    supervised = await Supervised.start(app_env(broker_url, unique, tmp_path / "record.txt"))

    assert await supervised.wait() == 1, supervised
    assert supervised.count("worker_process_failed_to_start") >= 1, supervised
    assert supervised.count("worker_process_started") == 0
    assert supervised.count("broker_unavailable") == 0  # missing topology: no waiting
    [error] = [line for line in supervised.other if b"failed on its first start" in line]
    assert error.startswith(b"error: worker process "), supervised


@pytest.mark.timeout(300)
async def test_a_fleet_outlives_its_broker_being_down_while_a_child_dies_and_cannot_restart(
    unique: str, tmp_path: Path
) -> None:
    node = PrivateNode()
    supervised = None
    try:
        await asyncio.to_thread(node.start)
        url = node.url + "?reconnect_interval=1"
        record = tmp_path / "record.txt"
        job = amqtask.contract(f"{unique}.job", Job)
        producer = amqtask.App(url, [job], namespace=unique)
        await producer.declare()
        await asyncio.sleep(QUORUM_REGISTRATION_SETTLE)  # before a kill -9 of the node
        # A short start timeout: the replacement gives up waiting for the broker and exits 1
        # before it is ready, again and again, while the broker is down.
        supervised = await Supervised.start(
            app_env(url, unique, record, TEST_SLEEP="0.01"), "--start-timeout", "2"
        )
        await wait_for(lambda: supervised.count("worker_process_started") == 2, timeout=30)
        survivor, victim = supervised.pids("worker_process_started")

        await asyncio.to_thread(node.kill)
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: victim in supervised.pids("worker_process_died"), timeout=10)
        await wait_for(lambda: supervised.count("worker_process_failed_to_start") >= 2, timeout=60)

        assert supervised.process.returncode is None, supervised  # the supervisor carries on
        assert supervised.count("supervisor_stopping") == 0, supervised
        assert _exists(survivor)  # and the other child with it
        failed = [e for e in supervised.events if e["event"] == "worker_process_failed_to_start"]
        assert all(e["retry_in"] > 0 and "first_start" not in e for e in failed), supervised
        waited = [e for e in supervised.events if e["event"] == "broker_unavailable"]
        assert waited, supervised  # each replacement waited for the broker, saying so
        assert all(":***@" in e["url"] and "guest:guest" not in e["url"] for e in waited)

        await asyncio.to_thread(node.start)
        await wait_for(lambda: supervised.count("worker_process_started") == 3, timeout=120)
        await wait_for(lambda: _node_consumers_are(node.url, job.queue, 2), timeout=60)
        async with producer:
            await asyncio.gather(*(producer.send(job, {"n": n}) for n in range(20)))
        await wait_for(lambda: set(records(record)[1]) == set(range(20)), timeout=60)

        print(
            f"\nreplacement failures while the broker was down: {len(failed)}, "
            f"waits logged: {len(waited)}"
        )
        assert await supervised.stop() == 0, supervised
        assert supervised.count("supervisor_stopped") == 1
    finally:
        if supervised is not None and supervised.process.returncode is None:
            await supervised.stop()
        await asyncio.to_thread(node.cleanup)


async def _node_consumers_are(url: str, queue: str, expected: int) -> bool:
    connection = await aio_pika.connect(url)
    async with connection:
        return await consumers(connection, queue) == expected


async def _consumers_are(amqp: AbstractConnection, queue: str, expected: int) -> bool:
    return await consumers(amqp, queue) == expected


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
