"""Schedules (pure): building them, their due times across daylight-saving changes, and the
misfire policy, with the clock given as a number."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel, ValidationError

import amqtask
from amqtask._evolution import check, dumps, export, loads
from amqtask._schedule import Decision, Misfire, decide, iso, ms, tick_message_id
from amqtask._schedule_admin import Listing, Source, render
from amqtask._schedule_admin import report as report_of
from amqtask._schedule_state import Identity, Progress, Snapshot

BERLIN = ZoneInfo("Europe/Berlin")
MINUTE = 60_000


class Report(BaseModel):
    kind: str


class Ping(BaseModel):
    pass


report = amqtask.contract("reports.daily", Report)
ping = amqtask.contract("ping", Ping)


def at(*args: int, tz: ZoneInfo | None = BERLIN, fold: int = 0) -> int:
    return ms(datetime(*args, tzinfo=tz, fold=fold))  # type: ignore[misc]


def run(item: amqtask.Schedule, start: int, end: int, step: int = MINUTE) -> list[int]:
    """What a scheduler whose clock goes from `start` to `end` in `step`s fires, in order."""
    fired, cursor, now = [], start, start
    while now <= end:
        decision = decide(item, cursor, now)
        fired += decision.fire
        for due in (decision.skip_to, *decision.fire):
            if due is not None:
                cursor = max(cursor, due)
        now += step
    return fired


# --- building ---------------------------------------------------------------------------------


def test_a_payload_that_does_not_fit_fails_with_the_schedule_s_name() -> None:
    with pytest.raises(amqtask.ScheduleError, match=r"schedule 'daily-report'.*Report") as caught:
        amqtask.schedule("daily-report", report, {"kind": 3}, cron="0 6 * * *")

    assert isinstance(caught.value.__cause__, ValidationError)


def test_the_payload_is_validated_into_the_contract_s_model() -> None:
    item = amqtask.schedule("daily-report", report, {"kind": "sales"}, cron="@daily")

    assert item.payload == Report(kind="sales")
    assert item.cron == "0 0 * * *"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "0 6 * *"}, "five fields"),
        ({"cron": "61 6 * * *"}, "invalid cron"),
        ({"cron": "0 0 * * * *"}, "five fields"),
        ({"cron": "0 6 * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"every": 0.5}, "at least 1 s"),
        ({"every": 60, "tz": "Europe/Berlin"}, "tz applies to cron"),
        ({"every": 60, "jitter": 60}, "jitter"),
        ({"cron": "0 6 * * *", "every": 60}, "either cron= or every="),
        ({}, "either cron= or every="),
        ({"every": 60, "misfire": "all"}, "misfire must be one of"),
        ({"every": 60, "catch_up": -1}, "catch_up"),
        ({"every": 60, "start": datetime(2025, 1, 1)}, "aware"),
        ({"cron": "0 6 * * *", "start": datetime(2025, 1, 1, tzinfo=UTC)}, "interval"),
    ],
)
def test_a_bad_schedule_is_refused_with_what_is_wrong(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(amqtask.ScheduleError, match=message):
        amqtask.schedule("bad", ping, Ping(), **kwargs)  # type: ignore[arg-type]


def test_an_app_refuses_a_schedule_of_a_contract_it_does_not_have() -> None:
    item = amqtask.schedule("beat", ping, Ping(), every=30)

    with pytest.raises(amqtask.ScheduleError, match=r"'beat'.*not among this app's contracts"):
        amqtask.App("amqp://localhost/", [report], schedules=[item])


def test_an_app_refuses_two_schedules_of_one_name() -> None:
    items = [amqtask.schedule("beat", ping, Ping(), every=s) for s in (30, 60)]

    with pytest.raises(amqtask.ScheduleError, match="'beat' is defined twice"):
        amqtask.App("amqp://localhost/", [ping], schedules=items)


def test_an_app_with_schedules_derives_the_scheduler_queue() -> None:
    item = amqtask.schedule("beat", ping, Ping(), every=30)
    app = amqtask.App("amqp://localhost/", [ping], namespace="ns", schedules=[item])
    plain = amqtask.App("amqp://localhost/", [ping], namespace="ns")

    queue = app.topology.queue("ns.scheduler")
    assert dict(queue.arguments)["x-single-active-consumer"] is True
    assert queue.type == "quorum"
    assert "ns.scheduler" not in {q.name for q in plain.topology.queues}


# --- due times ----------------------------------------------------------------------------------


def test_an_interval_falls_due_at_whole_multiples_since_its_start() -> None:
    start = datetime(2025, 1, 1, 0, 0, 10, tzinfo=UTC)
    item = amqtask.schedule("beat", ping, Ping(), every=timedelta(seconds=30), start=start)

    assert item.next_due(ms(start) - 1) == ms(start)
    assert item.next_due(ms(start)) == ms(start) + 30_000
    assert item.next_due(ms(start) + 29_999) == ms(start) + 30_000
    assert item.last_due_before(ms(start) + 30_000) == ms(start)


def test_a_0230_job_runs_once_on_the_night_that_skips_0230() -> None:
    item = amqtask.schedule("nightly", ping, Ping(), cron="30 2 * * *", tz="Europe/Berlin")

    fired = run(item, at(2025, 3, 29, 12), at(2025, 3, 31, 12))

    # 2025-03-30: 02:00 CET jumps to 03:00 CEST; the job runs at the jump, then as usual.
    assert [iso(due) for due in fired] == ["2025-03-30T01:00:00Z", "2025-03-31T00:30:00Z"]


def test_a_0230_job_runs_once_on_the_night_that_repeats_0230() -> None:
    item = amqtask.schedule("nightly", ping, Ping(), cron="30 2 * * *", tz="Europe/Berlin")

    fired = run(item, at(2025, 10, 25, 12), at(2025, 10, 27, 12))

    # 2025-10-26: 03:00 CEST goes back to 02:00 CET; 02:30 comes twice, the job runs at the first.
    assert [iso(due) for due in fired] == ["2025-10-26T00:30:00Z", "2025-10-27T01:30:00Z"]


def test_an_hourly_job_follows_real_time_across_both_changes() -> None:
    item = amqtask.schedule("hourly", ping, Ping(), cron="0 * * * *", tz="Europe/Berlin")

    spring = run(item, at(2025, 3, 30, 0, 30), at(2025, 3, 30, 4, 30))
    autumn = run(item, at(2025, 10, 26, 0, 30), at(2025, 10, 26, 4, 30))

    # 00:30 to 04:30 local is three real hours in spring and five in autumn: one run in each.
    assert [iso(d) for d in spring] == [f"2025-03-30T0{h}:00:00Z" for h in range(3)]
    assert [iso(d) for d in autumn] == [
        "2025-10-25T23:00:00Z",
        *(f"2025-10-26T0{h}:00:00Z" for h in range(4)),
    ]


def test_a_job_started_in_the_second_copy_of_the_hour_does_not_run_the_first_again() -> None:
    item = amqtask.schedule("nightly", ping, Ping(), cron="45 2 * * *", tz="Europe/Berlin")

    # 02:40 CET (the second 02:40) is after 02:45 CEST: that run is over.
    after = at(2025, 10, 26, 2, 40, fold=1)
    assert item.next_due(after) == at(2025, 10, 27, 2, 45)


# --- the misfire policy -------------------------------------------------------------------------


def minutely(misfire: str, catch_up: float = 30) -> amqtask.Schedule:
    return amqtask.schedule("minutely", ping, Ping(), every=60, misfire=misfire, catch_up=catch_up)


def test_ticks_inside_the_catch_up_window_all_fire_in_order() -> None:
    item = amqtask.schedule("beat", ping, Ping(), every=1, catch_up=10)
    cursor = at(2025, 1, 1, 12, tz=UTC)

    decision = decide(item, cursor, cursor + 5_400)  # down for five seconds and a bit

    assert decision == Decision(fire=tuple(cursor + s * 1000 for s in range(1, 6)))


def test_skip_fires_nothing_of_ten_missed_minutes() -> None:
    cursor = at(2025, 1, 1, 12, tz=UTC)

    decision = decide(minutely("skip"), cursor, cursor + 10 * MINUTE + 45_000)

    assert decision.fire == ()
    assert decision.missed == 10
    assert decision.skip_to == cursor + 10 * MINUTE
    assert (decision.first_missed, decision.last_missed) == (cursor + MINUTE, cursor + 10 * MINUTE)


def test_latest_fires_exactly_one_of_ten_missed_minutes() -> None:
    cursor = at(2025, 1, 1, 12, tz=UTC)

    decision = decide(minutely("latest"), cursor, cursor + 10 * MINUTE + 45_000)

    assert decision.fire == (cursor + 10 * MINUTE,)
    assert decision.missed == 9
    assert decision.skip_to == cursor + 10 * MINUTE - 1


def test_latest_fires_no_missed_tick_when_a_newer_one_fires_anyway() -> None:
    cursor = at(2025, 1, 1, 12, tz=UTC)

    decision = decide(minutely("latest"), cursor, cursor + 10 * MINUTE + 10_000)

    assert decision.fire == (cursor + 10 * MINUTE,)  # on time: inside the window
    assert decision.missed == 9


def test_a_tick_waits_for_its_jitter_and_every_replica_draws_the_same() -> None:
    item = amqtask.schedule("beat", ping, Ping(), every=60, jitter=20)
    due = at(2025, 1, 1, 12, tz=UTC)

    offsets = {item.fire_at(due + n * MINUTE) - (due + n * MINUTE) for n in range(50)}

    assert all(0 <= offset <= 20_000 for offset in offsets)
    assert len(offsets) > 10
    assert decide(item, due - 1, item.fire_at(due) - 1).fire == ()
    assert decide(item, due - 1, item.fire_at(due)).fire == (due,)


def test_a_tick_s_message_id_depends_on_the_schedule_and_the_due_time_only() -> None:
    due = at(2025, 1, 1, 12, tz=UTC)

    assert tick_message_id("beat", due) == tick_message_id("beat", due)
    assert tick_message_id("beat", due) != tick_message_id("beat", due + 1000)
    assert tick_message_id("beat", due) != tick_message_id("other", due)
    assert len(tick_message_id("beat", due)) == 32


def test_misfire_is_a_string_enum() -> None:
    assert Misfire("skip") is Misfire.SKIP
    assert amqtask.Misfire.LATEST == "latest"


# --- contracts export and check -------------------------------------------------------------


def test_the_export_lists_the_schedules_and_check_shows_their_changes_as_compatible() -> None:
    old = amqtask.schedule("nightly", report, Report(kind="sales"), cron="0 6 * * *", tz="UTC")
    new = amqtask.schedule("nightly", report, Report(kind="sales"), cron="0 7 * * *", tz="UTC")
    added = amqtask.schedule("beat", ping, Ping(), every=30)

    before = export([report, ping], namespace="ns", schedules=[old])
    after = export([report, ping], namespace="ns", schedules=[new, added])
    changes = check(loads(dumps(before)), after)

    (entry,) = before["schedules"]
    assert entry["task"] == "reports.daily"
    assert entry["payload"] == {"kind": "sales"}
    assert [(c.subject, c.path, c.change) for c in changes] == [
        ("schedule beat", "schedule", "schedule added"),
        ("schedule nightly", "cron", 'cron changed: "0 6 * * *" -> "0 7 * * *"'),
    ]
    assert not any(change.breaking for change in changes)


# --- amqtask schedules: the listing -----------------------------------------------------------


def test_the_listing_shows_each_schedule_its_next_due_time_last_tick_and_who_is_active() -> None:
    nightly = amqtask.schedule("nightly", report, Report(kind="x"), cron="0 6 * * *", tz="UTC")
    beat = amqtask.schedule("beat", ping, Ping(), every=30)
    app = amqtask.App("amqp://localhost/", [report, ping], schedules=[nightly, beat])
    now = at(2025, 1, 1, 12, tz=UTC)
    leader = Identity("host-a", 41, "abc", since=now - 60_000)
    state = Snapshot(
        {"beat": Progress(cursor=now, fired=now, paused=True, paused_at=now)}, leader, now
    )

    active = report_of(app, Listing(Source.ACTIVE, state), now + 1)
    offline = report_of(app, Listing(Source.BROKER, state), now + 1)
    unknown = report_of(app, Listing(Source.UNKNOWN, None), now + 1)

    rows = {row["name"]: row for row in active["schedules"]}
    assert rows["nightly"]["next_due"] == "2025-01-02T06:00:00Z"
    assert rows["nightly"]["last_fired"] is None
    assert rows["nightly"]["paused"] is False
    assert rows["beat"]["next_due"] == "2025-01-01T12:00:30Z"
    assert rows["beat"]["last_fired"] == "2025-01-01T12:00:00Z"
    assert rows["beat"]["last_message_id"] == tick_message_id("beat", now)
    assert rows["beat"]["paused"] is True
    assert active["active"]["pid"] == 41
    assert active["active"]["since"] == "2025-01-01T11:59:00Z"
    assert render(active).splitlines()[0] == (
        "active scheduler: host-a pid 41 since 2025-01-01T11:59:00Z"
    )
    assert offline["active"] is None
    assert render(offline).startswith("active scheduler: none (last active: host-a pid 41)")
    assert {row["paused"] for row in unknown["schedules"]} == {None}
    assert "did not answer" in render(unknown)
