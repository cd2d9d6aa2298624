"""A worker app whose handlers misbehave on request, for the hardening tests.

`Act.kind` picks what the handler does: "ok" appends "done <n>" to TEST_RECORD_FILE; the others
raise what no well-behaved handler would (a `BaseException`, an exception whose message cannot be
encoded or printed, `Reject(None)`, its own `CancelledError`). The same acts run in an
`async def` handler (`{unique}.async`) and in a plain `def` one, in a thread (`{unique}.thread`).
No retries: a misbehaving task goes straight to the dead-letter queue, where the test reads it.
"""

import asyncio
import os
import sys

from pydantic import BaseModel

import amqtask


class Act(BaseModel):
    kind: str
    n: int = 0


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


class NonStr(Exception):
    def __str__(self) -> str:
        return 42  # type: ignore[return-value]


UNIQUE = os.environ["TEST_UNIQUE"]
RECORD = os.environ["TEST_RECORD_FILE"]

on_loop = amqtask.contract(f"{UNIQUE}.async", Act, retry=amqtask.Retry(attempts=1))
in_thread = amqtask.contract(f"{UNIQUE}.thread", Act, retry=amqtask.Retry(attempts=1))
app = amqtask.App(os.environ["TEST_BROKER_URL"], [on_loop, in_thread], namespace=UNIQUE)


def act(task: Act) -> None:
    match task.kind:
        case "ok":
            fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"done {task.n}\n".encode())
            finally:
                os.close(fd)
        case "surrogate":
            raise FileNotFoundError("caf\udce9")
        case "str_raises":
            raise BadStr()
        case "str_not_text":
            raise NonStr()
        case "reject_none":
            raise amqtask.Reject(None)  # type: ignore[arg-type]
        case "cancelled":
            raise asyncio.CancelledError()
        case "keyboard_interrupt":
            raise KeyboardInterrupt()
        case "system_exit":
            sys.exit(3)
        case "base_exception":
            raise BaseException("not even an Exception")
        case _:
            raise ValueError(f"unknown act {task.kind!r}")


@app.handler(on_loop)
async def handle_on_loop(task: Act) -> None:
    await asyncio.sleep(0)
    act(task)


@app.handler(in_thread)
def handle_in_thread(task: Act) -> None:
    act(task)
