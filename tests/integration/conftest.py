"""Integration fixtures: one real broker for the session, unique names per test, cleanup after.

The broker is resolved in this order: AMQTASK_TEST_URL; 127.0.0.1:5672 if it answers; a
testcontainers RabbitMQ container where a Docker engine exists. With none, every integration
test fails with a message saying how to get one: a green run that tested nothing is a defect.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

import amqtask

from .cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
HOW_TO_GET_A_BROKER = (
    "no RabbitMQ broker for the integration tests. Either set AMQTASK_TEST_URL "
    "(e.g. amqp://guest:guest@host:5672/), start one on 127.0.0.1:5672 "
    "(`rabbitmq-server -detached`), or install a Docker engine and the `docker` extra "
    "(`pip install -e .[docker]`) so testcontainers can start one."
)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _resolve_broker() -> Iterator[str]:
    if url := os.environ.get("AMQTASK_TEST_URL"):
        yield url
        return
    if _answers("127.0.0.1", 5672):
        yield LOCAL_URL
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-not-found]
    except ImportError:
        pytest.fail(HOW_TO_GET_A_BROKER, pytrace=False)
    try:
        container = RabbitMqContainer("rabbitmq:3.13")
        container.start()
    except Exception as exc:
        pytest.fail(f"{HOW_TO_GET_A_BROKER} (testcontainers: {exc})", pytrace=False)
    try:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5672)
        yield f"amqp://guest:guest@{host}:{port}/"
    finally:
        container.stop()


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    yield from _resolve_broker()


@pytest.fixture
def unique() -> str:
    """A name part unique to this test run."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def amqp(broker_url: str) -> AsyncIterator[AbstractConnection]:
    """A plain aio-pika connection for looking at the broker from the outside."""
    connection = await aio_pika.connect(broker_url)
    async with connection:
        yield connection


async def delete_topology(broker_url: str, topology: amqtask.topology.Topology) -> None:
    connection = await aio_pika.connect(broker_url)
    async with connection:
        for queue in topology.queues:
            async with connection.channel() as channel:
                await channel.queue_delete(queue.name)
        for exchange in topology.exchanges:
            async with connection.channel() as channel:
                await channel.exchange_delete(exchange.name)


class AppFactory:
    """Builds apps on unique names and deletes everything they declared afterwards."""

    def __init__(self, broker_url: str, namespace: str) -> None:
        self.broker_url = broker_url
        self.namespace = namespace
        self.apps: list[amqtask.App] = []

    def __call__(self, contracts: list[amqtask.Contract[Any, Any]], **kwargs: Any) -> amqtask.App:
        kwargs.setdefault("namespace", self.namespace)
        app = amqtask.App(self.broker_url, contracts, **kwargs)
        self.apps.append(app)
        return app

    async def cleanup(self) -> None:
        for app in self.apps:
            await app.close()
            await delete_topology(self.broker_url, app.topology)


@pytest.fixture
async def make_app(broker_url: str, unique: str) -> AsyncIterator[AppFactory]:
    factory = AppFactory(broker_url, unique)
    try:
        yield factory
    finally:
        await factory.cleanup()


async def queue_depth(connection: AbstractConnection, name: str) -> int:
    async with connection.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


async def depth_is(connection: AbstractConnection, queue: str, expected: int) -> bool:
    """Whether `queue` holds `expected` ready messages: a predicate for `wait_for`."""
    return await queue_depth(connection, queue) == expected


async def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll an async or sync predicate until it is true; fail with its last value otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


# --- a worker in this process -------------------------------------------------------------------


