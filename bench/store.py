"""The task store's cost: worker throughput with no store, with SQLite, with PostgreSQL, and with
PostgreSQL and `deduplicate=True`, side by side in one run; and how soon `App.result` returns
once the handler has finished (PostgreSQL: LISTEN/NOTIFY; SQLite: `data_version` polled).

The apps here are `bench.app`'s job contract with a store; the stores' locations come from
`BENCH_STORE_SQLITE` (a file in a temporary directory) and `BENCH_STORE_POSTGRES` (the local
server, a schema of the run's own), set by `measure` and removed at its end.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import amqtask
import amqtask.store
from bench import _scenarios as s
from bench.app import NAMESPACE, URL, Job, job, timeline

if TYPE_CHECKING:
    from bench.__main__ import Bench

POSTGRES = os.environ.get("AMQTASK_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
SQLITE_URL = os.environ.get("BENCH_STORE_SQLITE", "sqlite:///:memory:")
POSTGRES_URL = os.environ.get("BENCH_STORE_POSTGRES", f"{POSTGRES}?schema=bench")

once = amqtask.contract(job.name, Job, queue=job.queue, deduplicate=True)
sqlite = amqtask.App(URL, [job], namespace=NAMESPACE, name="bench-sqlite", store=SQLITE_URL)
postgres = amqtask.App(URL, [job], namespace=NAMESPACE, name="bench-pg", store=POSTGRES_URL)
dedupe = amqtask.App(URL, [once], namespace=NAMESPACE, name="bench-pg-once", store=POSTGRES_URL)


@sqlite.handler(job)
@postgres.handler(job)
async def do_job(task: Job) -> None:
    timeline.tick()


@dedupe.handler(once)
async def do_once(task: Job) -> None:
    timeline.tick()


SIDES = {"no store": "bench.app:tasks", "SQLite": "bench.store:sqlite"}
SIDES |= {"PostgreSQL": "bench.store:postgres", "PostgreSQL + deduplicate": "bench.store:dedupe"}


def worker(target: str, concurrency: int, log_level: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "amqtask", "worker", target, "--json-logs"),
        *("--concurrency", str(concurrency), "--log-level", log_level),
    ]


async def measure(bench: Bench) -> None:
    """Add the store's rows to `bench`: throughput ratios against no store, result latency."""
    import asyncpg

    from bench.__main__ import Row

    directory = tempfile.mkdtemp(prefix="amqtask-bench-store-")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    os.environ["BENCH_STORE_SQLITE"] = f"sqlite:///{Path(directory) / 'tasks.db'}"
    os.environ["BENCH_STORE_POSTGRES"] = f"{POSTGRES}?schema={schema}"
    stores = [
        amqtask.store.open_store(os.environ["BENCH_STORE_SQLITE"]),
        amqtask.store.open_store(os.environ["BENCH_STORE_POSTGRES"]),
    ]
    for store in stores:
        await store.migrate()
        await store.close()
    # The revocation exchange the tracked workers bind to (topology only: the stores are above).
    await postgres.transport.apply(await postgres.plan())
    args, log_level = bench.args, bench.args.worker_log_level
    try:

        async def one(side: str) -> float:
            await bench.env.purge(job.queue)
            await s.preload(bench.env, bench.raw, args.consume)
            command = worker(SIDES[side], args.prefetch, log_level)
            rate, _ = await s.consume_rate(bench.env, [command], args.consume)
            return rate

        runs = await bench.compare(
            "worker with a task store", one, tuple(SIDES), args.worker_repeat
        )
        for side in list(SIDES)[1:]:
            tracked = "deduplicate" not in side
            bench.rows.append(
                Row(
                    f"worker, {side} store vs none",
                    "msgs/s",
                    runs[side],
                    runs["no store"],
                    baseline_label="no store",
                    target=(">=", 0.7) if tracked else None,
                    note=""
                    if tracked
                    else "a claim round trip before each task, its success stored before the ack",
                )
            )
        for side in ("PostgreSQL", "SQLite"):
            url = os.environ[f"BENCH_STORE_{'POSTGRES' if side == 'PostgreSQL' else 'SQLITE'}"]
            latencies = await result_latencies(bench, SIDES[side], url, args.calls)
            bench.rows.append(
                Row(
                    f"result() after the handler returned, {side}, p50",
                    "ms",
                    [s.percentile(latencies, 50)],
                    [5.0],
                    baseline_label="goal",
                    target=("<=", 1.0),
                    note=f"p99 {s.percentile(latencies, 99):.2f} ms; from the handler's end "
                    "(so including the worker's 2 ms batching) to result() returning",
                )
            )
    finally:
        async with bench.env.connection.channel() as channel:
            await channel.exchange_delete(postgres.names.revoke_exchange)
        connection = await asyncpg.connect(POSTGRES)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()
        for name in ("BENCH_STORE_SQLITE", "BENCH_STORE_POSTGRES"):
            os.environ.pop(name, None)
        shutil.rmtree(directory, ignore_errors=True)


async def result_latencies(bench: Bench, target: str, url: str, count: int) -> list[float]:
    """Milliseconds from a task's end (its `finished_at`) to `App.result` returning, one task at
    a time, with one worker running `target`."""
    producer = amqtask.App(URL, [job], namespace=NAMESPACE, name="bench-result", store=url)
    latencies: list[float] = []
    async with s.consumers(bench.env, [worker(target, 10, "warning")]) as running:

        async def ready() -> bool:
            _, consumers = await bench.env.queue_state(job.queue)
            return consumers >= 1

        await s.wait_until(ready, running)
        async with producer:
            for n in range(count + 20):
                task_id = await producer.send(job, s.payload(n))
                await producer.result(job, task_id, timeout=30)
                returned = time.time()
                info = await producer.task(task_id)
                assert info is not None
                assert info.finished_at is not None
                if n >= 20:  # warm-up
                    latencies.append((returned - info.finished_at.timestamp()) * 1000)
    return latencies
