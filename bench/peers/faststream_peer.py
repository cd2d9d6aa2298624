"""FastStream's side: a `RabbitBroker` subscriber, `publish` with confirms, and `request`.

Tasks go to a quorum queue of its own (default exchange), persistent, on a channel with publisher
confirms (FastStream's default) and a prefetch of `--prefetch`; the subscriber validates the body
with a pydantic model (as amqtask does) and acks after the handler. Requests (`broker.request`,
FastStream's request/response over direct reply-to, transient by default) go to a classic queue
whose subscriber returns the reply. The benchmark deletes the queues afterwards. FastStream's
per-message INFO logs are off (WARNING), as the amqtask workers run at `--log-level warning`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from pydantic import BaseModel

from bench.peers import _common


class Job(BaseModel):
    n: int
    user: str
    text: str


args = _common.parse()
logging.basicConfig(level=logging.WARNING)
broker = RabbitBroker(_common.URL, log_level=logging.DEBUG)
channel = Channel(prefetch_count=args.prefetch)
if args.mode in ("respond", "call"):
    queue = RabbitQueue(args.queue, durable=False, auto_delete=True)
else:
    queue = RabbitQueue(args.queue, durable=True, queue_type=QueueType.QUORUM)

if args.mode == "work":

    @broker.subscriber(queue, channel=channel)
    async def handle(job: Job) -> None:
        if args.workload == "cpu":
            _common.burn_cpu()
        _common.timeline.tick()

elif args.mode == "respond":

    @broker.subscriber(queue, channel=channel)
    async def respond(job: Job) -> dict[str, int]:
        return {"n": job.n}


async def serve() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with broker:
        await broker.start()
        await stop.wait()


async def main() -> None:
    if args.mode in ("work", "respond"):
        await serve()
        return
    async with broker:
        await broker.connect()
        if args.mode == "produce":
            await broker.declare_queue(queue)

            async def send(n: int) -> None:
                await broker.publish(_common.payload(n), queue=queue.name, persist=True)

            if args.warmup:
                await _common.async_sends(args.warmup, args.in_flight, send)
            _common.report(rate=await _common.async_sends(args.count, args.in_flight, send))
            return

        async def call(n: int) -> None:
            reply = await broker.request(_common.payload(n), queue=queue.name, timeout=30)
            await reply.decode()

        if args.warmup:
            await _common.async_sends(args.warmup, args.in_flight, call)
        if args.in_flight > 1:
            _common.report(rate=await _common.async_sends(args.count, args.in_flight, call))
            return
        times = []
        for n in range(args.count):
            started = time.perf_counter()
            await call(n)
            times.append(time.perf_counter() - started)
        _common.report(
            p50=_common.percentile(times, 50) * 1000, p99=_common.percentile(times, 99) * 1000
        )


if __name__ == "__main__":
    asyncio.run(main())
