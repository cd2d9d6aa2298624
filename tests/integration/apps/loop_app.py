"""A worker app for `amqtask worker --loop`: each task records which event loop ran it.

Appends "<n> <module of the running loop's class>" to TEST_RECORD_FILE (`uvloop` or `asyncio`).
"""

import asyncio
import os

from pydantic import BaseModel

import amqtask


class Job(BaseModel):
    n: int


UNIQUE = os.environ["TEST_UNIQUE"]
RECORD = os.environ["TEST_RECORD_FILE"]

job = amqtask.contract(f"{UNIQUE}.job", Job)
app = amqtask.App(os.environ["TEST_BROKER_URL"], [job], namespace=UNIQUE)


def record(line: str) -> None:
    with open(RECORD, "a") as f:
        f.write(line + "\n")


@app.handler(job)
async def handle(task: Job) -> None:
    record(f"{task.n} {type(asyncio.get_running_loop()).__module__.split('.')[0]}")
