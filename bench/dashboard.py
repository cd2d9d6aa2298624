"""`python -m bench.dashboard`: the dashboard with 200 tasks and 10,000 dead letters.

An app of 200 contracts is declared under a fresh namespace on the broker (AMQTASK_URL, default
the local one; classic queues, which a single node declares in a fraction of a quorum queue's
time: the dashboard reads both alike); 10,000 dead letters of 2 KiB each are published straight
into the first task's dead-letter queue. `amqtask dashboard` serves it in a process of its own.
Measured: the latency of /api/overview (100 requests, one after another: p50, p95), of the dead
letters' last page (/api/dead-letters/{task}?offset=9900, 10 requests) and the server's peak RSS
(VmHWM) before and after the paging. Everything created is deleted at the end. The target
"overview < 200 ms" is reported as met or missed, not asserted.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import os
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp

import amqtask

URL = os.environ.get("AMQTASK_URL", "amqp://guest:guest@127.0.0.1:5672/")
TASKS = 200
DEAD_LETTERS = 10_000
BODY = 2048
PORT = int(os.environ.get("BENCH_DASHBOARD_PORT", "8977"))
TARGET_MS = 200.0


def write_app(directory: Path, namespace: str) -> str:
    (directory / "dashboard_bench_app.py").write_text(
        textwrap.dedent(
            f"""
            from pydantic import BaseModel
            import amqtask

            class Job(BaseModel):
                n: int

            contracts = [
                amqtask.contract(f"{namespace}.task{{i:03d}}", Job, queue_type="classic")
                for i in range({TASKS})
            ]
            app = amqtask.App({URL!r}, contracts, namespace={namespace!r})
            """
        )
    )
    return "dashboard_bench_app:app"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def publish_dead_letters(queue: str) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        body = b"x" * BODY
        for start in range(0, DEAD_LETTERS, 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            body,
                            message_id=f"dl-{n}",
                            headers={"amqtask-reason": "handler_error", "amqtask-attempt": 3},
                        ),
                        routing_key=queue,
                    )
                    for n in range(start, min(start + 500, DEAD_LETTERS))
                )
            )


async def timed(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
        assert response.status == 200, (url, response.status)
    return (time.perf_counter() - started) * 1000


async def main() -> None:
    print = functools.partial(builtins.print, flush=True)  # progress, also through a pipe
    namespace = f"benchdash{uuid.uuid4().hex[:8]}"
    directory = Path(tempfile.mkdtemp())
    target = write_app(directory, namespace)
    sys.path.insert(0, str(directory))
    from dashboard_bench_app import app  # type: ignore[import-not-found]

    assert isinstance(app, amqtask.App)
    await app.declare()
    server: asyncio.subprocess.Process | None = None
    try:
        first = sorted(app.contracts, key=lambda c: c.name)[0]
        started = time.perf_counter()
        await publish_dead_letters(f"{first.queue}.dead")
        print(
            f"{TASKS} tasks declared, {DEAD_LETTERS} dead letters of {BODY} B published "
            f"in {time.perf_counter() - started:.1f} s"
        )
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "amqtask", "dashboard", target, "--port", str(PORT)),
            cwd=directory,
            env={**os.environ, "PYTHONPATH": str(directory)},
        )
        base = f"http://127.0.0.1:{PORT}"
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.get(f"{base}/api/overview") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            overview = [await timed(session, f"{base}/api/overview") for _ in range(100)]
            before = peak_rss_mib(server.pid)
            page = f"{base}/api/dead-letters/{first.name}?offset={DEAD_LETTERS - 100}&limit=100"
            paging = [await timed(session, page) for _ in range(10)]
            after = peak_rss_mib(server.pid)
        p50, p95 = statistics.median(overview), percentile(overview, 0.95)
        print(f"/api/overview ({TASKS} tasks, 100 requests): p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        print(
            f"/api/dead-letters offset={DEAD_LETTERS - 100} limit=100 (10 requests): "
            f"p50 {statistics.median(paging):.0f} ms, max {max(paging):.0f} ms"
        )
        print(
            f"server peak RSS: {before:.0f} MiB before paging, {after:.0f} MiB after "
            f"(the dead-letter queue holds {DEAD_LETTERS * BODY / 2**20:.0f} MiB of bodies)"
        )
        print(f"overview < {TARGET_MS:.0f} ms (p95): {'met' if p95 < TARGET_MS else 'MISSED'}")
    finally:
        if server is not None:
            server.terminate()
            await server.wait()
        connection = await aio_pika.connect(URL)
        async with connection:
            for queue in app.topology.queues:
                async with connection.channel() as channel:
                    await channel.queue_delete(queue.name)
            for exchange in app.topology.exchanges:
                async with connection.channel() as channel:
                    await channel.exchange_delete(exchange.name)
        await app.close()


if __name__ == "__main__":
    asyncio.run(main())
