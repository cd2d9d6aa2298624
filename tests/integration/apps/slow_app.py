"""A worker app for subprocess tests. Its names and timing come from the environment.

Each handler appends "start <n>" when it begins and "done <n>" when it finishes to RECORD_FILE.
"""

import asyncio
import os
import time

from pydantic import BaseModel

import amqtask


class Job(BaseModel):
    n: int


UNIQUE = os.environ["TEST_UNIQUE"]
SLEEP = float(os.environ.get("TEST_SLEEP", "1.0"))
RECORD = os.environ["TEST_RECORD_FILE"]

job = amqtask.contract(f"{UNIQUE}.job", Job)
app = amqtask.App(os.environ["TEST_BROKER_URL"], [job], namespace=UNIQUE)


def record(line: str) -> None:
    with open(RECORD, "a") as f:
        f.write(line + "\n")


async def handle(task: Job) -> None:
    record(f"start {task.n}")
    await asyncio.sleep(SLEEP)
    record(f"done {task.n}")


def handle_in_thread(task: Job) -> None:
    record(f"start {task.n}")
    time.sleep(SLEEP)
    record(f"done {task.n}")


# TEST_SYNC=1: a plain `def` handler, run in a worker thread.
app.handler(job)(handle_in_thread if os.environ.get("TEST_SYNC") == "1" else handle)
