"""The chaos run's worker app, configured by the environment the harness sets.

Each task sleeps a little (so kills and cuts land on handlers in flight), fails its first
attempt with a retryable `Flaky` for CHAOS_FAIL_PERCENT % of the tasks, and otherwise appends
"<n> <pid>" to CHAOS_RECORD before it returns (one `write` with O_APPEND: a kill -9 never leaves
half a line, and processes never interleave within a line).

"First attempt" is decided across processes and crashes: the first run of task n creates the
marker file CHAOS_MARKS/<n> with O_EXCL, and only the run that created it fails.
"""

import asyncio
import os
import random

import amqtask

from .contract import Flaky, Job, chaos_contract, fails_first

UNIQUE = os.environ["CHAOS_UNIQUE"]
RECORD = os.environ["CHAOS_RECORD"]
MARKS = os.environ["CHAOS_MARKS"]
FAIL_PERCENT = int(os.environ.get("CHAOS_FAIL_PERCENT", "10"))
MAX_SLEEP = float(os.environ.get("CHAOS_MAX_SLEEP", "0.1"))

job = chaos_contract(UNIQUE)
app = amqtask.App(os.environ["CHAOS_BROKER_URL"], [job], namespace=UNIQUE, name="chaos-worker")


def _first_run(n: int) -> bool:
    try:
        fd = os.open(os.path.join(MARKS, str(n)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _record(n: int) -> None:
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{n} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


@app.handler(job)
async def handle(task: Job) -> None:
    await asyncio.sleep(random.uniform(0, MAX_SLEEP))
    if fails_first(task.n, FAIL_PERCENT) and _first_run(task.n):
        raise Flaky(f"task {task.n} fails its first attempt on purpose")
    _record(task.n)
