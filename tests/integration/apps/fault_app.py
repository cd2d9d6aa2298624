"""A worker app for the fault tests (`test_faults.py`), configured by the environment.

Each handler appends "start <n>" when it begins and "done <n>" when it has finished to
TEST_RECORD_FILE (one `write` per line, so a kill -9 never leaves half a line). The task whose
`n` is TEST_POISON kills its worker process with `os._exit(1)` instead, as a segfaulting C
extension or the OOM killer would: no exception, no ack, no dead-lettering by the worker.
"""

import asyncio
import os

from pydantic import BaseModel

import amqtask


class Job(BaseModel):
    n: int


UNIQUE = os.environ["TEST_UNIQUE"]
SLEEP = float(os.environ.get("TEST_SLEEP", "0.2"))
RECORD = os.environ["TEST_RECORD_FILE"]
POISON = int(os.environ.get("TEST_POISON", "-1"))
DELIVERY_LIMIT = int(os.environ.get("TEST_DELIVERY_LIMIT", "10"))

job = amqtask.contract(f"{UNIQUE}.job", Job, delivery_limit=DELIVERY_LIMIT)
app = amqtask.App(os.environ["TEST_BROKER_URL"], [job], namespace=UNIQUE)


def record(line: str) -> None:
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.handler(job)
async def handle(task: Job) -> None:
    record(f"start {task.n}")
    if task.n == POISON:
        os._exit(1)
    await asyncio.sleep(SLEEP)
    record(f"done {task.n}")
