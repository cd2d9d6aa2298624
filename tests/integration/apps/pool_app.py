"""A worker app for the process-pool tests (`test_pool.py`), configured by the environment.

Its one handler is a plain `def`, so `--pool thread` runs it in a worker thread and `--pool
process` in a child process. It appends "start <n> <pid>" when it begins and "done <n> <pid>"
when it has finished to TEST_RECORD_FILE (one `write` per line). The task whose `n` is
TEST_POISON kills the process running it, after a short while (so that its neighbours are in
flight): with `os._exit(1)` for TEST_CRASH=exit, by a segmentation fault for TEST_CRASH=segfault.
"""

import ctypes
import os
import time

from pydantic import BaseModel

import amqtask


class Job(BaseModel):
    n: int


UNIQUE = os.environ["TEST_UNIQUE"]
SLEEP = float(os.environ.get("TEST_SLEEP", "1.0"))
RECORD = os.environ["TEST_RECORD_FILE"]
POISON = int(os.environ.get("TEST_POISON", "-1"))
CRASH = os.environ.get("TEST_CRASH", "exit")

job = amqtask.contract(f"{UNIQUE}.job", Job, retry=amqtask.Retry(attempts=1))
app = amqtask.App(os.environ["TEST_BROKER_URL"], [job], namespace=UNIQUE)


def record(line: str) -> None:
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.handler(job)
def handle(task: Job) -> None:
    record(f"start {task.n} {os.getpid()}")
    if task.n == POISON:
        time.sleep(SLEEP / 3)
        if CRASH == "segfault":
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        os._exit(1)
    time.sleep(SLEEP)
    record(f"done {task.n} {os.getpid()}")
