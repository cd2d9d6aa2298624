"""Handlers the process-pool tests run in child processes, found there by import path."""

from __future__ import annotations

import asyncio
import ctypes
import os
import time

from pydantic import BaseModel

import amqtask


class Job(BaseModel):
    n: int = 0
    text: str = ""


class Done(BaseModel):
    n: int
    pid: int


def echo(job: Job) -> Done:
    return Done(n=job.n, pid=os.getpid())


async def echo_async(job: Job) -> Done:
    await asyncio.sleep(0)
    return Done(n=job.n, pid=os.getpid())


def spin(job: Job) -> None:
    while True:
        pass


def sleepy(job: Job) -> str:
    """Sleeps in C until its soft limit, then says so."""
    try:
        time.sleep(60)
    except amqtask.SoftTimeLimitExceeded:
        return "soft limit seen"
    return "slept"


async def sleepy_async(job: Job) -> str:
    try:
        await asyncio.sleep(60)
    except amqtask.SoftTimeLimitExceeded:
        return "soft limit seen"
    return "slept"


def exit_now(job: Job) -> None:
    os._exit(job.n)


def segfault(job: Job) -> None:
    ctypes.string_at(0)


class Broken(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"broken {code}")
        self.code = code

    def __str__(self) -> str:
        return f"broken with code {self.code}"


def fail(job: Job) -> None:
    raise Broken(job.n)


def reject(job: Job) -> None:
    raise amqtask.Reject(f"no thanks {job.n}")


_kept: list[bytes] = []


def leak(job: Job) -> Done:
    """Keeps `n` MiB more each call."""
    _kept.append(os.urandom(job.n * 1024 * 1024))
    return Done(n=len(_kept), pid=os.getpid())


def closure_factory() -> object:
    def inner(job: Job) -> None:
        pass

    return inner


async def forever_async(job: Job) -> None:
    """Loops for ever, awaiting as it goes."""
    while True:  # noqa: ASYNC110 - a loop that never ends is the point
        await asyncio.sleep(0.01)


def polls(job: Job) -> str:
    """Works in short steps (a thread sees a soft limit between Python instructions)."""
    try:
        while True:
            time.sleep(0.01)
    except amqtask.SoftTimeLimitExceeded:
        return "soft limit seen"


class Probe(BaseModel):
    network: str
    root: str
    pid: int


def sandbox_probe(job: Job) -> Probe:
    """What the process may do: reach the broker's port, write below /."""
    import socket
    import tempfile

    try:
        socket.create_connection(("127.0.0.1", job.n), timeout=2).close()
        network = "open"
    except OSError as exc:
        network = f"blocked: {exc.strerror or exc}"
    try:
        with tempfile.TemporaryFile(dir="/tmp"):
            root = "writable"
    except OSError as exc:
        root = f"read-only: {exc.strerror or exc}"
    return Probe(network=network, root=root, pid=os.getpid())
