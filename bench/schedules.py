"""One side of the schedules benchmark, in a process of its own: `python -m bench.schedules`.

COUNT schedules every minute fire for MINUTES simulated minutes (after WARMUP seconds not
measured) and the process prints, as JSON, each tick's spread (milliseconds from its due time to
the broker's confirm of its publish) and the process's CPU seconds per minute.

The clock is injected: it runs with real time, except that a wait for the next due time ends at
once, the clock jumping to it. A minute with nothing due costs no wall time, and the spread is
what a real minute's would be: publishing, confirms, bookkeeping, and the scheduler's own wake-up
work, from the moment a tick is due. (Not the event loop's timer slack, about a millisecond.)

Sides:
  amqtask  an `amqtask.Scheduler` (the active one), logging JSON lines at info as
           `amqtask scheduler` does (to /dev/null here)
  raw      raw aio-pika publishing the same messages (body, headers, message id), persistent,
           mandatory and confirmed, as many in flight as the scheduler keeps (1024): the least
           any scheduler must do
Layouts:
  aligned    every schedule due at the same second: the worst case, a burst of COUNT publishes
  staggered  due times spread evenly over the minute
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import logging
import math
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from pydantic import BaseModel

import amqtask
from amqtask import _codec, _logging, _scheduler
from amqtask._schedule import iso, tick_message_id

MINUTE = 60.0
ROOT = Path(__file__).resolve().parents[1]


class Tick(BaseModel):
    n: int = 0


class JumpClock:
    """Real time, plus the time skipped by waits: `sleep` returns at once, the clock moved on."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def now(self) -> float:
        return time.time() + self.skipped

    async def sleep(self, seconds: float) -> None:
        self.skipped += max(seconds, 0.0)
        await asyncio.sleep(0)


def build(url: str, namespace: str, count: int, layout: str, first: datetime) -> amqtask.App:
    """The app both the parent (to declare) and this process (to run) use."""
    tick = amqtask.contract(f"{namespace}.tick", Tick)
    step = MINUTE / count if layout == "staggered" else 0.0
    schedules = [
        amqtask.schedule(
            f"s{n}", tick, Tick(n=n), every=60, start=first + timedelta(seconds=round(n * step, 3))
        )
        for n in range(count)
    ]
    return amqtask.App(url, [tick], namespace=namespace, schedules=schedules, name="bench")


class Spreads:
    def __init__(self, clock: JumpClock, measured_from: float) -> None:
        self.clock, self.measured_from = clock, measured_from
        self.ms: list[float] = []
        self.count = 0
        self.total = 0
        self.done = asyncio.Event()
        self.cpu_at_start: float | None = None

    def confirmed(self, due: float) -> None:
        self.count += 1
        if self.count >= self.total:
            self.done.set()
        if due >= self.measured_from:
            if self.cpu_at_start is None:
                self.cpu_at_start = time.process_time()
            self.ms.append((self.clock.now() - due) * 1000)


async def run_amqtask(app: amqtask.App, clock: JumpClock, spreads: Spreads, total: int) -> None:
    publish = _scheduler._publish

    async def timed(*args: Any, **kwargs: Any) -> None:
        await publish(*args, **kwargs)
        due = args[3].headers.get(_codec.DUE)  # a tick's; the scheduler's own records have none
        if due is not None:
            spreads.confirmed(datetime.fromisoformat(due.replace("Z", "+00:00")).timestamp())

    _scheduler._publish = timed  # type: ignore[assignment]  # measuring, in this process only
    scheduler = amqtask.Scheduler(app, clock=clock)
    await scheduler.start()
    try:
        await spreads.done.wait()
    finally:
        await scheduler.stop()


async def run_raw(app: amqtask.App, clock: JumpClock, spreads: Spreads, total: int) -> None:
    (tick,) = app.contracts
    items = list(app.schedules)
    dues = [(item.start.timestamp(), n) for n, item in enumerate(items) if item.start is not None]
    heapq.heapify(dues)
    connection = await aio_pika.connect_robust(app.url)
    slots = asyncio.Semaphore(_scheduler.IN_FLIGHT)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(app.names.task_exchange, ensure=False)

        async def one(due: float, item: amqtask.Schedule) -> None:
            due_ms = round(due * 1000)
            message = aio_pika.Message(
                orjson.dumps(item.payload.model_dump(mode="json")),
                content_type=_codec.CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=tick_message_id(item.name, due_ms),
                headers={
                    _codec.TASK: tick.name,
                    _codec.VERSION: tick.version,
                    _codec.SCHEDULE: item.name,
                    _codec.DUE: iso(due_ms),
                },
            )
            async with slots:
                await exchange.publish(message, tick.routing_key, mandatory=True)
            spreads.confirmed(due)

        while spreads.count < total:
            wait = dues[0][0] - clock.now()
            if wait > 0:
                await clock.sleep(wait)
            now, ready = clock.now(), []
            while dues[0][0] <= now:
                due, n = heapq.heappop(dues)
                ready.append(one(due, items[n]))
                heapq.heappush(dues, (due + MINUTE, n))
            await asyncio.gather(*ready)
    finally:
        await connection.close()


def ticks_before(app: amqtask.App, end: float) -> int:
    """How many ticks of the app's schedules fall due before `end`."""
    total = 0
    for item in app.schedules:
        assert item.start is not None
        total += max(math.ceil((end - item.start.timestamp()) / MINUTE), 0)
    return total


async def main(args: argparse.Namespace) -> dict[str, Any]:
    first = datetime.fromtimestamp(args.first, UTC)
    app = build(args.url, args.namespace, args.count, args.layout, first)
    clock = JumpClock()
    measured_from = args.first + args.warmup
    spreads = Spreads(clock, measured_from)
    total = spreads.total = ticks_before(app, measured_from + args.minutes * MINUTE)
    started = time.process_time()
    runner = run_amqtask if args.side == "amqtask" else run_raw
    await runner(app, clock, spreads, total)
    cpu = time.process_time() - (spreads.cpu_at_start or started)
    return {"spread_ms": spreads.ms, "cpu_s_per_minute": cpu / args.minutes}


async def measure(
    app: amqtask.App, side: str, layout: str, count: int, minutes: int, warmup: float
) -> dict[str, Any]:
    """Run one side in a process of its own, on `app`'s broker and namespace (declared already,
    the scheduler queue empty); its result."""
    url, namespace = app.url, app.names.namespace
    first = float(int(time.time()) + 8)  # after the process has started
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.schedules",
        *("--side", side, "--layout", layout, "--url", url, "--namespace", namespace),
        *("--count", str(count), "--minutes", str(minutes), "--warmup", str(warmup)),
        *("--first", str(first)),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"bench.schedules --side {side} exited {process.returncode}")
    result: dict[str, Any] = orjson.loads(out)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.schedules")
    parser.add_argument("--side", choices=["amqtask", "raw"], required=True)
    parser.add_argument("--layout", choices=["aligned", "staggered"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--minutes", type=int, default=2, help="minutes measured")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds not measured")
    parser.add_argument("--first", type=float, required=True, help="the first due time (epoch)")
    arguments = parser.parse_args()
    # As `amqtask scheduler` logs by default (JSON lines at info), to nowhere.
    sys.stderr = open(os.environ.get("BENCH_SCHEDULES_LOG", os.devnull), "w")  # noqa: SIM115
    _logging.configure(getattr(logging, os.environ.get("BENCH_LEVEL", "INFO")), json=True)
    result = asyncio.run(main(arguments))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
