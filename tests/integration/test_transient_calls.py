"""Transient calls (`contract(..., calls="transient")`) against the real broker: a call queue of
the work queue's own, declared like the rest, transient requests, refusals reported at once, and
what it gives up: a request in flight does not survive its node."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask

from .conftest import AppFactory, dead_letters, depth_is, queue_depth, running, wait_for
from .private_node import QUORUM_REGISTRATION_SETTLE, PrivateNode


class Job(BaseModel):
    n: int


class Doubled(BaseModel):
    m: int


def transient(unique: str, **options: Any) -> amqtask.Contract[Job, Doubled]:
    return amqtask.contract(f"{unique}.double", Job, returns=Doubled, calls="transient", **options)


async def test_declare_creates_the_call_queue_and_a_request_waits_there_as_a_transient_message(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    double = transient(unique)
    app = make_app([double])
    plan = await app.declare()
    calls = f"{double.queue}.calls"

    async with app:
        call = asyncio.ensure_future(app.call(double, Job(n=1), timeout=2))
        await wait_for(lambda: depth_is(amqp, calls, 1))
        async with amqp.channel() as channel:
            request = await (await channel.get_queue(calls, ensure=False)).get()
            await request.nack(requeue=True)
        with pytest.raises(amqtask.CallTimeout, match=f"queue '{calls}'") as timed_out:
            await call

    created = {entity.name for entity in plan.missing if entity.kind == "queue"}
    assert calls in created
    assert (await app.plan()).up_to_date  # declared as derived: classic, durable
    assert request.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    assert request.routing_key == f"{double.name}.v1.call"
    assert (request.reply_to or "").startswith("amq.rabbitmq.reply-to.")  # direct reply-to
    assert timed_out.value.task == double.name
    assert await queue_depth(amqp, double.queue) == 0  # never in the (quorum) work queue


async def test_one_worker_answers_transient_and_durable_calls_and_dead_letters_failures(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    double = transient(unique)
    durable = amqtask.contract(f"{unique}.triple", Job, returns=Doubled)
    worker_app = make_app([double, durable])
    await worker_app.declare()
    caller = make_app([double, durable])

    @worker_app.handler(double)
    async def handle(task: Job) -> Doubled:
        if task.n < 0:
            raise ValueError(f"negative: {task.n}")
        return Doubled(m=task.n * 2)

    @worker_app.handler(durable)
    async def handle_durable(task: Job) -> Doubled:
        return Doubled(m=task.n * 3)

    async with running(worker_app, concurrency=20) as worker, caller:
        results = await asyncio.gather(
            *(caller.call(double, Job(n=n), timeout=20) for n in range(200)),
            *(caller.call(durable, Job(n=n), timeout=20) for n in range(10)),
        )
        with pytest.raises(amqtask.RemoteError) as failed:
            await caller.call(double, Job(n=-1), timeout=20)
        (letter,) = await dead_letters(amqp, double.queue, 1)

    assert f"{double.queue}.calls" in worker.queues
    assert [r.m for r in results] == [n * 2 for n in range(200)] + [n * 3 for n in range(10)]
    assert failed.value.remote_type == "builtins.ValueError"
    assert letter.headers["amqtask-reason"] == "handler_error"
    assert letter.headers["amqtask-queue"] == double.queue  # under the work queue's name
    assert letter.type == double.name  # the request's AMQP type, kept on the copy
    assert await queue_depth(amqp, f"{double.queue}.calls") == 0


async def test_a_transient_call_with_no_call_queue_fails_at_once_as_unroutable(
    make_app: AppFactory, unique: str
) -> None:
    durable = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    await make_app([durable]).declare()  # the topology of the durable contract: no call queue
    caller = make_app([transient(unique)])

    async with caller:
        started = asyncio.get_running_loop().time()
        with pytest.raises(amqtask.Unroutable, match=r"\.v1\.call.*amqtask declare"):
            await caller.call(transient(unique), Job(n=1), timeout=20)
        elapsed = asyncio.get_running_loop().time() - started

    assert elapsed < 5  # the return, not the timeout


async def test_a_transient_call_refused_by_a_full_call_queue_fails_at_once_as_nacked(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    double = transient(unique, max_length=1)
    app = make_app([double])  # no worker: the call queue fills
    await app.declare()

    async with app:
        first = asyncio.ensure_future(app.call(double, Job(n=1), timeout=20))
        await wait_for(lambda: depth_is(amqp, f"{double.queue}.calls", 1))
        started = asyncio.get_running_loop().time()
        with pytest.raises(amqtask.PublishNacked):
            await app.call(double, Job(n=2), timeout=20)
        elapsed = asyncio.get_running_loop().time() - started
        first.cancel()

    assert elapsed < 5


@pytest.fixture
def private_node() -> Iterator[PrivateNode]:
    node = PrivateNode()
    try:
        node.start()
        yield node
    finally:
        node.cleanup()


async def test_a_transient_request_in_flight_is_lost_with_its_node_and_a_durable_one_is_not(
    private_node: PrivateNode, unique: str
) -> None:
    double = transient(unique)
    durable = amqtask.contract(f"{unique}.triple", Job, returns=Doubled)
    app = amqtask.App(private_node.url, [double, durable], namespace=unique)
    await app.declare()
    await asyncio.sleep(QUORUM_REGISTRATION_SETTLE)  # see the constant: before a kill -9
    calls = f"{double.queue}.calls"

    async with app:
        waiting = [
            asyncio.ensure_future(app.call(contract, Job(n=1), timeout=60))
            for contract in (double, durable)
        ]
        connection = await aio_pika.connect(private_node.url)
        async with connection:
            await wait_for(lambda: depth_is(connection, calls, 1))
            await wait_for(lambda: depth_is(connection, durable.queue, 1))
        await asyncio.to_thread(private_node.restart)  # kill -9, then start again
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)

    connection = await aio_pika.connect(private_node.url)
    async with connection:
        # The durable request survived the crash (and will expire in its queue), once the
        # restarted quorum queue has recovered its log.
        await wait_for(lambda: depth_is(connection, durable.queue, 1), timeout=30)
        lost = await queue_depth(connection, calls)

    assert [type(outcome) for outcome in outcomes] == [amqtask.ConnectionLost] * 2
    assert lost == 0  # the call queue is back (durable), its transient request is not
