"""Runs the two example services against the broker and prints what happened.

    python -m examples.demo

1. `amqtask declare examples.app:app` creates the exchanges and queues;
2. a worker service starts (`amqtask worker examples.app:app`, a separate process);
3. the producer service sends tasks, each confirmed by the broker;
4. the worker's structured log shows each task's outcome; the failed one is read back from its
   dead-letter queue with the reason in its headers;
5. the worker gets SIGTERM and stops gracefully.

Exits 1 if any expected outcome does not appear within 60 seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import aio_pika
import orjson

from examples.app import app
from examples.producer import main as run_producer

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = Counter(
    {
        ("images.resize", "succeeded"): 6,
        ("users.notify", "succeeded"): 1,
        ("users.notify", "failed"): 1,
    }
)


def amqtask_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "amqtask", *args]


async def read_outcomes(
    worker: asyncio.subprocess.Process, deadline: float
) -> Counter[tuple[str, str]]:
    seen: Counter[tuple[str, str]] = Counter()
    assert worker.stderr is not None
    while seen != EXPECTED:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            line = await asyncio.wait_for(worker.stderr.readline(), remaining)
        except TimeoutError:
            break
        if not line:
            break
        event = orjson.loads(line)
        if event["event"].startswith("task_"):
            seen[(event["task"], event["outcome"])] += 1
            print(
                f"worker:   {event['event']:<15} {event['task']:<14} "
                f"id={event['message_id'][:8]} {event['duration_ms']:.1f} ms"
                + (f"  {event['error']}" if "error" in event else "")
            )
    return seen


async def read_dead_letter() -> None:
    connection = await aio_pika.connect(app.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("notifications.dead", passive=True)
        message = await queue.get(fail=False, timeout=5)
        if message is None:
            print("dead letters: none found in notifications.dead")
            return
        headers = message.headers
        print(
            f"dead letter in notifications.dead: reason={headers['amqtask-reason']} "
            f"error={headers['amqtask-error']!r}"
        )
        await message.ack()  # the demo tidies up after itself


async def main() -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    declare = await asyncio.create_subprocess_exec(
        *amqtask_command("declare", "examples.app:app"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await declare.communicate()
    print(out.decode().rstrip())
    if declare.returncode != 0:
        print(err.decode(), file=sys.stderr)
        return 1

    worker = await asyncio.create_subprocess_exec(
        *amqtask_command("worker", "examples.app:app", "--json-logs", "--concurrency", "4"),
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await run_producer()
        seen = await read_outcomes(worker, time.monotonic() + 60)
        await read_dead_letter()
    finally:
        worker.send_signal(signal.SIGTERM)
        code = await worker.wait()
    print(f"worker: stopped on SIGTERM with exit code {code}")
    if seen != EXPECTED:
        print(f"FAILED: expected {dict(EXPECTED)}, saw {dict(seen)}", file=sys.stderr)
        return 1
    print("all tasks accounted for")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
