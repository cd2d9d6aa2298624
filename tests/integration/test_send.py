"""App.send against the real broker: confirmed, persistent, mandatory, validated."""

from __future__ import annotations

import asyncio

import pydantic
import pytest
from aio_pika.abc import AbstractConnection
from aiormq.abc import ChannelFrame
from pydantic import BaseModel

import amqtask
from amqtask import _wire

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
    # Checked once at connect, not discovered by a publish: a 404 would close the channel
    # every send shares.
    with pytest.raises(amqtask.TopologyMissing, match=r"tasks'.*amqtask declare"):
        await app.connect()
    await app.declare()
    async with app:
        await app.send(job, Job(n=2))


async def test_a_full_bounded_queue_raises_queue_full_and_stores_nothing(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    # x-overflow reject-publish: the broker nacks, `send` says which queue is full.
    job = amqtask.contract(f"{unique}.job", Job, max_length=2)
    app = make_app([job])
    await app.declare()
    confirmed = 0
    async with app:
        with pytest.raises(amqtask.QueueFull, match=f"queue '{unique}.job' is full"):  # noqa: PT012
            for n in range(10):
                await app.send(job, Job(n=n))
                confirmed += 1
    # A quorum queue applies its limit a little late (it may overshoot by a message), but what
    # `send` confirmed is exactly what the queue holds, and what it refused is not stored.
    assert 2 <= confirmed <= 3
    assert await queue_depth(amqp, job.queue) == confirmed


async def test_send_can_wait_for_room_in_a_full_queue(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, max_length=1, queue_type="classic")
    app = make_app([job])
    await app.declare()

    async def take_one_later() -> None:
        await asyncio.sleep(0.5)
        async with amqp.channel() as channel:
            queue = await channel.declare_queue(job.queue, passive=True)
            message = await queue.get(timeout=5)
            await message.ack()

    async with app:
        await app.send(job, Job(n=1))
        taker = asyncio.create_task(take_one_later())
        await app.send(job, Job(n=2), wait_if_full=10)
        await taker
        with pytest.raises(amqtask.QueueFull):
            await app.send(job, Job(n=3), wait_if_full=0.3)
    assert await queue_depth(amqp, job.queue) == 1


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


async def test_concurrent_sends_each_get_their_own_outcome_when_some_are_returned(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    # Sends made in the same loop turn go to the socket together: a returned one among them
    # fails alone, and the confirmed ones arrive in the order they were sent.
    kept = amqtask.contract(f"{unique}.kept", Job, queue_type="classic")
    gone = amqtask.contract(f"{unique}.gone", Job)
    app = make_app([kept, gone])
    await app.declare()
    async with amqp.channel() as channel:
        await channel.queue_delete(gone.queue)

    async with app:
        outcomes = await asyncio.gather(
            *(app.send(gone if n % 5 == 0 else kept, Job(n=n)) for n in range(200)),
            return_exceptions=True,
        )
    returned = [n for n, outcome in enumerate(outcomes) if isinstance(outcome, Exception)]
    assert returned == list(range(0, 200, 5))
    assert all(isinstance(outcomes[n], amqtask.Unroutable) for n in returned)
    assert await queue_depth(amqp, kept.queue) == 160
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(kept.queue, passive=True)
        received = []
        for _ in range(160):
            message = await queue.get(timeout=5)
            received.append(Job.model_validate_json(message.body).n)
            await message.ack()
    assert received == [n for n in range(200) if n % 5]


async def test_sends_cut_off_by_another_sends_missing_exchange_are_not_called_unroutable(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    # A send to an exchange that does not exist closes the channel (404) under the sends beside
    # it. Only that one was refused; the others were cut off and may or may not be stored.
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()

    async with app:
        async with amqp.channel() as channel:
            await channel.exchange_delete(app.names.delay_entry_exchange)
        outcomes = await asyncio.gather(
            app.send(job, Job(n=0), delay=60),
            *(app.send(job, Job(n=n)) for n in range(1, 50)),
            return_exceptions=True,
        )
        await app.send(job, Job(n=50))  # the channel is back for the next send

    delayed, others = outcomes[0], outcomes[1:]
    assert isinstance(delayed, amqtask.Unroutable)
    assert app.names.delay_entry_exchange in str(delayed)
    assert all(
        outcome is None or isinstance(outcome, amqtask.PublishInterrupted) for outcome in others
    )
    assert any(isinstance(outcome, amqtask.PublishInterrupted) for outcome in others)
    stored = await queue_depth(amqp, job.queue)
    assert 1 + others.count(None) <= stored <= 50  # every confirmed one is there


async def test_sends_wait_for_room_when_the_connection_write_queue_is_full(
    make_app: AppFactory, amqp: AbstractConnection, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    async with app:
        # aiormq's write queue holds ten frame batches; while it is full, sends wait for room
        # and none is lost. Here it holds one, and a frame of nothing fills it just before the
        # first batch of sends goes to it, as when the writer is behind.
        underlay = app.transport.connection.transport.connection  # type: ignore[attr-defined]
        queue = underlay.write_queue
        flush = _wire.Publisher._flush
        filled = 0

        def behind_once(publisher: _wire.Publisher) -> None:
            nonlocal filled
            if not filled:
                queue.put_nowait(ChannelFrame(b"", should_close=False))
                filled += 1
            flush(publisher)

        monkeypatch.setattr(queue, "_maxsize", 1)
        monkeypatch.setattr(_wire.Publisher, "_flush", behind_once)
        ids = await asyncio.gather(*(app.send(job, Job(n=n)) for n in range(300)))
        monkeypatch.undo()
    assert filled == 1
    assert len(set(ids)) == 300
    assert await queue_depth(amqp, job.queue) == 300
