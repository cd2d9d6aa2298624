"""An app with called tasks for subprocess tests (the `call` and `send` commands).

`build(unique, url)` makes it; the module-level `app` is built from TEST_UNIQUE and
TEST_BROKER_URL when they are set, so tests can import `build` without them.
"""

import asyncio
import os

from pydantic import BaseModel

import amqtask


class Numbers(BaseModel):
    n: int


class Doubled(BaseModel):
    m: int


def build(unique: str, url: str) -> amqtask.App:
    double = amqtask.contract(f"{unique}.double", Numbers, returns=Doubled)
    fail = amqtask.contract(f"{unique}.fail", Numbers, returns=Doubled)
    nap = amqtask.contract(f"{unique}.nap", Numbers)  # sleeps n tenths of a second, returns None
    app = amqtask.App(url, [double, fail, nap], namespace=unique)

    @app.handler(double)
    async def do_double(task: Numbers) -> Doubled:
        return Doubled(m=task.n * 2)

    @app.handler(fail)
    async def do_fail(task: Numbers) -> Doubled:
        raise LookupError(f"no such number: {task.n}")

    @app.handler(nap)
    async def do_nap(task: Numbers) -> None:
        await asyncio.sleep(task.n / 10)

    return app


app = (
    build(os.environ["TEST_UNIQUE"], os.environ["TEST_BROKER_URL"])
    if "TEST_UNIQUE" in os.environ
    else None
)
