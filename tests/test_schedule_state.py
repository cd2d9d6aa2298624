"""The schedules' state on the broker (pure): records, and merging them in any order."""

from __future__ import annotations

import itertools

import pytest

from amqtask._schedule_state import (
    Advance,
    Identity,
    Ledger,
    Pause,
    Progress,
    Query,
    Record,
    RecordError,
    Snapshot,
    Sync,
    decode,
    encode,
)

LEADER = Identity("host-a", 41, "abc", since=1_000)


def merged(records: list[Record]) -> Ledger:
    ledger = Ledger()
    for record in records:
        ledger.apply(record)
    return ledger


def test_every_record_reads_back_as_written() -> None:
    records: list[Record] = [
        Snapshot({"beat": Progress(5_000, 4_000, True, 3_000)}, LEADER, 6_000),
        Advance({"beat": 7_000}, {"beat": 7_000}),
        Pause("beat", False, 8_000, "ops pid 9"),
        Sync("feed"),
        Query(),
    ]

    assert [decode(encode(record)) for record in records] == records


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b'{"format": 99, "kind": "sync", "id": "x"}', b'{"format": 1, "kind": "?"}'],
)
def test_anything_else_in_the_queue_is_refused(body: bytes) -> None:
    with pytest.raises(RecordError):
        decode(body)


def test_records_merge_to_one_state_in_any_order_and_any_number_of_times() -> None:
    records: list[Record] = [
        Snapshot({"beat": Progress(cursor=10_000, fired=10_000)}, LEADER, 10_000),
        Advance({"beat": 12_000, "daily": 11_000}, {"beat": 12_000}),
        Advance({"beat": 11_000}, {"beat": 11_000}),
        Pause("daily", True, 11_500),
        Pause("daily", False, 13_000),
    ]
    expected = merged(records)

    for order in itertools.permutations(records):
        assert merged([*order, *order]) == expected
    assert expected.schedules["beat"] == Progress(cursor=12_000, fired=12_000)
    assert expected.schedules["daily"] == Progress(cursor=13_000, paused=False, paused_at=13_000)


def test_a_resume_moves_the_cursor_past_the_ticks_of_the_pause() -> None:
    progress = Progress(cursor=1_000, fired=1_000)

    progress.set_paused(True, 2_000)
    progress.set_paused(False, 9_000)

    assert progress.cursor == 9_000  # ticks due while paused never fire
    assert progress.fired == 1_000
    assert not progress.paused


def test_the_latest_pause_or_resume_wins() -> None:
    progress = Progress(cursor=0)

    progress.set_paused(True, 5_000)
    progress.set_paused(False, 4_000)  # older: read later after a takeover, still older

    assert progress.paused


def test_a_snapshot_keeps_entries_of_schedules_this_app_no_longer_has() -> None:
    ledger = merged([Advance({"renamed": 5_000}, {})])

    snapshot = ledger.snapshot(LEADER, 6_000)

    assert snapshot.schedules["renamed"].cursor == 5_000
    assert merged([snapshot]).leader == LEADER
