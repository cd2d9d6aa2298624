"""The amqtask side of the benchmark: contracts and no-op handlers, names from the environment.

`BENCH_NAMESPACE` names everything (the benchmark deletes it afterwards), `AMQTASK_URL` is the
broker, and `BENCH_STATS_DIR`, when set, receives each worker process's completion timeline
(see `bench._timeline`) at exit. Run by `amqtask worker bench.app:tasks` and
`amqtask worker bench.app:rpc` (durable and transient calls), and `bench.app:tasks_classic` on a
classic queue; the pool scenario runs `plain` (a `def` no-op, in threads or
child processes, whose timelines are their own), `burn` and `burn_async` (5 ms of CPU each).
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

import amqtask
from bench import _timeline

URL = os.environ.get("AMQTASK_URL", "amqp://guest:guest@127.0.0.1:5672/")
NAMESPACE = os.environ.get("BENCH_NAMESPACE", "bench")


class Job(BaseModel):
    n: int
    user: str
    text: str


class Echoed(BaseModel):
    n: int


job = amqtask.contract(f"{NAMESPACE}.job", Job, queue=f"{NAMESPACE}.jobs")
job_classic = amqtask.contract(
    f"{NAMESPACE}.job_classic", Job, queue=f"{NAMESPACE}.jobs_classic", queue_type="classic"
)
echo = amqtask.contract(f"{NAMESPACE}.echo", Job, returns=Echoed, queue=f"{NAMESPACE}.calls")
echo_transient = amqtask.contract(
    f"{NAMESPACE}.echo_transient",
    Job,
    returns=Echoed,
    queue=f"{NAMESPACE}.tcalls",
    calls="transient",
)
# The raw responders' queues: declared by amqtask too, so both sides use the same queue settings
# (quorum, and classic like a transient call's call queue).
raw_echo = amqtask.contract(f"{NAMESPACE}.raw_echo", Job, queue=f"{NAMESPACE}.raw_calls")
raw_echo_classic = amqtask.contract(
    f"{NAMESPACE}.raw_echo_classic",
    Job,
    queue=f"{NAMESPACE}.raw_calls_classic",
    queue_type="classic",
)
# aio-pika's `patterns.RPC` declares its method's queue itself (`bench.raw rpc-pattern`).
PATTERN_METHOD = f"{NAMESPACE}.rpc_pattern"

# CPU-bound tasks for the pool scenario: each burns CPU_SECONDS of its thread's CPU time.
cpu_job = amqtask.contract(f"{NAMESPACE}.cpu", Job, queue=f"{NAMESPACE}.cpu")
CPU_SECONDS = 0.005

tasks = amqtask.App(URL, [job], namespace=NAMESPACE, name="bench-worker")
tasks_classic = amqtask.App(URL, [job_classic], namespace=NAMESPACE, name="bench-worker-classic")
rpc = amqtask.App(URL, [echo, echo_transient], namespace=NAMESPACE, name="bench-responder")
# Topology only.
raw = amqtask.App(URL, [raw_echo, raw_echo_classic], namespace=NAMESPACE, name="bench-raw")
plain = amqtask.App(URL, [job], namespace=NAMESPACE, name="bench-plain")
burn = amqtask.App(URL, [cpu_job], namespace=NAMESPACE, name="bench-burn")
burn_async = amqtask.App(URL, [cpu_job], namespace=NAMESPACE, name="bench-burn-async")
timeline = _timeline.Timeline.from_env()


@tasks.handler(job)
async def do_job(task: Job) -> None:
    timeline.tick()


@tasks_classic.handler(job_classic)
async def do_job_classic(task: Job) -> None:
    timeline.tick()


@rpc.handler(echo)
@rpc.handler(echo_transient)
async def do_echo(task: Job) -> Echoed:
    return Echoed(n=task.n)


@plain.handler(job)
def do_job_plain(task: Job) -> None:
    timeline.tick()


def _burn_cpu() -> None:
    # Pure-Python work measured in this thread's CPU time, so a task costs the same CPU whether
    # it shares a core (or the GIL) or not; wall-clock spinning would hide contention.
    end = time.thread_time() + CPU_SECONDS
    while time.thread_time() < end:
        pass


@burn.handler(cpu_job)
def do_burn(task: Job) -> None:
    _burn_cpu()
    timeline.tick()


@burn_async.handler(cpu_job)
async def do_burn_async(task: Job) -> None:
    _burn_cpu()
    timeline.tick()
