"""Periodic tasks on a real broker: failover under kill -9, a broker restart, the misfire policy
and daylight-saving changes with an injected clock, and pause/resume across restarts.

Scheduler replicas killed with kill -9 are processes of our own on the shared broker; the broker
restart happens on a private node. Each test prints what it measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask._schedule import iso, ms, tick_message_id
from amqtask._schedule_admin import Source, read_state

from .conftest import ROOT, AppFactory, app_env, delete_topology, wait_for
from .private_node import QUORUM_REGISTRATION_SETTLE, PrivateNode

SCHED_APP = "tests.integration.apps.sched_app:app"
TAKEOVER_BOUND = 5.0  # seconds from kill -9 of the active replica to the next one's takeover


class Tick(BaseModel):
    pass


def report(test: str, **values: Any) -> None:
    print(f"\n[{test}] " + " ".join(f"{key}={value}" for key, value in values.items()))


class ManualClock:
    """A wall clock that moves only when told to; `sleep` waits until it has moved far enough.

    `settled()` waits until the scheduler sleeps again after the last move: its round for the
    new time is over (it sleeps at the end of every round).
    """

    def __init__(self, start: datetime) -> None:
        self._now = start.timestamp()
        self._moved = asyncio.Condition()
        self._sleeps = 0

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        target = self._now + seconds
        async with self._moved:
            self._sleeps += 1
            self._moved.notify_all()
            await self._moved.wait_for(lambda: self._now >= target)

    async def move_to(self, moment: datetime) -> None:
        async with self._moved:
            self._now = max(self._now, moment.timestamp())
            self._sleeps = 0
            self._moved.notify_all()

    async def settled(self, timeout: float = 10.0) -> None:
        async with self._moved:
            await asyncio.wait_for(self._moved.wait_for(lambda: self._sleeps > 0), timeout)


@dataclass(frozen=True)
class Delivered:
    due: str
    message_id: str
    schedule: str


async def take_all(connection: AbstractConnection, queue: str) -> list[Delivered]:
    """Every message in `queue`, removed, in order."""
    taken = []
    async with connection.channel() as channel:
        source = await channel.declare_queue(queue, passive=True)
        while (message := await source.get(fail=False)) is not None:
            await message.ack()
            headers = message.headers or {}
            taken.append(
                Delivered(
                    str(headers["amqtask-due"]),
                    str(message.message_id),
                    str(headers["amqtask-schedule"]),
                )
            )
    return taken


async def depth(connection: AbstractConnection, queue: str) -> int:
    async with connection.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


@asynccontextmanager
async def running(*schedulers: amqtask.Scheduler) -> AsyncIterator[None]:
    for scheduler in schedulers:
        await scheduler.start()
    try:
        yield
    finally:
        for scheduler in schedulers:
            await scheduler.stop()


def every_second(dues: list[str]) -> list[str]:
    """Each whole second from the first due time to the last, as the headers write them."""
    first, last = (datetime.fromisoformat(d.replace("Z", "+00:00")) for d in (dues[0], dues[-1]))
    return [iso(ms(first) + 1000 * n) for n in range(int((last - first).total_seconds()) + 1)]


# --- three replicas, kill -9 the active one ------------------------------------------------------


@dataclass
class Replicas:
    """`amqtask scheduler` processes on sched_app, their JSON logs read as they come."""

    env: dict[str, str]
    procs: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)
    active: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, pid)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    async def start(self) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "amqtask",
            "scheduler",
            SCHED_APP,
            "--json-logs",
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.procs[proc.pid] = proc
        self.readers.append(asyncio.create_task(self._read(proc)))
        return proc.pid

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").strip()
            self.lines.append(f"{proc.pid}: {line}")
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "scheduler_active":
                self.active.append((time.monotonic(), proc.pid))

    def current(self) -> int | None:
        return self.active[-1][1] if self.active else None

    async def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for reader in self.readers:
            reader.cancel()

    def tail(self, count: int = 40) -> str:
        return "\n".join(self.lines[-count:])


async def test_three_replicas_fire_every_second_across_three_kill_9_of_the_active_one(
    make_app: AppFactory, broker_url: str, unique: str, amqp: AbstractConnection
) -> None:
    tick = amqtask.contract(f"{unique}.tick", Tick)
    beat = amqtask.schedule("beat", tick, Tick(), every=1)
    app = make_app([tick], schedules=[beat])  # the same topology as sched_app's
    await app.declare()
    replicas = Replicas(app_env(broker_url, unique))
    takeovers: list[float] = []
    try:
        for _ in range(3):
            await replicas.start()
        await wait_for(lambda: replicas.current() is not None, timeout=30)
        for _ in range(3):
            await asyncio.sleep(random.uniform(2.0, 5.0))  # a random moment of the second too
            victim = replicas.current()
            assert victim is not None
            seen = len(replicas.active)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            await wait_for(lambda seen=seen: len(replicas.active) > seen, timeout=30)
            at, successor = replicas.active[seen]
            assert successor != victim
            takeovers.append(at - killed)
            await replicas.procs.pop(victim).wait()
            await replicas.start()  # three replicas again
        await asyncio.sleep(3)
        for proc in replicas.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in replicas.procs.values():
            assert await asyncio.wait_for(proc.wait(), 20) == 0, replicas.tail()
    finally:
        await replicas.cleanup()

    delivered = await take_all(amqp, tick.queue)
    copies = Counter(d.message_id for d in delivered)
    dues = sorted({d.due for d in delivered})
    twice = sum(1 for count in copies.values() if count == 2)
    report(
        "failover",
        ticks=len(delivered),
        seconds=len(dues),
        delivered_twice=twice,
        takeover_s=[round(t, 3) for t in takeovers],
    )
    assert all(d.message_id == tick_message_id("beat", ms_of(d.due)) for d in delivered)
    assert dues == every_second(dues), replicas.tail()
    assert max(copies.values()) <= 2
    assert twice <= len(takeovers)
    assert all(t < TAKEOVER_BOUND for t in takeovers), takeovers


def ms_of(due: str) -> int:
    return ms(datetime.fromisoformat(due.replace("Z", "+00:00")))


# --- the broker restarted under the schedulers ---------------------------------------------------


@pytest.fixture
def node() -> Iterator[PrivateNode]:
    with PrivateNode() as started:
        yield started


async def test_after_a_broker_restart_one_scheduler_is_active_again_and_no_second_is_lost(
    node: PrivateNode, unique: str
) -> None:
    tick = amqtask.contract(f"{unique}.tick", Tick)
    beat = amqtask.schedule("beat", tick, Tick(), every=1)
    app = amqtask.App(node.url, [tick], namespace=unique, schedules=[beat])
    await app.declare()
    await asyncio.sleep(QUORUM_REGISTRATION_SETTLE)
    first, second = amqtask.Scheduler(app, heartbeat=2), amqtask.Scheduler(app, heartbeat=2)
    async with running(first, second):
        await wait_for(lambda: first.active or second.active, timeout=20)
        await asyncio.sleep(3)
        takeovers = first.takeovers + second.takeovers
        restarted = time.monotonic()
        await asyncio.to_thread(node.restart)
        back = time.monotonic()
        await wait_for(lambda: first.takeovers + second.takeovers > takeovers, timeout=60)
        active_again = time.monotonic()
        await asyncio.sleep(3)
        assert [first.active, second.active].count(True) == 1
    connection = await aio_pika.connect(node.url)
    async with connection:
        delivered = await take_all(connection, tick.queue)
    dues = sorted({d.due for d in delivered})
    copies = Counter(d.message_id for d in delivered)
    report(
        "broker-restart",
        ticks=len(delivered),
        seconds=len(dues),
        broker_down_s=round(back - restarted, 1),
        active_again_after_s=round(active_again - back, 1),
        max_copies=max(copies.values()),
    )
    assert dues == every_second(dues)  # the seconds the broker was down were caught up
    assert ms_of(dues[-1]) > ms_of(dues[0]) + (active_again - restarted) * 1000
    assert max(copies.values()) <= 2


# --- misfire and daylight saving, with an injected clock -----------------------------------------


def minute(moment: datetime, minutes: int, seconds: float = 0.5) -> datetime:
    return moment + timedelta(minutes=minutes, seconds=seconds)


async def test_a_scheduler_down_ten_minutes_fires_no_catch_up_with_skip_and_one_with_latest(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    skipping = amqtask.contract(f"{unique}.skip", Tick)
    latest = amqtask.contract(f"{unique}.latest", Tick)
    schedules = [
        amqtask.schedule(c.name, c, Tick(), every=60, misfire=m, catch_up=30)
        for c, m in ((skipping, "skip"), (latest, "latest"))
    ]
    app = make_app([skipping, latest], schedules=schedules)
    await app.declare()
    start = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
    clock = ManualClock(minute(start, 0))
    before = amqtask.Scheduler(app, clock=clock)
    async with running(before):
        await wait_for(lambda: before.active)
        for n in (1, 2):
            await clock.move_to(minute(start, n))
            await clock.settled()

        async def both_fired_twice() -> bool:
            return [await depth(amqp, c.queue) for c in (skipping, latest)] == [2, 2]

        await wait_for(both_fired_twice)
    # Down from 10:02 to 10:12:45: ten ticks (10:03 ... 10:12) missed, the last 45 s ago.
    await clock.move_to(minute(start, 12, 45))
    after = amqtask.Scheduler(app, clock=clock)
    async with running(after):
        await wait_for(lambda: after.active)
        await clock.settled()
        state = await read_state(app)
    assert state.source == Source.ACTIVE
    assert state.state is not None
    handled = ms(start + timedelta(minutes=12))
    assert {name: p.cursor for name, p in state.state.schedules.items()} == {
        skipping.name: handled,
        latest.name: handled,
    }
    skipped, caught_up = [await take_all(amqp, c.queue) for c in (skipping, latest)]
    report("misfire", skip=[d.due for d in skipped], latest=[d.due for d in caught_up])
    assert [d.due for d in skipped] == ["2030-01-01T10:01:00Z", "2030-01-01T10:02:00Z"]
    assert [d.due for d in caught_up] == [
        "2030-01-01T10:01:00Z",
        "2030-01-01T10:02:00Z",
        "2030-01-01T10:12:00Z",  # exactly one run for the ten missed
    ]


BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("day", "nightly", "hourly"),
    [
        # 02:00 CET jumps to 03:00 CEST: 02:30 runs once, at the jump.
        (
            datetime(2025, 3, 30, tzinfo=BERLIN),
            ["2025-03-30T01:00:00Z"],
            ["2025-03-30T00:00:00Z", "2025-03-30T01:00:00Z", "2025-03-30T02:00:00Z"],
        ),
        # 03:00 CEST goes back to 02:00 CET: 02:30 runs once; every real hour runs once.
        (
            datetime(2025, 10, 26, tzinfo=BERLIN),
            ["2025-10-26T00:30:00Z"],
            [f"2025-10-2{d}T{h}:00:00Z" for d, h in ((5, 23), (6, "00"), (6, "01"), (6, "02"))]
            + ["2025-10-26T03:00:00Z"],
        ),
    ],
    ids=["march", "october"],
)
async def test_cron_in_berlin_across_a_daylight_saving_change(
    make_app: AppFactory,
    amqp: AbstractConnection,
    unique: str,
    day: datetime,
    nightly: list[str],
    hourly: list[str],
) -> None:
    night = amqtask.contract(f"{unique}.nightly", Tick)
    hour = amqtask.contract(f"{unique}.hourly", Tick)
    schedules = [
        amqtask.schedule("nightly", night, Tick(), cron="30 2 * * *", tz="Europe/Berlin"),
        amqtask.schedule("hourly", hour, Tick(), cron="0 * * * *", tz="Europe/Berlin"),
    ]
    app = make_app([night, hour], schedules=schedules)
    await app.declare()
    begin = ms(day.replace(hour=0, minute=30))  # local 00:30
    end = begin + 4 * 3600_000 + (3600_000 if day.month == 10 else -3600_000)  # local 04:30
    clock = ManualClock(datetime.fromtimestamp(begin / 1000, UTC))
    scheduler = amqtask.Scheduler(app, clock=clock)
    async with running(scheduler):
        await wait_for(lambda: scheduler.active)
        await clock.settled()
        for moment in range(begin + 300_000, end + 1, 300_000):  # five minutes at a time
            await clock.move_to(datetime.fromtimestamp(moment / 1000, UTC))
            await clock.settled()
    fired_nightly = [d.due for d in await take_all(amqp, night.queue)]
    fired_hourly = [d.due for d in await take_all(amqp, hour.queue)]
    report("dst", day=day.date(), nightly=fired_nightly, hourly=fired_hourly)
    assert fired_nightly == nightly
    assert fired_hourly == hourly


# --- pause and resume, across a scheduler restart -------------------------------------------------


async def is_paused(app: amqtask.App, name: str, paused: bool = True) -> bool:
    """Whether the active scheduler says `name` is paused (or, `paused=False`, is not)."""
    listing = await read_state(app)
    state = listing.state
    return state is not None and state.schedules[name].paused is paused


def schedules_cli(tmp_path: Path, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amqtask", "schedules", target, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        check=False,
    )


async def test_a_pause_outlives_a_scheduler_restart_and_a_resume_fires_from_the_next_tick(
    tmp_path: Path, broker_url: str, unique: str, amqp: AbstractConnection
) -> None:
    module = f"sched_{unique}"
    (tmp_path / f"{module}.py").write_text(
        "from pydantic import BaseModel\nimport amqtask\n\n"
        "class Tick(BaseModel):\n    pass\n\n"
        f'tick = amqtask.contract("{unique}.tick", Tick)\n'
        'beat = amqtask.schedule("beat", tick, Tick(), every=60)\n'
        f'app = amqtask.App("{broker_url}", [tick], namespace="{unique}", schedules=[beat])\n'
    )
    target = f"{module}:app"
    tick = amqtask.contract(f"{unique}.tick", Tick)
    app = amqtask.App(
        broker_url,
        [tick],
        namespace=unique,
        schedules=[amqtask.schedule("beat", tick, Tick(), every=60)],
    )
    await app.declare()
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    clock = ManualClock(minute(now, 0))
    try:
        first = amqtask.Scheduler(app, clock=clock)
        async with running(first):
            await wait_for(lambda: first.active)
            await clock.move_to(minute(now, 1))
            await clock.settled()
            paused = await asyncio.to_thread(schedules_cli, tmp_path, target, "pause", "beat")
            assert paused.returncode == 0, paused.stderr
            await wait_for(lambda: is_paused(app, "beat"))
        second = amqtask.Scheduler(app, clock=clock)
        async with running(second):
            await wait_for(lambda: second.active)
            for n in (2, 3):
                await clock.move_to(minute(now, n))
                await clock.settled()
            listed = await asyncio.to_thread(schedules_cli, tmp_path, target, "--json")
            resumed = await asyncio.to_thread(schedules_cli, tmp_path, target, "resume", "beat")
            assert resumed.returncode == 0, resumed.stderr
            await wait_for(lambda: is_paused(app, "beat", False))
            await clock.move_to(minute(now, 4))
            await clock.settled()
        delivered = [d.due for d in await take_all(amqp, tick.queue)]
    finally:
        await delete_topology(broker_url, app.topology)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    (row,) = data["schedules"]
    report("pause", delivered=delivered, listed=row)
    first_tick = ms(now + timedelta(minutes=1))
    assert data["source"] == "active scheduler"
    assert data["active"]["pid"] == os.getpid()
    assert row["paused"] is True
    assert row["last_fired"] == iso(first_tick)
    assert row["last_message_id"] == tick_message_id("beat", first_tick)
    # 10:02 and 10:03 fell due while paused: never fired, not even after the resume.
    assert delivered == [iso(first_tick), iso(first_tick + 3 * 60_000)]


# --- a scheduler inside a worker -----------------------------------------------------------------


async def test_a_worker_with_scheduler_fires_and_runs_its_ticks_and_reports_them_in_metrics(
    tmp_path: Path, broker_url: str, unique: str
) -> None:
    record = tmp_path / "ran.txt"
    module = f"worker_sched_{unique}"
    (tmp_path / f"{module}.py").write_text(
        "from pydantic import BaseModel\nimport amqtask\n\n"
        "class Tick(BaseModel):\n    n: int\n\n"
        f'tick = amqtask.contract("{unique}.tick", Tick)\n'
        'beat = amqtask.schedule("beat", tick, {"n": 7}, every=1)\n'
        f'app = amqtask.App("{broker_url}", [tick], namespace="{unique}", schedules=[beat])\n\n'
        "@app.handler(tick)\n"
        "async def ran(task: Tick) -> None:\n"
        f"    with open({str(record)!r}, 'a') as out:\n"
        "        out.write(f'{task.n}\\n')\n"
    )
    tick = amqtask.contract(f"{unique}.tick", Tick)  # the same topology as the module's
    app = amqtask.App(
        broker_url,
        [tick],
        namespace=unique,
        schedules=[amqtask.schedule("beat", tick, Tick(), every=1)],
    )
    await app.declare()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqtask",
        "worker",
        f"{module}:app",
        "--scheduler",
        "--json-logs",
        "--metrics-port",
        str(port),
        "--metrics-host",
        "127.0.0.1",
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for(lambda: record.exists() and len(record.read_text().split()) >= 2, 30)
        metrics = await asyncio.to_thread(scrape, port)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await delete_topology(broker_url, app.topology)
    assert proc.stderr is not None
    events = [json.loads(line)["event"] for line in (await proc.stderr.read()).splitlines()]
    assert set(record.read_text().split()) == {"7"}
    assert "scheduler_active" in events
    assert "tick_fired" in events
    assert "amqtask_scheduler_active 1.0" in metrics
    assert 'amqtask_schedule_ticks_fired_total{schedule="beat"}' in metrics


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


async def test_with_no_scheduler_running_the_state_is_read_off_the_broker_and_kept(
    make_app: AppFactory, unique: str
) -> None:
    tick = amqtask.contract(f"{unique}.tick", Tick)
    app = make_app([tick], schedules=[amqtask.schedule("beat", tick, Tick(), every=60)])
    await app.declare()
    start = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
    clock = ManualClock(minute(start, 0))
    first = amqtask.Scheduler(app, clock=clock)
    async with running(first):
        await wait_for(lambda: first.active)
        await clock.move_to(minute(start, 1))
        await clock.settled()

    read = await read_state(app, timeout=1)
    again = await read_state(app, timeout=1)  # the first read wrote the state back
    second = amqtask.Scheduler(app, clock=clock)
    async with running(second):
        await wait_for(lambda: second.active)
        await clock.settled()
        answered = await read_state(app)

    fired = ms(start + timedelta(minutes=1))
    for listing in (read, again):
        assert listing.source == Source.BROKER
        assert listing.state is not None
        assert listing.state.schedules["beat"].fired == fired
        assert listing.state.leader is not None
        assert listing.state.leader.pid == os.getpid()
    assert answered.source == Source.ACTIVE
    assert answered.state is not None
    assert answered.state.schedules["beat"].fired == fired  # the next leader read it too
