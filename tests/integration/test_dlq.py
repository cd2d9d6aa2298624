"""`amqtask dlq list|replay|purge` against the real broker."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import aiormq.exceptions
import pamqp.encode
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask import _dead_letters

from .conftest import (
    AppFactory,
    depth_is,
    queue_depth,
    run_amqtask,
    running,
    wait_for,
    write_app_module,
)


class Job(BaseModel):
    n: int


def dlq(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_amqtask(tmp_path, "dlq", *args)


async def test_dead_letters_can_be_listed_replayed_by_id_and_purged(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=1))
    app = make_app([job])
    failed: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        failed.append(task.n)
        raise RuntimeError(f"job {task.n} broke")

    await app.declare()
    async with make_app([job]) as producer:
        ids = [await producer.send(job, Job(n=n)) for n in range(3)]
    async with running(app):
        await wait_for(lambda: len(failed) == 3)
    await wait_for(lambda: depth_is(amqp, f"{job.queue}.dead", 3))

    target = write_app_module(
        tmp_path,
        broker_url,
        unique,
        job=f'amqtask.contract("{unique}.job", Job, retry=amqtask.Retry(attempts=1))',
    )

    listed = dlq(tmp_path, "list", target, job.name, "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert report["count"] == 3
    assert {m["message_id"] for m in report["messages"]} == set(ids)
    first = next(m for m in report["messages"] if m["message_id"] == ids[0])
    assert first["reason"] == "handler_error"
    assert first["error"] == "RuntimeError: job 0 broke"
    assert first["attempts"] == 1
    assert first["first_failed_at"]
    assert first["body"] == '{"n":0}'
    # Listing removes nothing.
    assert await queue_depth(amqp, f"{job.queue}.dead") == 3
    text = dlq(tmp_path, "list", target, job.name)
    assert f"3 dead letter(s) in {job.queue}.dead" in text.stdout
    assert "reason=handler_error" in text.stdout

    replayed = dlq(tmp_path, "replay", target, job.name, "--id", ids[1])
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed 1 message(s) to {job.queue}" in replayed.stdout
    assert await queue_depth(amqp, job.queue) == 1
    assert await queue_depth(amqp, f"{job.queue}.dead") == 2
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(job.queue, passive=True)
        back = await queue.get(timeout=5)
        await back.ack()
    assert back.message_id == ids[1]
    assert back.body == b'{"n":1}'
    assert "amqtask-reason" not in back.headers  # a fresh start: no failure, attempt 1
    assert "amqtask-attempt" not in back.headers

    missing = dlq(tmp_path, "replay", target, job.name, "--id", "no-such-id")
    assert missing.returncode == 1
    assert "were not found" in missing.stderr

    refused = dlq(tmp_path, "purge", target, job.name)
    assert refused.returncode == 2
    assert await queue_depth(amqp, f"{job.queue}.dead") == 2

    purged = dlq(tmp_path, "purge", target, job.name, "--yes")
    assert purged.returncode == 0, purged.stderr
    assert f"purged 2 message(s) from {job.queue}.dead" in purged.stdout
    assert await queue_depth(amqp, f"{job.queue}.dead") == 0


async def declared_job(make_app: AppFactory, unique: str) -> amqtask.Contract[Job, None]:
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=1))
    await make_app([job]).declare()
    return job


def job_module(tmp_path: Path, broker_url: str, unique: str) -> str:
    return write_app_module(
        tmp_path,
        broker_url,
        unique,
        job=f'amqtask.contract("{unique}.job", Job, retry=amqtask.Retry(attempts=1))',
    )


async def publish(amqp: AbstractConnection, queue: str, *messages: aio_pika.Message) -> None:
    async with amqp.channel(publisher_confirms=True) as channel:
        for message in messages:
            await channel.default_exchange.publish(message, routing_key=queue)


async def test_large_dead_letters_list_with_a_preview_and_their_size(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = await declared_job(make_app, unique)
    size = 8 * 1024 * 1024
    bodies = [bytes([ord("a") + n]) * size for n in range(3)]
    await publish(
        amqp,
        f"{job.queue}.dead",
        *(
            aio_pika.Message(body, message_id=f"big-{n}", headers={"amqtask-task": job.name})
            for n, body in enumerate(bodies)
        ),
    )
    target = job_module(tmp_path, broker_url, unique)

    listed = dlq(tmp_path, "list", target, job.name, "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert report["count"] == 3
    assert len(listed.stdout) < 20_000  # previews, not 24 MB of bodies
    for n, message in enumerate(report["messages"]):
        assert message["message_id"] == f"big-{n}"
        assert message["body"] == chr(ord("a") + n) * 1024
        assert (message["body_size"], message["body_truncated"]) == (size, True)

    text = dlq(tmp_path, "list", target, job.name, "--limit", "2")
    assert text.returncode == 0, text.stderr
    assert f"body ({size} bytes): {'a' * 1024}..." in text.stdout
    assert f"body ({size} bytes): {'b' * 1024}..." in text.stdout
    assert "big-2" not in text.stdout
    assert await queue_depth(amqp, f"{job.queue}.dead") == 3  # listing removes nothing


class Double(float):
    """A float published as an AMQP double (`d`), as other clients send one."""


@pytest.fixture
def any_header_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this process publish header values pamqp will not encode but other AMQP clients send
    and pamqp decodes: a long string that is not UTF-8 (`bytes`) and a double (`Double`)."""
    original = pamqp.encode.encode_table_value

    def encode(value: Any) -> bytes:
        if isinstance(value, bytes):
            return b"S" + struct.pack(">I", len(value)) + value
        if isinstance(value, Double):
            return b"d" + struct.pack(">d", value)
        return bytes(original(value))

    monkeypatch.setattr(pamqp.encode, "encode_table_value", encode)


