"""Taskiq's side: `taskiq-aio-pika`'s broker, a receiver in this process, and `kiq` sends.

The queue is a quorum queue (taskiq-aio-pika's default) behind an exchange of its own, with its
dead letter queue (`.dead`); the benchmark deletes all three afterwards. Messages are persistent
and published on a channel with confirms (aio-pika's default), so `kiq` returns once the broker
confirmed. The receiver runs `--prefetch` async tasks at a time with as many prefetched (`qos`)
and acks once a task is done (`WHEN_SAVED`, Taskiq's default; no result backend).
"""

from __future__ import annotations

import asyncio
import signal

from taskiq.api import run_receiver_task
from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.exchange import Exchange
from taskiq_aio_pika.queue import Queue

from bench.peers import _common

args = _common.parse()
broker = AioPikaBroker(
    _common.URL,
    qos=args.prefetch,
    exchange=Exchange(name=args.queue),
    task_queues=[Queue(name=args.queue)],
    dead_letter_queue=Queue(name=f"{args.queue}.dead"),
)


@broker.task(task_name="bench.noop")
async def noop(n: int, user: str, text: str) -> None:
    _common.timeline.tick()


@broker.task(task_name="bench.cpu")
async def cpu(n: int, user: str, text: str) -> None:
    _common.burn_cpu()
    _common.timeline.tick()


async def main() -> None:
    task = cpu if args.workload == "cpu" else noop
    if args.mode == "produce":
        await broker.startup()

        async def send(n: int) -> None:
            await task.kiq(**_common.payload(n))

        if args.warmup:
            await _common.async_sends(args.warmup, args.in_flight, send)
        _common.report(rate=await _common.async_sends(args.count, args.in_flight, send))
        await broker.shutdown()
        return
    if args.mode != "work":
        raise SystemExit(f"taskiq_peer: {args.mode} is not measured for Taskiq")
    broker.is_worker_process = True
    await broker.startup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    receiving = asyncio.create_task(
        run_receiver_task(broker, max_async_tasks=args.prefetch, run_startup=False)
    )
    await stop.wait()
    receiving.cancel()
    await asyncio.gather(receiving, return_exceptions=True)
    await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
