"""Worker metrics and health endpoint, against the real broker."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask._metrics import HANDLER_REASONS, MetricsServer, WorkerMetrics
from amqtask._transport import AioPikaTransport

from .conftest import AppFactory, app_env, records, start_worker, wait_for
from .proxy import start_proxy


class Job(BaseModel):
    n: int


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(text: str, name: str) -> float:
    """The value of one sample line (`name` includes its labels) of a Prometheus scrape."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_move_as_tasks_run_and_health_follows_the_connection(
    make_app: AppFactory, broker_url: str, unique: str
) -> None:
    proxy, proxied = await start_proxy(broker_url)
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=2, initial=1.0))
    app = make_app([job], transport=AioPikaTransport(proxied + "?reconnect_interval=1"))
    release = asyncio.Event()

    @app.handler(job)
    async def handle(task: Job) -> None:
        if task.n == 0:
            await release.wait()
        if task.n == 9:
            raise RuntimeError("always fails")

    await app.declare()
    metrics = WorkerMetrics(app)
    server = MetricsServer(metrics, 0, host="127.0.0.1", health_grace=1.0)
    server.start()
    worker = amqtask.Worker(app, amqtask.WorkerSettings(concurrency=4), metrics=metrics)
    await worker.start()
    task = f'{{task="{job.name}",version="1"}}'
    try:
        async with make_app([job]) as producer:
            for n in (0, 1, 2, 9):
                await producer.send(job, Job(n=n))

        async def scrape() -> str:
            return (await asyncio.to_thread(fetch, server.port, "/metrics"))[1]

        await wait_for(lambda: sample_of(scrape, f"amqtask_tasks_succeeded_total{task}", 2))
        await wait_for(lambda: sample_of(scrape, f"amqtask_tasks_retried_total{task}", 1))
        text = await scrape()
        assert sample(text, "amqtask_tasks_in_flight") == 1  # n=0 is held
        assert sample(text, "amqtask_prefetch") == 4
        assert sample(text, "amqtask_broker_connected") == 1
        release.set()
        # n=9 fails, is retried once (1 s later), fails again and is dead-lettered.
        labels = f'reason="handler_error",task="{job.name}",version="1"'
        dead = f"amqtask_tasks_dead_lettered_total{{{labels}}}"
        await wait_for(lambda: sample_of(scrape, dead, 1), timeout=15)
        text = await scrape()
        assert sample(text, f"amqtask_tasks_received_total{task}") == 5
        assert sample(text, f"amqtask_tasks_succeeded_total{task}") == 3
        assert sample(text, f"amqtask_tasks_failed_total{task}") == 2
        assert sample(text, f"amqtask_tasks_retried_total{task}") == 1
        assert sample(text, f"amqtask_task_duration_seconds_count{task}") == 5
        assert sample(text, "amqtask_tasks_in_flight") == 0

        status, body = await asyncio.to_thread(fetch, server.port, "/health")
        assert (status, body) == (200, "ok\n")
        await proxy.close()  # the broker is gone for good: reconnects keep failing
        await wait_for(lambda: health_is(server.port, 503), timeout=15)
        text = await scrape()
        assert sample(text, "amqtask_broker_connected") == 0
    finally:
        release.set()
        await worker.stop()
        server.stop()


async def sample_of(scrape: object, name: str, expected: float) -> bool:
    text = await scrape()  # type: ignore[operator]
    return sample(text, name) == expected


async def health_is(port: int, expected: int) -> bool:
    return (await asyncio.to_thread(fetch, port, "/health"))[0] == expected


async def test_the_worker_command_serves_metrics_on_the_port_given(
    make_app: AppFactory, broker_url: str, unique: str, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a free port for the worker to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = amqtask.contract(f"{unique}.job", Job)
    producer = make_app([job])
    await producer.declare()
    record = tmp_path / "record.txt"
    env = app_env(broker_url, unique, record, TEST_SLEEP="0")
    worker = await start_worker(
        "tests.integration.apps.slow_app:app", "--metrics-port", str(port), env=env
    )
    try:
        async with producer:
            await producer.send(job, Job(n=1))
        await wait_for(lambda: sum(records(record)[1].values()) == 1)
        name = f'amqtask_tasks_succeeded_total{{task="{job.name}",version="1"}}'

        async def scraped() -> bool:
            status, text = await asyncio.to_thread(fetch, port, "/metrics")
            return status == 200 and sample(text, name) == 1

        await wait_for(scraped)
        assert await health_is(port, 200)
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
    assert worker.returncode == 0


def total(text: str, name: str) -> float:
    """The sum of a metric's samples over all its label values."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def label_values(text: str, label: str) -> set[str]:
    """Every value `label` takes in a Prometheus scrape."""
    return set(re.findall(rf'{label}="([^"]*)"', text))


async def test_task_names_a_publisher_invents_do_not_grow_the_scrape(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a free port for the worker to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = amqtask.contract(f"{unique}.job", Job)
    producer = make_app([job])
    await producer.declare()
    env = app_env(broker_url, unique, tmp_path / "record.txt", TEST_SLEEP="0")
    worker = await start_worker(
        "tests.integration.apps.slow_app:app", "--metrics-port", str(port), env=env
    )
    try:
        async with amqp.channel() as channel:
            for n in range(200):
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        b'{"n": 1}',
                        headers={"amqtask-task": f"{unique}.made-up-{n}-{uuid.uuid4().hex}"},
                    ),
                    routing_key=job.queue,
                )
        async with producer:
            await producer.send(job, Job(n=1))

        async def all_counted() -> bool:
            try:
                status, text = await asyncio.to_thread(fetch, port, "/metrics")
            except urllib.error.URLError:
                return False  # not serving yet
            return (
                status == 200
                and total(text, "amqtask_tasks_received_total") == 201
                and total(text, "amqtask_tasks_dead_lettered_total") == 200
            )

        await wait_for(all_counted, timeout=30)
        text = (await asyncio.to_thread(fetch, port, "/metrics"))[1]
        assert label_values(text, "task") == {job.name, "unknown"}
        assert label_values(text, "reason") == {"unknown_task", *HANDLER_REASONS}
        # No version header: version 1, as the worker reads it.
        dead = 'amqtask_tasks_dead_lettered_total{reason="unknown_task",task="unknown",version="1"}'
        assert sample(text, dead) == 200
        assert sample(text, f'amqtask_tasks_received_total{{task="{job.name}",version="1"}}') == 1
        assert len(text) < 20_000  # a label value per invented name made it about 100 KB
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
    assert worker.returncode == 0