@pytest.mark.usefixtures("any_header_type")
async def test_dead_letters_with_malformed_headers_are_listed_and_replayed(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = await declared_job(make_app, unique)
    name = job.name.encode()
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    letters = {
        "not-a-number": {"amqtask-task": bytearray(name), "amqtask-attempt": "abc"},
        "odd-types": {
            "amqtask-task": job.name,
            "amqtask-attempt": {"a": 1},
            "amqtask-reason": [1, "two"],
            "amqtask-error": 1.5,
            "amqtask-failed-at": when,
            "amqtask-first-failed-at": Decimal("1.25"),
            "x-death": "not a list",
        },
        "not-utf8": {
            "amqtask-task": name,
            "amqtask-error": b"caf\xe9",
            "amqtask-attempt": Double(1e300),
            "x-death": [42],
            "custom": {"kept": b"\xff", "huge": Double(1e300)},
        },
    }
    await publish(
        amqp,
        f"{job.queue}.dead",
        *(
            aio_pika.Message(b'{"n":1}', message_id=message_id, headers=headers)
            for message_id, headers in letters.items()
        ),
    )
    target = job_module(tmp_path, broker_url, unique)

    listed = dlq(tmp_path, "list", target, job.name, "--json")
    assert listed.returncode == 0, listed.stderr
    shown = {m["message_id"]: m for m in json.loads(listed.stdout)["messages"]}
    assert shown["not-a-number"]["task"] == job.name
    assert shown["not-a-number"]["attempts"] == "abc"
    odd = shown["odd-types"]
    assert (odd["attempts"], odd["reason"], odd["error"]) == ("{'a': 1}", "[1, 'two']", "1.5")
    assert odd["failed_at"] == str(when)
    assert odd["first_failed_at"] == "1.25"
    assert shown["not-utf8"]["task"] == job.name
    assert shown["not-utf8"]["error"] == "caf\ufffd"
    assert shown["not-utf8"]["attempts"] == "1e+300"
    assert shown["not-utf8"]["reason"] is None
    text = dlq(tmp_path, "list", target, job.name)
    assert text.returncode == 0, text.stderr
    assert "attempts=abc" in text.stdout

    replayed = dlq(tmp_path, "replay", target, job.name)
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed 3 message(s) to {job.queue}" in replayed.stdout
    assert await queue_depth(amqp, f"{job.queue}.dead") == 0
    back = {}
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(job.queue, passive=True)
        for _ in range(3):
            message = await queue.get(timeout=5)
            await message.ack()
            back[message.message_id] = message.headers
    assert back["not-a-number"]["amqtask-task"] == bytearray(name)
    # Not UTF-8: back byte for byte, as a byte array; a double beyond what pamqp sends, as text.
    assert back["not-utf8"]["custom"] == {"kept": bytearray(b"\xff"), "huge": "1e+300"}
    assert "x-death" not in back["odd-types"]


async def test_the_listing_shows_the_reason_of_the_last_death_not_the_first(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = await declared_job(make_app, unique)
    async with amqp.channel() as channel:
        # Like a delay level: the message expires there and is dead-lettered to the work queue.
        waiting = await channel.declare_queue(
            f"{unique}.waiting",
            exclusive=True,
            arguments={
                "x-message-ttl": 10,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": job.queue,
            },
        )
        await publish(
            amqp, waiting.name, aio_pika.Message(b'{"n":1}', headers={"amqtask-task": job.name})
        )
        await wait_for(lambda: depth_is(amqp, job.queue, 1))
        work = await channel.declare_queue(job.queue, passive=True)
        message = await work.get(timeout=5)
        await message.reject(requeue=False)  # as a worker without its publish channel would
        await wait_for(lambda: depth_is(amqp, f"{job.queue}.dead", 1))
        dead = await channel.declare_queue(f"{job.queue}.dead", passive=True)
        letter = await dead.get(timeout=5)
        assert letter.headers["x-first-death-reason"] == "expired"
        await letter.reject(requeue=True)
    target = job_module(tmp_path, broker_url, unique)

    listed = dlq(tmp_path, "list", target, job.name, "--json")
    assert listed.returncode == 0, listed.stderr
    (shown,) = json.loads(listed.stdout)["messages"]
    assert shown["reason"] == "rejected"


async def test_a_replayed_dead_letter_keeps_its_content_encoding_and_type(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=1))
    app = make_app([job])
    runs: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        runs.append(task.n)
        if len(runs) == 1:
            raise RuntimeError("first run fails")

    await app.declare()
    async with amqp.channel() as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(
                gzip.compress(b'{"n": 7}'),
                content_type="application/json",
                content_encoding="gzip",
                type=job.name,
                headers={"amqtask-task": job.name},
            ),
            routing_key=job.queue,
        )
    async with running(app):
        await wait_for(lambda: depth_is(amqp, f"{job.queue}.dead", 1))
        assert await _dead_letters.replay(app, job) == 1
        await wait_for(lambda: runs == [7, 7])  # decoded again after the replay
    assert await queue_depth(amqp, f"{job.queue}.dead") == 0


