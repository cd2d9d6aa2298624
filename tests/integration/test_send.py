"""App.send against the real broker: confirmed, persistent, mandatory, validated."""

from __future__ import annotations

import asyncio

import pydantic
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask

from .conftest import AppFactory, queue_depth


class Job(BaseModel):
    n: int


async def test_send_returns_once_the_message_is_stored_with_its_properties(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, version=3)
    app = make_app([job])
    await app.declare()
    async with app:
        message_id = await app.send(job, Job(n=7))

    async with amqp.channel() as channel:
        queue = await channel.declare_queue(job.queue, passive=True)
        message = await queue.get(timeout=5)
        await message.ack()
    assert message.message_id == message_id
    assert message.body == b'{"n":7}'
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2  # persistent
    assert message.headers["amqtask-task"] == job.name
    assert message.headers["amqtask-version"] == 3


async def test_send_accepts_a_dict_and_validates_it_before_publishing(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    async with app:
        await app.send(job, {"n": "5"})
        with pytest.raises(pydantic.ValidationError):
            await app.send(job, {"n": "five"})
        with pytest.raises(pydantic.ValidationError):
            await app.send(job, {})

    assert await queue_depth(amqp, job.queue) == 1


async def test_many_concurrent_sends_are_all_confirmed_on_one_channel(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    async with app:
        ids = await asyncio.gather(*(app.send(job, Job(n=i)) for i in range(500)))

    assert len(set(ids)) == 500
    assert await queue_depth(amqp, job.queue) == 500


async def test_send_without_a_bound_queue_raises_unroutable(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    async with amqp.channel() as channel:
        await channel.queue_delete(job.queue)

    async with app:
        with pytest.raises(amqtask.Unroutable, match="amqtask declare"):
            await app.send(job, Job(n=1))
        # The channel survives a return: the next send works once the queue is back.
        await app.declare()
        await app.send(job, Job(n=2))
    assert await queue_depth(amqp, job.queue) == 1


async def test_send_before_declare_raises_a_clear_error_and_the_app_recovers(
    make_app: AppFactory, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    async with app:
        with pytest.raises(amqtask.Unroutable, match=r"does not exist.*amqtask declare"):
            await app.send(job, Job(n=1))
        await app.declare()
        await app.send(job, Job(n=2))


async def test_a_nacked_publish_raises_publish_nacked(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    # A full queue with x-overflow reject-publish makes the broker nack.
    job = amqtask.contract(f"{unique}.job", Job, max_length=2, queue_type="classic")
    app = make_app([job])
    await app.declare()
    async with app:
        await app.send(job, Job(n=1))
        await app.send(job, Job(n=2))
        with pytest.raises(amqtask.PublishNacked):
            await app.send(job, Job(n=3))
    assert await queue_depth(amqp, job.queue) == 2


async def test_sending_a_contract_the_app_does_not_know_is_refused(
    make_app: AppFactory, unique: str
) -> None:
    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    stranger = amqtask.contract(f"{unique}.other", Job)
    with pytest.raises(amqtask.ContractError, match="not among this app's contracts"):
        await app.send(stranger, Job(n=1))


async def test_send_outside_the_context_manager_raises_not_connected(
    make_app: AppFactory, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    with pytest.raises(amqtask.NotConnected):
        await app.send(job, Job(n=1))
