"""The worker service: the example's app with its handlers.

amqtask declare examples.app:app
amqtask worker examples.app:app
"""

import asyncio
import os

import structlog

import amqtask
from examples.contracts import CONTRACTS, Notify, Resize, Resized, notify, resize

BROKER_URL = os.environ.get("AMQTASK_URL", "amqp://guest:guest@127.0.0.1:5672/")

app = amqtask.App(
    BROKER_URL,
    contracts=CONTRACTS,
    namespace=os.environ.get("AMQTASK_NAMESPACE", "amqtask"),
    name="example-worker",
)
log = structlog.get_logger("examples.worker")


@app.handler(resize)
async def do_resize(job: Resize) -> Resized:
    await asyncio.sleep(0.05)  # stands in for real image work
    return Resized(path=job.path.replace(".png", f"-{job.width}.png"), size=job.width * job.width)


def deliver_mail(user: str, text: str) -> None:
    """Stands in for the mail server (raises `ConnectionError` when it is unreachable)."""
    log.info("notified", user=user, text=text)


@app.handler(notify)
def do_notify(job: Notify) -> None:
    # A plain `def` runs in a worker thread, so blocking I/O here does not stall the loop.
    if job.user == "nobody":
        raise LookupError(f"no such user: {job.user}")
    deliver_mail(job.user, job.text)
