"""`amqtask purge`, `amqtask workers`, `amqtask worker --reload --log-config`, and task names the
app does not know, against real brokers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask

from .conftest import (
    AppFactory,
    delete_topology,
    queue_depth,
    run_amqtask,
    wait_for,
    write_app_module,
)
from .private_node import PrivateNode, _free_port


class Job(BaseModel):
    n: int


async def test_purge_empties_the_work_and_due_queues_and_asks_for_yes(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    other = amqtask.contract(f"{unique}.other", Job, queue=job.queue)  # shares the queue
    app = make_app([job, other])
    await app.declare()
    async with app:
        for n in range(3):
            await app.send(job, Job(n=n))
    async with amqp.channel() as channel:  # as if a delay had just ended
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"n": 9}', headers={"amqtask-task": job.name}),
            routing_key=f"{job.queue}.due",
        )
    target = write_app_module(
        tmp_path,
        broker_url,
        unique,
        job=f'amqtask.contract("{unique}.job", Job)',
        other=f'amqtask.contract("{unique}.other", Job, queue="{job.queue}")',
    )

    refused = run_amqtask(tmp_path, "purge", target, job.name)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert await queue_depth(amqp, job.queue) == 3

    done = run_amqtask(tmp_path, "purge", target, job.name, "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"purged 3 message(s) from {job.queue}",
        f"purged 1 message(s) from {job.queue}.due",
    ]
    assert f"shared by tasks {job.name}, {other.name}" in done.stderr
    assert await queue_depth(amqp, job.queue) == 0
    assert await queue_depth(amqp, f"{job.queue}.due") == 0


@pytest.mark.parametrize(
    "command",
    [
        ("send", "{}"),
        ("call", "{}"),
        ("purge", "--yes"),
        ("dlq", "list"),
    ],
)
def test_a_task_the_app_does_not_know_exits_2_naming_the_known_ones(
    command: tuple[str, str], broker_url: str, unique: str, tmp_path: Path
) -> None:
    target = write_app_module(
        tmp_path,
        broker_url,
        unique,
        job=f'amqtask.contract("{unique}.job", Job)',
        other=f'amqtask.contract("{unique}.other", Job)',
    )
    first, extra = command
    if first == "dlq":
        args = ["dlq", "list", target, "no.such.task"]
    else:
        args = [first, target, "no.such.task", extra]

    result = run_amqtask(tmp_path, *args)

    assert result.returncode == 2, result.stderr
    assert "no task 'no.such.task'" in result.stderr
    assert f"known: {unique}.job, {unique}.other" in result.stderr


# --- amqtask workers: the management API, on a private node -------------------------------------


@pytest.fixture
def management_node() -> Iterator[tuple[PrivateNode, str]]:
    """A private node with the management plugin on a free port."""
    node = PrivateNode()
    port = _free_port({node.port, node.dist_port})
    (node.base_dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
    with (node.base_dir / "rabbitmq.conf").open("a") as conf:
        conf.write(f"management.tcp.port = {port}\nmanagement.tcp.ip = 127.0.0.1\n")
    with node:
        yield node, f"http://guest:guest@127.0.0.1:{port}"


async def test_workers_shows_each_worker_process_consuming_a_queue(
    management_node: tuple[PrivateNode, str], unique: str, tmp_path: Path
) -> None:
    node, management_url = management_node
    job = amqtask.contract(f"{unique}.job", Job)
    idle = amqtask.contract(f"{unique}.idle", Job)
    app = amqtask.App(node.url, [job, idle], namespace=unique)
    await app.declare()
    target = write_app_module(
        tmp_path,
        node.url,
        unique,
        job=f'amqtask.contract("{unique}.job", Job)',
        idle=f'amqtask.contract("{unique}.idle", Job)',
    )
    (tmp_path / "worker_app.py").write_text(
        textwrap.dedent(
            f"""
            from {target.split(":")[0]} import app, job

            @app.handler(job)
            async def handle(task):
                pass
            """
        )
    )
    worker = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "amqtask", "worker", "worker_app:app", "-c", "3", "--json-logs"),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        def listed() -> dict[str, Any] | None:
            result = run_amqtask(
                tmp_path, "workers", target, "--json", "--management-url", management_url
            )
            assert result.returncode == 0, result.stderr
            report: dict[str, Any] = json.loads(result.stdout)
            return report if report["workers"] else None

        await wait_for(lambda: asyncio.to_thread(listed), timeout=30, interval=0.5)
        report = listed()
        assert report is not None
        text = run_amqtask(tmp_path, "workers", target, "--management-url", management_url)
        # A user who may read but not write: the inspect request is refused, the listing stays.
        node.ctl("add_user", f"{unique}-reader", "reader-pw")
        node.ctl("set_permissions", "-p", "/", f"{unique}-reader", ".*", "", ".*")
        reader_url = f"amqp://{unique}-reader:reader-pw@127.0.0.1:{node.port}/"
        refused = run_amqtask(
            tmp_path, "workers", target, "--url", reader_url, "--management-url", management_url
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
        await delete_topology(node.url, app.topology)

    by_queue = {queue["queue"]: queue for queue in report["queues"]}
    (serving,) = by_queue[job.queue]["workers"]
    assert serving["amqtask_worker"] is True, serving
    assert serving["pid"] == worker.pid
    assert (serving["concurrency"], serving["pool"]) == (3, "thread")
    assert serving["queues"] == {job.queue: 3, f"{job.queue}.due": 3}
    assert serving["started"]
    assert serving["connected_at"]
    # It answered over the control exchange: no delivery held, no process pool.
    assert (serving["in_flight"], serving["pool_children"]) == (0, None)
    assert by_queue[idle.queue]["workers"] == []
    assert f"pid {worker.pid}  concurrency 3  prefetch 3  pool thread" in text.stdout
    assert "      in flight 0\n" in text.stdout
    assert f"{idle.queue}  ({idle.name} v1)\n    no consumer" in text.stdout

    assert refused.returncode == 0, refused.stderr
    assert "Traceback" not in refused.stderr
    assert f"pid {worker.pid}  concurrency 3" in refused.stdout
    assert "in flight and pools not inspected (ACCESS_REFUSED" in refused.stdout

    unreachable = run_amqtask(
        tmp_path, "workers", target, "--management-url", f"http://127.0.0.1:{node.port + 1}"
    )
    assert unreachable.returncode == 1
    assert "needs the management API" in unreachable.stderr


# --- amqtask worker --reload --log-config ---------------------------------------------------


HANDLER = """
import pathlib
from pydantic import BaseModel
import amqtask

