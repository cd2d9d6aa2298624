"""`amqtask status` against real brokers: AMQP on the shared node, the management API on a
private node with the `rabbitmq_management` plugin (never enabled on the shared node)."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from pydantic import BaseModel

import amqtask
from amqtask import _status

from .conftest import (
    AppFactory,
    delete_topology,
    depth_is,
    run_amqtask,
    wait_for,
    write_app_module,
)
from .private_node import PrivateNode, _free_port


class Job(BaseModel):
    n: int


def write_app(tmp_path: Path, url: str, unique: str) -> str:
    """An app module with the test's task and a second one whose queue was never declared."""
    return write_app_module(
        tmp_path,
        url,
        unique,
        job=f'amqtask.contract("{unique}.job", Job)',
        ghost=f'amqtask.contract("{unique}.ghost", Job)',
    )


def status(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_amqtask(tmp_path, "status", *args)


def samples(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def put_known_numbers(
    app: amqtask.App, job: amqtask.Contract[Job, None], amqp: AbstractConnection
) -> None:
    """3 ready tasks, 2 dead letters, 1 delayed task."""
    await app.declare()
    async with app:
        for n in range(3):
            await app.send(job, Job(n=n))
        await app.send(job, Job(n=99), delay=600)  # waits in the delay levels for 10 minutes
    async with amqp.channel() as channel:
        for n in range(2):
            await channel.default_exchange.publish(
                aio_pika.Message(b'{"n": -1}', message_id=f"dead-{n}"),
                routing_key=f"{job.queue}.dead",
            )
    await wait_for(lambda: depth_is(amqp, job.queue, 3))
    await wait_for(lambda: depth_is(amqp, f"{job.queue}.dead", 2))


async def hold_one_unacked(
    amqp: AbstractConnection, queue: str
) -> tuple[aio_pika.abc.AbstractChannel, list[AbstractIncomingMessage]]:
    """A consumer with prefetch 1 that never acks: one delivery stays unacked."""
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=1)
    held: list[AbstractIncomingMessage] = []

    async def keep(message: AbstractIncomingMessage) -> None:
        held.append(message)

    await (await channel.get_queue(queue)).consume(keep)
    await wait_for(lambda: len(held) == 1)
    return channel, held


async def test_status_over_amqp_counts_ready_dead_delayed_and_consumers(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await put_known_numbers(app, job, amqp)
    target = write_app(tmp_path, broker_url, unique)

    (before,) = samples(status(tmp_path, target, "--json"))
    channel, _ = await hold_one_unacked(amqp, job.queue)
    try:
        (during,) = samples(status(tmp_path, target, "--json"))
        text = status(tmp_path, target)
    finally:
        await channel.close()

    assert before["source"] == "amqp"
    ghost, task = before["tasks"]  # by task name
    assert task["task"] == job.name
    assert (task["exists"], task["ready"], task["consumers"], task["dead_letters"]) == (
        True,
        3,
        0,
        2,
    )
    # AMQP cannot see unacked deliveries: unknown, and the output says so.
    assert task["unacked"] is None
    assert before["notes"] == [_status.UNKNOWN_OVER_AMQP]
    assert before["delayed"] == {
        "messages": 1,
        "dead_letter_pending": None,  # unknown over AMQP
        "levels": 20,
        "missing_levels": [],
    }
    assert (task["due_queue"], task["due"], task["dead_letter_pending"]) == (
        f"{job.queue}.due",
        0,
        None,
    )
    # A queue that does not exist is reported, not crashed on.
    assert ghost["task"] == f"{unique}.ghost"
    assert (ghost["exists"], ghost["ready"], ghost["dead_letters"]) == (False, None, None)

    task = during["tasks"][1]
    assert (task["ready"], task["consumers"], task["unacked"]) == (2, 1, None)

    assert text.returncode == 0, text.stderr
    assert f"{job.name} v1" in text.stdout
    assert f"missing queue(s): {unique}.ghost: run amqtask declare" in text.stdout
    assert "delayed: 1 message(s)" in text.stdout
    assert "in/out rates, and each quorum queue's leader" in text.stdout
    assert text.stdout.count("dl-pending") >= 2  # the column and the delay levels' line


async def test_status_watch_samples_repeatedly_and_falls_back_without_management(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await put_known_numbers(app, job, amqp)
    target = write_app(tmp_path, broker_url, unique)
    unreachable = f"http://guest:guest@127.0.0.1:{closed_port()}"

    result = status(
        tmp_path,
        target,
        "--json",
        "--watch",
        "0.3",
        "--count",
        "2",
        "--management-url",
        unreachable,
    )

    first, second = samples(result)
    assert "cannot reach the management API" in result.stderr
    assert first["source"] == second["source"] == "amqp"
    assert "falling back to AMQP" in first["warnings"][0]
    assert first["interval"] is None
    assert second["interval"] >= 0.3
    assert second["tasks"][1]["ready"] == 3
    assert second["tasks"][1]["rates"] == {"in": None, "out": None, "net": 0.0}


# --- the management API, on a private node ----------------------------------------------------


@pytest.fixture
def management_node() -> Iterator[tuple[PrivateNode, str]]:
    """A private node with the management plugin on a free port, statistics every second."""
    node = PrivateNode()
    port = _free_port({node.port, node.dist_port})
    (node.base_dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
    with (node.base_dir / "rabbitmq.conf").open("a") as conf:
        conf.write(
            f"management.tcp.port = {port}\n"
            "management.tcp.ip = 127.0.0.1\n"
            "collect_statistics_interval = 1000\n"
        )
    with node:
        yield node, f"http://guest:guest@127.0.0.1:{port}"


async def test_status_with_the_management_api_reports_unacked_and_rates(
    management_node: tuple[PrivateNode, str], unique: str, tmp_path: Path
) -> None:
    node, management_url = management_node
    job = amqtask.contract(f"{unique}.job", Job)
    app = amqtask.App(node.url, [job], namespace=unique)
    amqp = await aio_pika.connect(node.url)
    try:
        await put_known_numbers(app, job, amqp)
        channel, _ = await hold_one_unacked(amqp, job.queue)
        management = _status.Management.from_urls(management_url, node.url)

        # The broker publishes queue statistics periodically (a new quorum queue's first ones
        # can take several seconds): wait until they show the consumer's delivery.
        async def settled() -> bool:
            async with _status.Sampler(app, management) as sampler:
                sample = await sampler.sample()
            stats = sample.queues[job.queue]
            return stats.unacked == 1 and stats.delivered == 1 and stats.published == 3

        await wait_for(settled, timeout=40, interval=0.5)
        target = write_app(tmp_path, node.url, unique)
        (once,) = samples(status(tmp_path, target, "--json", "--management-url", management_url))
        watched = samples(
            status(
                tmp_path,
                target,
                "--json",
                "--management-url",
                management_url,
                "--watch",
                "0.5",
                "--count",
                "2",
            )
        )
        await channel.close()
    finally:
        await amqp.close()
        await delete_topology(node.url, app.topology)

    assert once["source"] == "amqp+management"
    assert once["notes"] == []
    task = once["tasks"][1]
    assert (task["ready"], task["unacked"], task["consumers"], task["dead_letters"]) == (2, 1, 1, 2)
    # One sample: the broker's own rates, numbers rather than unknown.
    assert all(isinstance(task["rates"][key], float) for key in ("in", "out"))
    assert once["delayed"]["messages"] == 1
    # Two samples: rates from the counters' difference (no traffic meanwhile: 0 msgs/s).
    assert watched[1]["tasks"][1]["rates"] == {"in": 0.0, "out": 0.0, "net": 0.0}
    assert watched[1]["interval"] >= 0.5


def test_status_exits_1_when_the_broker_cannot_be_reached(tmp_path: Path, unique: str) -> None:
    target = write_app(tmp_path, f"amqp://guest:guest@127.0.0.1:{closed_port()}/", unique)

    result = status(tmp_path, target)

    assert result.returncode == 1
    assert "cannot reach the broker" in result.stderr
    assert "Traceback" not in result.stderr


async def test_status_with_the_management_api_counts_messages_held_in_dead_letter_hand_over(
    management_node: tuple[PrivateNode, str], unique: str, tmp_path: Path
) -> None:
    # At-least-once dead-lettering keeps a message in its source queue until a target took it;
    # with no target (deleted here; in production a full queue or a lost leader) it stays there,
    # neither ready nor unacked.
    node, management_url = management_node
    job = amqtask.contract(f"{unique}.job", Job)
    app = amqtask.App(node.url, [job], namespace=unique)
    amqp = await aio_pika.connect(node.url)
    try:
        await app.declare()
        async with amqp.channel() as channel:
            await channel.queue_delete(f"{job.queue}.dead")
            await channel.queue_delete(f"{job.queue}.due")
        async with app:
            await app.send(job, Job(n=1))  # rejected below: its dead letter finds no queue
            await app.send(job, Job(n=2), delay=1)  # comes due: its due queue is gone
        async with amqp.channel() as channel:
            queue = await channel.get_queue(job.queue)
            message = await queue.get(timeout=5)
            assert message is not None
            await message.reject(requeue=False)
        management = _status.Management.from_urls(management_url, node.url)

        async def held() -> dict[str, Any]:
            async with _status.Sampler(app, management) as sampler:
                return _status.report(app.contracts, app.names, await sampler.sample())

        async def both_seen() -> bool:
            data = await held()
            task = data["tasks"][0]
            return bool(task["dead_letter_pending"] == 1 and data["delayed"]["dead_letter_pending"])

        await wait_for(both_seen, timeout=40, interval=0.5)
        data = await held()
        async with _status.Sampler(app) as sampler:
            over_amqp = _status.report(app.contracts, app.names, await sampler.sample())
        text = _status.render(data)
    finally:
        await amqp.close()
        await delete_topology(node.url, app.topology)

    assert data["tasks"][0]["ready"] == 0
    assert data["delayed"]["dead_letter_pending"] == 1
    assert data["delayed"]["messages"] == 0  # a held message is not waiting out a delay
    assert "dl-pending in the delay levels: 1 " in text
    # Over AMQP the same messages are invisible: unknown, never 0.
    assert over_amqp["tasks"][0]["dead_letter_pending"] is None
    assert over_amqp["delayed"]["dead_letter_pending"] is None
