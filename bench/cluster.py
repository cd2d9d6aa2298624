"""`python -m bench.cluster`: what replication costs. Sends and the worker on a 3-node cluster
against one node, amqtask and raw aio-pika on both, in one run.

Both brokers are private nodes of the local RabbitMQ install started for the run (the cluster
as the tests start it: `tests/integration/cluster.py`), neither with the management plugin, and
removed at the end; the shared broker is not used. The clients connect to the first node; the
quorum queues have one replica on the single node and three on the cluster, their leaders
spread over the nodes (`leader_locator="balanced"`), so a publish may be forwarded to another
node's leader, as in production. Each measurement alternates which side goes first.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika

import amqtask
from bench import _scenarios as s

BROKERS = ("1 node", "3 nodes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--repeat", type=int, default=3, help="repetitions of each measurement")
    add("--pipelined", type=int, default=5_000, help="sends with --concurrency in flight")
    add("--concurrency", type=int, default=100, help="sends in flight")
    add("--consume", type=int, default=10_000, help="queued tasks a worker drains")
    add("--prefetch", type=int, default=50, help="worker concurrency and prefetch (both sides)")
    return parser.parse_args(argv)


def boot() -> tuple[Any, Any]:
    """A single private node and a 3-node cluster, started at once."""
    from tests.integration.cluster import Cluster
    from tests.integration.private_node import PrivateNode

    single, cluster = PrivateNode(), Cluster(management=False)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = [pool.submit(single.start, 90), pool.submit(cluster.boot, 120)]
        try:
            for future in started:
                future.result()
        except BaseException:
            single.cleanup()
            cluster.cleanup()
            raise
    return single, cluster


async def measure(
    url: str, apps: Any, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, dict[str, list[float]]]:
    """Pipelined sends and worker drains of amqtask and raw aio-pika against `url`."""
    apps.tasks.use_urls(url)
    await apps.tasks.declare()
    connection = await aio_pika.connect(url)
    raw = await aio_pika.connect_robust(url)
    env = s.Env(url, apps.NAMESPACE, apps, connection, await connection.channel())
    job = apps.job
    results: dict[str, dict[str, list[float]]] = {}
    try:

        async def send(side: str) -> float:
            count, concurrency = args.pipelined, args.concurrency
            if side == "amqtask":
                app = amqtask.App(url, [job], namespace=apps.NAMESPACE, name="bench")
                async with app:

                    def one(n: int) -> Awaitable[Any]:
                        return app.send(job, s.payload(n))

                    await s.sends(200, concurrency, one)  # warm-up
                    await env.purge(job.queue)
                    rate = await s.sends(count, concurrency, one)
            else:
                producer_connection = await aio_pika.connect_robust(url)
                try:
                    producer = await s.RawProducer.open(
                        producer_connection, apps.tasks.names.task_exchange, job.routing_key
                    )
                    await s.sends(200, concurrency, producer.send)
                    await env.purge(job.queue)
                    rate = await s.sends(count, concurrency, producer.send)
                finally:
                    await producer_connection.close()
            await env.purge(job.queue)
            return rate

        async def work(side: str) -> float:
            count = args.consume
            await env.purge(job.queue)
            await s.preload(env, raw, count, job)
            if side == "amqtask":
                command = s.amqtask_worker("tasks", args.prefetch, 1, "warning")
            else:
                command = s.raw_consumer("consume", job.queue, args.prefetch)
            rate, _ = await s.consume_rate(env, [command], count, job.queue)
            return rate

        for name, one in (
            (f"send, {args.concurrency} in flight (msgs/s)", send),
            ("worker, 1 process (msgs/s)", work),
        ):
            runs: dict[str, list[float]] = {"amqtask": [], "raw": []}
            for rep, order in s.interleaved(args.repeat, ("amqtask", "raw")):
                for side in order:
                    runs[side].append(await one(side))
                last = {side: f"{values[-1]:,.0f}" for side, values in runs.items()}
                log(f"{name} #{rep + 1}: amqtask {last['amqtask']}, raw {last['raw']}")
            results[name] = runs
    finally:
        await raw.close()
        await connection.close()
    return results


def _cell(runs: list[float]) -> str:
    return f"{s.median(runs):,.0f} ({min(runs):,.0f}-{max(runs):,.0f})"


def render(results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    """One row per measurement and side: 1 node, 3 nodes, their ratio; amqtask/raw on each."""
    header = ("measurement", "side", *BROKERS, "3 nodes / 1 node")
    rows: list[tuple[str, ...]] = []
    single, cluster = (results[broker] for broker in BROKERS)
    for name in single:
        for side in ("amqtask", "raw"):
            one, three = single[name][side], cluster[name][side]
            ratio = s.median(three) / s.median(one)
            rows.append((name, side, _cell(one), _cell(three), f"{ratio:.2f}x"))
        rows.append(
            (
                name,
                "amqtask / raw",
                f"{s.median(single[name]['amqtask']) / s.median(single[name]['raw']):.2f}x",
                f"{s.median(cluster[name]['amqtask']) / s.median(cluster[name]['raw']):.2f}x",
                "",
            )
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, list[float]]]]:
    def log(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    log("starting a single node and a 3-node cluster (private, about 30 s)")
    single, cluster = await asyncio.to_thread(boot)
    try:
        os.environ["BENCH_NAMESPACE"] = f"bench-{uuid.uuid4().hex[:8]}"
        os.environ["AMQTASK_URL"] = single.url
        apps = importlib.import_module("bench.app")
        results = {}
        for broker, url in zip(BROKERS, (single.url, cluster.urls[0]), strict=True):
            log(f"{broker}:")
            results[broker] = await measure(url, apps, args, log)
        return results
    finally:
        await asyncio.to_thread(single.cleanup)
        await asyncio.to_thread(cluster.cleanup)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    print(
        f"\nmedian (min-max) of {args.repeat} interleaved runs; {os.cpu_count()} CPUs, "
        "brokers and clients on this machine\n"
    )
    print(render(results))


if __name__ == "__main__":
    main()
