"""`amqtask dlq list|replay|purge` against the real broker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask

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
