"""A worker app with a task store, for the task store's tests (`test_store*.py`), configured by
the environment: TEST_UNIQUE names everything, TEST_BROKER_URL and TEST_STORE_URL say where.

`job` (deduplicate=True) appends "start <n>" to TEST_RECORD_FILE, sleeps TEST_SLEEP seconds, then
appends "done <n>" (the effect). With TEST_SAME_TRANSACTION=1 (PostgreSQL) it writes its effect
in a table of its own through `amqtask.store.transaction()`, appends "committed <n>", and only
then sleeps. `sleepy` runs in the process pool and sleeps TEST_SLEEP seconds (for terminate).
"""

import asyncio
import os
import time

from pydantic import BaseModel

import amqtask
import amqtask.store


class Job(BaseModel):
    n: int


UNIQUE = os.environ["TEST_UNIQUE"]
SLEEP = float(os.environ.get("TEST_SLEEP", "1.0"))
RECORD = os.environ.get("TEST_RECORD_FILE", os.devnull)
SAME_TRANSACTION = os.environ.get("TEST_SAME_TRANSACTION") == "1"
EFFECTS = f"{UNIQUE}_effects"  # the handler's own table (same transaction), in public

job = amqtask.contract(f"{UNIQUE}.job", Job, deduplicate=True, retry=amqtask.Retry(attempts=1))
sleepy = amqtask.contract(f"{UNIQUE}.sleepy", Job, isolation="process")
app = amqtask.App(
    os.environ["TEST_BROKER_URL"],
    [job, sleepy],
    namespace=UNIQUE,
    store=os.environ["TEST_STORE_URL"],
)


def record(line: str) -> None:
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.handler(job)
async def handle(task: Job) -> None:
    record(f"start {task.n}")
    if SAME_TRANSACTION:
        async with amqtask.store.transaction() as db:
            await db.execute(f"CREATE TABLE IF NOT EXISTS {EFFECTS} (n int)")
            await db.execute(f"INSERT INTO {EFFECTS} VALUES ($1)", task.n)
        record(f"committed {task.n}")
        await asyncio.sleep(SLEEP)
        return
    await asyncio.sleep(SLEEP)
    record(f"done {task.n}")


@app.handler(sleepy)
def nap(task: Job) -> None:
    record(f"start {task.n} {os.getpid()}")
    time.sleep(SLEEP)
    record(f"done {task.n} {os.getpid()}")
