"""Periodic tasks under `amqtask.testing`: the real scheduler on the in-memory broker.

`TestApp` starts the app's `Scheduler` on the memory transport, where the broker models what it
relies on (the scheduler queue's single active consumer, records held unacked and returned when
their channel closes, confirms, direct reply-to for `amqtask schedules`), and the virtual clock
makes an hour of ticks take milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import amqtask
from amqtask import _codec
from amqtask._schedule import tick_message_id
from amqtask.testing import TestApp

URL = "amqp://memory.invalid/"


class Ping(BaseModel):
    n: int = 0


def ping_app(**schedule: Any) -> tuple[amqtask.App, amqtask.Contract[Ping, None], list[int]]:
    ping = amqtask.contract("health.ping", Ping)
    app = amqtask.App(
        URL, [ping], schedules=[amqtask.schedule("beat", ping, Ping(n=7), **schedule)]
    )
    runs: list[int] = []

    @app.handler(ping)
    async def handle(job: Ping) -> None:
        runs.append(job.n)

    return app, ping, runs


def due_times(messages: list[Any]) -> list[datetime]:
    return [datetime.fromisoformat(m.headers[_codec.DUE]) for m in messages]


def ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


async def test_an_hour_of_an_every_ten_minutes_schedule_runs_its_task_six_times() -> None:
    app, ping, runs = ping_app(every=timedelta(minutes=10))

    async with TestApp(app) as t:
        start = t.clock.utcnow()
        await t.advance(hours=1)
        ticks = t.sent(ping)

    assert runs == [7] * 6  # each tick reached the handler, with the schedule's payload
    dues = due_times(ticks)
    assert all(due.minute % 10 == 0 and due.second == 0 for due in dues)
    assert [b - a for a, b in itertools.pairwise(dues)] == [timedelta(minutes=10)] * 5
    assert start < dues[0] <= start + timedelta(minutes=10)
    for tick, due in zip(ticks, dues, strict=True):
        assert tick.headers[_codec.SCHEDULE] == "beat"
        assert tick.message_id == tick_message_id("beat", ms(due))
        assert tick.type == ping.name  # as `send` publishes it
    assert len({tick.message_id for tick in ticks}) == 6


async def test_a_paused_schedule_skips_its_ticks_and_resumes_from_its_next_due_time() -> None:
    app, ping, runs = ping_app(every=timedelta(minutes=10))

    async with TestApp(app) as t:
        await t.advance(minutes=30)
        assert len(runs) == 3
        await t.pause("beat")  # as `amqtask schedules APP pause beat`
        await t.advance(minutes=30)
        assert len(runs) == 3
        (row,) = await t.schedules()
        assert row["paused"] is True
        assert row["last_message_id"] == t.sent(ping)[-1].message_id
        resumed = t.clock.utcnow()
        await t.resume("beat")
        await t.advance(minutes=30)
        (row,) = await t.schedules()

    assert len(runs) == 6
    assert all(due > resumed for due in due_times(t.sent(ping)[3:]))  # none of the paused ones
    assert row["paused"] is False
    assert row["last_fired"] == t.sent(ping)[-1].headers[_codec.DUE]


async def test_pausing_a_schedule_no_app_has_says_which_there_are() -> None:
    app, _, _ = ping_app(every=60)

    async with TestApp(app) as t:
        with pytest.raises(amqtask.ScheduleError, match="known: beat"):
            await t.pause("bet")


async def test_after_downtime_latest_fires_the_last_missed_tick_once_and_skip_fires_none() -> None:
    for misfire, expected in (("latest", 1), ("skip", 0)):
        app, ping, runs = ping_app(every=timedelta(minutes=1), catch_up=30, misfire=misfire)
        async with TestApp(app) as t:
            await t.advance(seconds=60 - t.clock.now() % 60 + 1)  # a second past a tick
            assert len(runs) == 1
            await t.schedulers[0].stop()  # every replica down for ten minutes and more
            await t.advance(minutes=10, seconds=44)
            assert len(runs) == 1
            await t.start_scheduler()  # a replica comes back
            await t.advance(seconds=1)
            assert len(runs) == 1 + expected, misfire
            if expected:  # the latest missed tick, 45 s late: past catch_up, so only it
                first, late = due_times(t.sent(ping))
                assert late - first == timedelta(minutes=10)
            await t.advance(minutes=1)
            assert len(runs) == 2 + expected, misfire  # and on as usual


async def test_a_standby_replica_takes_over_with_the_state_and_fires_no_tick_twice() -> None:
    app, ping, runs = ping_app(every=timedelta(seconds=30))

    async with TestApp(app) as t:
        standby = await t.start_scheduler()
        await t.advance(minutes=2)
        assert t.schedulers[0].active
        assert not standby.active
        await t.schedulers[0].stop()
        await t.advance(seconds=0.1)
        assert standby.active
        await t.advance(minutes=2)

    dues = due_times(t.sent(ping))
    assert len(runs) == len(dues) == 8
    assert sorted(set(dues)) == dues  # every 30 s, none twice, none missed over the takeover
    assert dues[-1] - dues[0] == timedelta(seconds=210)


async def test_without_schedulers_nothing_fires() -> None:
    app, _ping, runs = ping_app(every=timedelta(minutes=1))

    async with TestApp(app, schedulers=False) as t:
        await t.advance(minutes=5)
        assert t.schedulers == []

    assert runs == []


async def test_a_daily_cron_schedule_fires_at_its_local_time() -> None:
    app, ping, runs = ping_app(cron="30 6 * * *", tz="Europe/Berlin")

    async with TestApp(app) as t:
        await t.advance(days=2)

    dues = due_times(t.sent(ping))
    assert len(runs) == 2
    assert all(due.astimezone(UTC).strftime("%H:%M") == "05:30" for due in dues)  # CET: UTC+1


async def test_ticks_reach_a_worker_app_of_their_own() -> None:
    ping = amqtask.contract("health.ping", Ping)
    scheduling = amqtask.App(
        URL, [ping], schedules=[amqtask.schedule("beat", ping, Ping(), every=60)]
    )
    working = amqtask.App(URL, [ping])
    runs: list[int] = []

    @working.handler(ping)
    async def handle(job: Ping) -> None:
        runs.append(job.n)

    async with TestApp(working, scheduling) as t:
        await t.advance(minutes=3)
        await asyncio.sleep(0)

    assert len(t.sent(ping)) == len(runs) == 3


async def test_a_tick_the_broker_refuses_is_published_again_a_second_later_with_its_id() -> None:
    app, ping, runs = ping_app(every=timedelta(minutes=1))

    async with TestApp(app) as t:
        t.fail_next_publish(amqtask.PublishNacked, task=ping)
        await t.advance(seconds=60 - t.clock.now() % 60 + 0.5)  # the tick was refused
        assert runs == []
        await t.advance(seconds=1)
        (tick,) = t.sent(ping)

    assert runs == [7]
    (due,) = due_times([tick])
    assert tick.message_id == tick_message_id("beat", ms(due))  # the tick it was meant to be