class Job(BaseModel):
    n: int

job = amqtask.contract("{unique}.job", Job)
app = amqtask.App("{url}", [job], namespace="{unique}")

@app.handler(job)
async def handle(task: Job) -> None:
    with open("{record}", "a") as record:
        record.write("{version} %d\\n" % task.n)
"""


async def test_worker_reload_restarts_on_a_code_change_and_logs_through_the_log_config(
    make_app: AppFactory, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    producer = make_app([job])
    await producer.declare()
    record, log = tmp_path / "record.txt", tmp_path / "worker.log"
    module = tmp_path / f"reload_{unique}.py"

    def write(version: str) -> None:
        module.write_text(
            HANDLER.format(unique=unique, url=broker_url, record=record, version=version)
        )

    write("v1")
    (tmp_path / "logging.json").write_text(
        json.dumps(
            {
                "formatters": {"line": {"format": "%(name)s %(message)s"}},
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "filename": str(log),
                        "formatter": "line",
                    }
                },
                "root": {"level": "INFO", "handlers": ["file"]},
            }
        )
    )

    def started() -> int:
        text = log.read_text() if log.exists() else ""
        return text.count("amqtask.worker worker_started")

    def ran() -> list[str]:
        return record.read_text().splitlines() if record.exists() else []

    reloader = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqtask",
        "worker",
        f"reload_{unique}:app",
        "--reload",
        "--log-config",
        "logging.json",
        "--shutdown-timeout",
        "5",
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for(lambda: started() == 1, timeout=30)
        async with producer:
            await producer.send(job, Job(n=1))
            await wait_for(lambda: ran() == ["v1 1"])
            write("v2")
            await wait_for(lambda: started() == 2, timeout=30)
            await producer.send(job, Job(n=2))
            await wait_for(lambda: ran() == ["v1 1", "v2 2"])
    finally:
        reloader.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(reloader.communicate(), 30)
    text = log.read_text()
    assert reloader.returncode == 0, stderr.decode()
    assert "amqtask.worker worker_reloader_started" in text
    assert f"amqtask.worker worker_reloading changed=['reload_{unique}.py']" in text
    assert text.count("amqtask.worker worker_stopped") == 2  # each child stopped gracefully
    assert "task_succeeded" in text