@asynccontextmanager
async def running(app: amqtask.App, **settings: Any) -> AsyncIterator[amqtask.Worker]:
    """A started `Worker` on `app` with `WorkerSettings(**settings)`, stopped on exit."""
    worker = amqtask.Worker(app, amqtask.WorkerSettings(**settings))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def dead_letters(amqp: AbstractConnection, queue: str, count: int) -> list[Any]:
    """Take `count` messages off `queue`'s dead-letter queue (failing if fewer arrive)."""
    taken = []
    async with amqp.channel() as channel:
        dlq = await channel.declare_queue(f"{queue}.dead", passive=True)
        for _ in range(count):
            message = None
            for _ in range(100):
                message = await dlq.get(fail=False)
                if message is not None:
                    break
                await asyncio.sleep(0.05)
            assert message is not None, f"only {len(taken)} of {count} dead letters arrived"
            await message.ack()
            taken.append(message)
    return taken


# --- worker processes on the apps in tests/integration/apps/ ------------------------------------


def app_env(
    broker_url: str, unique: str, record: Path | None = None, **extra: str
) -> dict[str, str]:
    """This environment plus what the apps in `apps/` read: the test's names, broker, record file
    and any further `TEST_*` settings (`TEST_SLEEP="30"`)."""
    env = {**os.environ, "TEST_UNIQUE": unique, "TEST_BROKER_URL": broker_url}
    if record is not None:
        env["TEST_RECORD_FILE"] = str(record)
    return {**env, **extra}


async def start_worker(
    target: str, *args: str, env: dict[str, str], **streams: Any
) -> asyncio.subprocess.Process:
    """`python -m amqtask worker TARGET --json-logs ARGS` from the project root; `streams` are
    passed on (`stderr=asyncio.subprocess.PIPE`)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqtask",
        "worker",
        target,
        "--json-logs",
        *args,
        cwd=ROOT,
        env=env,
        **streams,
    )


def records(path: Path) -> tuple[Counter[int], Counter[int]]:
    """How often each task started and finished, from an app's record file."""
    started: Counter[int] = Counter()
    done: Counter[int] = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            what, n = line.split()
            (started if what == "start" else done)[int(n)] += 1
    return started, done


# --- the command line on an app module written for the test ------------------------------------


def write_app_module(tmp_path: Path, broker_url: str, unique: str, **contracts: str) -> str:
    """Write an app module into `tmp_path` and return its `module:app` target.

    The module defines `Job(n: int)`, each of `contracts` as `name = source`, and `app` on all
    of them, e.g. `job=f'amqtask.contract("{unique}.job", Job)'`.
    """
    module = f"app_{unique}"
    lines = [f"{name} = {source}" for name, source in contracts.items()]
    app = f'app = amqtask.App("{broker_url}", [{", ".join(contracts)}], namespace="{unique}")'
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel
            import amqtask

            class Job(BaseModel):
                n: int

            """
        )
        + "\n".join([*lines, app, ""])
    )
    return f"{module}:app"


def run_amqtask(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m amqtask ARGS` to completion, in `tmp_path` and importing app modules from it."""
    return subprocess.run(
        [sys.executable, "-m", "amqtask", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        check=False,
    )


# --- a 3-node cluster of private nodes, once per session -----------------------------------------

# What the README recommends for a cluster: a dead-letter hand-over whose target lost its leader
# is re-sent after 5 s instead of RabbitMQ's default 180 s (delays and retries pass through one).
CLUSTER_ADVANCED_CONFIG = "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].\n"


@pytest.fixture(scope="session")
def cluster_rig() -> Iterator[Cluster]:
    """Three private nodes joined into one cluster (management API on), booted in parallel once
    per session (about 20 to 40 s) and removed at its end. Never the shared node."""
    rig = Cluster(advanced_config=CLUSTER_ADVANCED_CONFIG)
    try:
        rig.boot()
        print(f"\n[cluster] booted in {rig.boot_duration:.1f} s: {rig!r}")
        yield rig
    finally:
        rig.cleanup()


@pytest.fixture
def cluster(cluster_rig: Cluster) -> Cluster:
    """The session's cluster with every node running and healthy (a test before may have killed
    some): nodes that are down are started, and each rejoins on its own."""
    done = cluster_rig.ensure_healthy()
    if done:
        print(f"\n[cluster] before the test: {'; '.join(done)}")
    return cluster_rig


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.integration)
