"""The chaos run's one contract, shared by the harness (producer) and the worker app."""

from __future__ import annotations

from pydantic import BaseModel

import amqtask


class Job(BaseModel):
    n: int  # unique per send: the harness counts by it


class Flaky(Exception):
    """What the chaos handler raises on the first attempt of some tasks: always retried."""


#: Attempts a task gets. Only the first one ever fails on purpose, so a task that reaches the
#: dead-letter queue got there by something other than its handler.
ATTEMPTS = 5


def chaos_contract(unique: str) -> amqtask.Contract[Job, None]:
    return amqtask.contract(
        f"{unique}.chaos",
        Job,
        retry=amqtask.Retry(attempts=ATTEMPTS, initial=1.0, backoff=1.0, on=(Flaky,)),
    )


def fails_first(n: int, percent: int) -> bool:
    """Whether task `n`'s first attempt fails: a fixed, well-spread `percent` of the tasks."""
    return (n * 2654435761) % 100 < percent