def without_limit(app: amqtask.App, queue: str) -> dict[str, Any]:
    """`queue`'s arguments as amqtask declared them before it set a dead-letter queue's limit."""
    arguments = dict(app.topology.queue(queue).arguments)
    del arguments["x-delivery-limit"]
    return arguments


async def test_a_dead_letter_read_more_times_than_a_default_delivery_limit_is_never_dropped(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    dead = f"{job.queue}.dead"
    async with amqp.channel() as channel:
        await channel.default_exchange.publish(aio_pika.Message(b"{}", message_id="m1"), dead)

    for _ in range(25):  # each read hands the letter back: one delivery more on a quorum queue
        await wait_for(lambda: depth_is(amqp, dead, 1))  # back from the read before
        count, letters = await _dead_letters.list_dead_letters(app, job)
        assert (count, [letter.message_id for letter in letters]) == (1, ["m1"])

    # The broker holds the queue's limit: RabbitMQ 4.x would otherwise apply its default of 20.
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="2147483647"):
        async with amqp.channel() as channel:
            await channel.declare_queue(dead, durable=True, arguments=without_limit(app, dead))


async def test_a_dead_letter_queue_declared_without_the_limit_is_left_as_is_with_a_note(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    dead = f"{job.queue}.dead"
    async with amqp.channel() as channel:  # as amqtask declared it before
        await channel.declare_queue(dead, durable=True, arguments=without_limit(app, dead))

    plan = await app.declare()  # no TopologyConflict

    (step,) = [s for s in plan.steps if s.entity.name == dead]
    assert step.state.value == "up-to-date"
    assert [(c.argument, c.actual) for c in step.by_policy] == [("x-delivery-limit", None)]
    assert "set it with a policy" in plan.render()
    assert (await app.plan()).up_to_date
