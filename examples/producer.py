"""The producer service: imports the contracts only, never the handlers."""

import asyncio
import os

import amqtask
from examples.contracts import CONTRACTS, Resize, notify, resize

BROKER_URL = os.environ.get("AMQTASK_URL", "amqp://guest:guest@127.0.0.1:5672/")

producer = amqtask.App(
    BROKER_URL,
    contracts=CONTRACTS,
    namespace=os.environ.get("AMQTASK_NAMESPACE", "amqtask"),
    name="example-producer",
)


async def main() -> None:
    async with producer:
        # Many sends in flight on one channel; each returns once the broker confirmed it.
        ids = await asyncio.gather(
            *(
                producer.send(resize, Resize(path=f"photo{i}.png", width=64 * i))
                for i in range(1, 6)
            )
        )
        print(f"producer: sent {len(ids)} images.resize tasks, all confirmed")
        # A call waits for the worker's typed reply (over direct reply-to).
        resized = await producer.call(resize, Resize(path="cover.png", width=32), timeout=10)
        print(f"producer: call images.resize -> {resized!r}")
        await producer.send(notify, {"user": "ada", "text": "your images are ready"})
        await producer.send(notify, {"user": "nobody", "text": "this one fails"})
        print("producer: sent 2 users.notify tasks (one will fail and be dead-lettered)")
        try:
            await producer.send(resize, {"path": "bad.png", "width": -1})
        except Exception as exc:  # pydantic.ValidationError: nothing was published
            print(f"producer: refused locally, nothing published: {type(exc).__name__}")


if __name__ == "__main__":
    asyncio.run(main())
