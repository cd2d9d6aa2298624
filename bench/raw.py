"""The raw aio-pika twins of the amqtask worker: a consumer and an RPC responder process.

    python -m bench.raw consume QUEUE --prefetch 50
    python -m bench.raw respond QUEUE --prefetch 100
    python -m bench.raw rpc-pattern METHOD --prefetch 100

What a careful user would write with aio-pika alone: a robust connection, manual acks, the body
decoded with orjson (no validation), one task per delivery (aio-pika's own). The responder
replies through the default exchange on its channel (publisher confirms on, aio-pika's default)
and acks after the reply. `rpc-pattern` serves METHOD with aio-pika's `patterns.RPC` (which
declares the method's queue itself), the peer of amqtask's calls. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.patterns import RPC

from bench._timeline import Timeline


async def main(mode: str, queue_name: str, prefetch: int) -> None:
    url = os.environ.get("AMQTASK_URL", "amqp://guest:guest@127.0.0.1:5672/")
    timeline = Timeline.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)

        async def consume(message: AbstractIncomingMessage) -> None:
            orjson.loads(message.body)
            timeline.tick()
            await message.ack()

        async def respond(message: AbstractIncomingMessage) -> None:
            request = orjson.loads(message.body)
            assert message.reply_to is not None
            await channel.default_exchange.publish(
                aio_pika.Message(
                    orjson.dumps({"n": request["n"]}),
                    correlation_id=message.correlation_id,
                    content_type="application/json",
                ),
                message.reply_to,
                mandatory=False,  # RabbitMQ 3.10 returns mandatory replies to direct reply-to
            )
            await message.ack()

        if mode == "rpc-pattern":
            rpc = await RPC.create(channel)

            async def echo(*, n: int, user: str, text: str) -> dict[str, int]:
                return {"n": n}

            await rpc.register(queue_name, echo, auto_delete=True)
            await stop.wait()
            await rpc.close()
            return
        queue = await channel.declare_queue(queue_name, passive=True)
        tag = await queue.consume(consume if mode == "consume" else respond)
        await stop.wait()
        await queue.cancel(tag)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.raw")
    parser.add_argument("mode", choices=["consume", "respond", "rpc-pattern"])
    parser.add_argument("queue")
    parser.add_argument("--prefetch", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.mode, args.queue, args.prefetch))
