"""Integration fixtures: one real broker for the session, unique names per test, cleanup after.

The broker is resolved in this order: AMQTASK_TEST_URL; 127.0.0.1:5672 if it answers; a
testcontainers RabbitMQ container where a Docker engine exists. With none, every integration
test fails with a message saying how to get one: a green run that tested nothing is a defect.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

import amqtask

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.integration)
