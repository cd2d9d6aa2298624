"""The worker against the real broker: acks late, dead-letters with reasons, survives reconnects."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import aio_pika
import pytest
import structlog
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask._transport import AioPikaTransport

from .conftest import AppFactory, dead_letters, queue_depth, running, wait_for
from .proxy import start_proxy


class Job(BaseModel):
    n: int


async def test_every_sent_task_is_processed_exactly_once_and_acked(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    seen: Counter[int] = Counter()

    @app.handler(job)
    async def handle(task: Job) -> None:
        await asyncio.sleep(0.001)
        seen[task.n] += 1

    await app.declare()
    producer = make_app([job])
    async with producer:
        await asyncio.gather(*(producer.send(job, Job(n=i)) for i in range(300)))

    async with running(app, concurrency=8):
        await wait_for(lambda: sum(seen.values()) >= 300)

    assert seen == Counter(range(300))
    # Nothing left ready or unacked once the worker's channel closed.
    assert await queue_depth(amqp, job.queue) == 0
    assert await queue_depth(amqp, f"{job.queue}.dead") == 0


async def test_malformed_messages_are_dead_lettered_with_their_reason_and_work_goes_on(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    done: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        done.append(task.n)

    await app.declare()
    headers = {"amqtask-task": job.name, "amqtask-version": 1}
    bad = [
        (b"not json at all", headers, "application/json", "undecodable_body"),
        (b'{"n": "seven"}', headers, "application/json", "invalid_payload"),
        (b'{"m": 1}', headers, "application/json", "invalid_payload"),
        (b'{"n": 1}', {"amqtask-task": "no.such.task"}, "application/json", "unknown_task"),
        (b'{"n": 2}', {}, "application/json", "missing_task_header"),
        (b"<n>1</n>", headers, "application/xml", "unsupported_content_type"),
    ]
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(app.names.task_exchange)
        for body, message_headers, content_type, _ in bad:
            await exchange.publish(
                aio_pika.Message(body, headers=message_headers, content_type=content_type),
                job.routing_key,
            )
    async with running(app, concurrency=2):
        # A good task after the bad ones: the worker is still consuming.
        producer = make_app([job])
        async with producer:
            await producer.send(job, Job(n=42))
        await wait_for(lambda: done == [42])
        letters = await dead_letters(amqp, job.queue, len(bad))

    by_body = {letter.body: letter for letter in letters}
    for body, _, content_type, reason in bad:
        letter = by_body[body]
        assert letter.headers["amqtask-reason"] == reason
        assert letter.headers["amqtask-error"]
        assert letter.headers["amqtask-queue"] == job.queue
        assert letter.content_type == content_type
    assert "seven" in by_body[b'{"n": "seven"}'].headers["amqtask-error"]
    assert await queue_depth(amqp, job.queue) == 0


async def test_a_failing_handler_dead_letters_the_task_with_the_exception(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=1))
    app = make_app([job])
    calls: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        calls.append(task.n)
        if task.n == 1:
            raise KeyError("the thing is missing")

    await app.declare()
    async with app:
        sent = await app.send(job, Job(n=1))
        await app.send(job, Job(n=2))
    with structlog.testing.capture_logs() as logs:
        async with running(app):
            await wait_for(lambda: sorted(calls) == [1, 2])
            (letter,) = await dead_letters(amqp, job.queue, 1)

    assert letter.message_id == sent
    assert letter.body == b'{"n":1}'
    assert letter.headers["amqtask-reason"] == "handler_error"
    assert letter.headers["amqtask-error-type"] == "builtins.KeyError"
    assert letter.headers["amqtask-error"] == "KeyError: 'the thing is missing'"
    assert 'raise KeyError("the thing is missing")' in letter.headers["amqtask-traceback"]
    outcomes = {(e["event"], e.get("message_id")) for e in logs if e["event"].startswith("task_")}
    assert ("task_failed", sent) in outcomes
    assert sum(1 for e in logs if e["event"] == "task_succeeded") == 1
    failed = next(e for e in logs if e["event"] == "task_failed")
    assert failed["task"] == job.name
    assert failed["outcome"] == "failed"
    assert isinstance(failed["duration_ms"], float)


async def test_a_plain_def_handler_runs_in_a_thread_not_on_the_event_loop(
    make_app: AppFactory, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    threads: list[str] = []

    @app.handler(job)
    def handle(task: Job) -> None:
        threads.append(threading.current_thread().name)

    await app.declare()
    async with app:
        await app.send(job, Job(n=1))
    async with running(app):
        await wait_for(lambda: len(threads) == 1)
    assert threads[0].startswith("amqtask-handler")


async def test_the_worker_refuses_to_start_before_declare(
    make_app: AppFactory, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    app.handler(job)(lambda task: None)
    worker = amqtask.Worker(app)
    with pytest.raises(amqtask.TopologyMissing, match=f"queue '{unique}.job'.*amqtask declare"):
        await worker.start()
    await worker.stop()


async def test_after_a_connection_cut_the_lost_ack_is_logged_and_consuming_resumes(
    make_app: AppFactory, broker_url: str, amqp: AbstractConnection, unique: str
) -> None:
    proxy, proxied_url = await start_proxy(broker_url)
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job], transport=AioPikaTransport(proxied_url))
    release = asyncio.Event()
    runs: Counter[int] = Counter()

    @app.handler(job)
    async def handle(task: Job) -> None:
        runs[task.n] += 1
        if task.n == 1 and runs[1] == 1:
            await release.wait()  # hold the first delivery while its connection is cut

    await app.declare()
    producer = make_app([job])
    async with producer:
        await producer.send(job, Job(n=1))
        with structlog.testing.capture_logs() as logs:
            async with running(app, concurrency=2):
                await wait_for(lambda: runs[1] == 1)
                proxy.cut()
                await asyncio.sleep(0.2)
                release.set()  # the handler finishes; its ack has no channel any more
                await wait_for(lambda: runs[1] == 2, timeout=30)  # redelivered after reconnect
                await producer.send(job, Job(n=2))
                await wait_for(lambda: runs[2] == 1, timeout=30)  # the consumer resumed
    await proxy.close()

    assert any(e["event"] == "settle_failed" for e in logs), logs
    assert await queue_depth(amqp, job.queue) == 0
