"""Asking running workers how they are over the control exchange, against the real broker:
`amqtask status`'s Workers section and `inspect_workers`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

import amqtask
from amqtask._control import inspect_workers
from amqtask._transport import AioPikaTransport
from tests import pool_handlers as h

from .conftest import AppFactory, dead_letters, running, wait_for, write_app_module
from .proxy import start_proxy

NO_RETRY = amqtask.Retry(attempts=1)


async def amqtask_cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """`python -m amqtask ARGS` in a subprocess, without blocking this event loop (the workers
    under test run on it and must answer meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqtask",
        *args,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def status_json(tmp_path: Path, target: str, *args: str) -> dict[str, Any]:
    code, stdout, stderr = await amqtask_cli(tmp_path, "status", target, "--json", *args)
    assert code == 0, stderr
    data: dict[str, Any] = json.loads(stdout)
    return data


def status_app(tmp_path: Path, broker_url: str, unique: str, *tasks: str) -> str:
    """An app module on the test's namespace with these tasks (the workers' contracts)."""
    return write_app_module(
        tmp_path,
        broker_url,
        unique,
        **{f"t{i}": f'amqtask.contract("{task}", Job)' for i, task in enumerate(tasks)},
    )


async def test_status_shows_the_pool_children_crashed_and_killed_at_their_time_limit_and_replaced(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    crash = amqtask.contract(f"{unique}.crash", h.Job, retry=NO_RETRY)
    stuck = amqtask.contract(f"{unique}.stuck", h.Job, retry=NO_RETRY, time_limit=1.0)
    app = make_app([crash, stuck])
    app.handler(crash)(h.exit_now)  # the child exits mid-task
    app.handler(stuck)(h.spin)  # a CPU loop: the child is killed at 1 s
    await app.declare()
    target = status_app(tmp_path, broker_url, unique, crash.name, stuck.name)
    async with running(app, pool="process", concurrency=2), make_app([crash, stuck]) as producer:
        await producer.send(crash, h.Job(n=1))
        await producer.send(stuck, h.Job(n=2))
        (crashed,) = await dead_letters(amqp, crash.queue, 1)
        (killed,) = await dead_letters(amqp, stuck.queue, 1)

        async def both_replaced() -> bool:
            replies = await inspect_workers(producer, timeout=0.5)
            return len(replies) == 1 and replies[0]["pool"]["alive"] == 2

        await wait_for(both_replaced, timeout=60)
        data = await status_json(tmp_path, target)

    assert crashed.headers["amqtask-reason"] == "crashed"
    assert killed.headers["amqtask-reason"] == "time_limit"
    (worker,) = data["workers"]
    assert worker["pool"] == {
        "size": 2,
        "alive": 2,
        "busy": 0,
        "recycled": 0,
        "crashed": 1,
        "killed_time_limit": 1,
    }
    assert worker["pool_type"] == "process"
    assert worker["in_flight"] == 0
    assert sorted(worker["queues"]) == sorted(
        [crash.queue, f"{crash.queue}.due", stuck.queue, f"{stuck.queue}.due"]
    )
    assert worker["processed"] == {"failed": 2}
    assert worker["pid"] == os.getpid()


async def test_a_worker_without_a_pool_answers_pool_null_and_counts_the_delivery_it_holds(
    make_app: AppFactory, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", h.Job)
    app = make_app([job])
    started, release = asyncio.Event(), asyncio.Event()

    @app.handler(job)
    async def blocked(task: h.Job) -> None:
        started.set()
        await release.wait()

    await app.declare()
    target = status_app(tmp_path, broker_url, unique, job.name)
    async with running(app, concurrency=3), make_app([job]) as producer:
        await producer.send(job, h.Job(n=1))
        await asyncio.wait_for(started.wait(), 20)
        data = await status_json(tmp_path, target)
        code, text, stderr = await amqtask_cli(tmp_path, "status", target)
        release.set()

    (worker,) = data["workers"]
    assert worker["pool"] is None
    assert worker["in_flight"] == 1
    assert worker["running"] == 1
    assert worker["concurrency"] == 3
    assert worker["queues"] == [job.queue, f"{job.queue}.due"]
    assert code == 0, stderr
    assert "Workers (1 answered)" in text
    assert f"pid {os.getpid()}" in text
    assert "in flight 1 (prefetch 3)  no process pool" in text


async def test_every_running_worker_answers(make_app: AppFactory, unique: str) -> None:
    job = amqtask.contract(f"{unique}.job", h.Job)
    first, second = make_app([job], name="first"), make_app([job], name="second")
    for app in (first, second):
        app.handler(job)(h.echo_async)
    await first.declare()
    async with running(first), running(second), make_app([job]) as asker:
        replies = await inspect_workers(asker, timeout=1.0)

    assert [reply["name"].split(" worker ")[0] for reply in replies] == ["first", "second"]
    assert all(reply["pool"] is None for reply in replies)


async def test_status_without_a_running_worker_says_no_worker_answered(
    make_app: AppFactory, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", h.Job)
    await make_app([job]).declare()
    target = status_app(tmp_path, broker_url, unique, job.name)

    data = await status_json(tmp_path, target, "--inspect-timeout", "0.5")
    skipped = await status_json(tmp_path, target, "--no-inspect")
    code, text, stderr = await amqtask_cli(tmp_path, "status", target)

    assert data["workers"] == []
    assert skipped["workers"] is None
    assert code == 0, stderr
    assert "Workers: no worker answered within 1 s" in text


async def test_status_of_a_user_who_may_not_publish_to_the_control_exchange_says_why(
    make_app: AppFactory, broker_url: str, unique: str, tmp_path: Path
) -> None:
    from urllib.parse import urlsplit, urlunsplit

    job = amqtask.contract(f"{unique}.job", h.Job)
    await make_app([job]).declare()
    user, password = f"{unique}-reader", "reader-pw"
    parts = urlsplit(broker_url)
    vhost = parts.path.lstrip("/") or "/"
    ctl = ["rabbitmqctl", "-q"]

    async def rabbitmqctl(*args: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *ctl, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, (args, out, err)

    await rabbitmqctl("add_user", user, password)
    try:
        # Configure and read everything, write nothing: no publish to the control exchange.
        await rabbitmqctl("set_permissions", "-p", vhost, user, ".*", "", ".*")
        netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"
        reader_url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        target = status_app(tmp_path, reader_url, unique, job.name)
        code, text, stderr = await amqtask_cli(tmp_path, "status", target)
        data_code, data_text, data_err = await amqtask_cli(tmp_path, "status", target, "--json")
        watch = await amqtask_cli(tmp_path, "status", target, "--watch", "0.1", "--count", "2")
    finally:
        await rabbitmqctl("delete_user", user)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert job.name in text
    assert "Workers: not inspected (ACCESS_REFUSED" in text
    assert data_code == 0, data_err
    data = json.loads(data_text)
    assert data["workers"] is None
    assert "ACCESS_REFUSED" in data["workers_error"]
    assert watch[0] == 0, watch[2]
    assert watch[1].count("Workers: not inspected") == 2


async def test_a_worker_on_an_app_declared_without_the_control_exchange_runs_on(
    make_app: AppFactory, broker_url: str, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", h.Job, returns=h.Done)
    app = make_app([job])
    app.handler(job)(h.echo_async)
    await app.declare()
    connection = await aio_pika.connect(broker_url)
    async with connection, connection.channel() as channel:
        await channel.exchange_delete(app.names.control_exchange)  # as an older declare left it

    async with running(app), make_app([job]) as caller:
        done = await caller.call(job, h.Job(n=7), timeout=20)
        replies = await inspect_workers(caller, timeout=0.5)

    assert done.n == 7
    assert replies == []


@pytest.mark.parametrize(
    "request_body",
    [b"not json", b'{"op": "shutdown"}', b'{"op": "inspect"}'],
    ids=["malformed", "unknown-op", "no-reply-to"],
)
async def test_a_request_a_worker_cannot_answer_is_ignored_and_the_worker_answers_the_next(
    make_app: AppFactory, broker_url: str, unique: str, request_body: bytes
) -> None:
    job = amqtask.contract(f"{unique}.job", h.Job)
    app = make_app([job])
    app.handler(job)(h.echo_async)
    await app.declare()
    async with running(app), make_app([job]) as asker:
        connection = await aio_pika.connect(broker_url)
        async with connection, connection.channel() as channel:
            exchange = await channel.get_exchange(app.names.control_exchange)
            await exchange.publish(aio_pika.Message(request_body), routing_key="")
        replies = await inspect_workers(asker, timeout=1.0)

    assert len(replies) == 1


async def test_a_worker_answers_again_once_its_cut_connection_is_restored(
    make_app: AppFactory, broker_url: str, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", h.Job)
    await make_app([job]).declare()
    proxy, through_proxy = await start_proxy(broker_url)
    try:
        url = through_proxy.split("?")[0] + "?reconnect_interval=1"
        worker_app = make_app([job], transport=AioPikaTransport(url, name="worker"))
        worker_app.handler(job)(h.echo_async)
        async with running(worker_app), make_app([job]) as asker:
            before = await inspect_workers(asker, timeout=1.0)
            connection = worker_app.transport.connection  # type: ignore[attr-defined]
            first = connection.transport  # the AMQP connection under the robust one
            proxy.cut()
            # Reconnected: a new AMQP connection (the old one was cut), open.
            await wait_for(lambda: connection.transport not in (None, first), timeout=30)

            async def answers() -> bool:
                return len(await inspect_workers(asker, timeout=0.5)) == 1

            await wait_for(answers, timeout=30)
    finally:
        await proxy.close()

    assert len(before) == 1
