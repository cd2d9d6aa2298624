"""How the chaos run counts: unit tests of `Result` and the record file, no broker needed."""

from __future__ import annotations

from pathlib import Path

from .harness import Config, DeadLetter, Fault, Result, Run, Sent


def result(**fields: object) -> Result:
    outcome = Result(Config(), "chaostest", Path("/nonexistent"))
    outcome.in_flight = {9100: 0.0, 9101: 0.0}
    for name, value in fields.items():
        setattr(outcome, name, value)
    return outcome


def sent(*ns: int) -> dict[int, Sent]:
    return {n: Sent(f"m{n}", at=float(n), delay=0) for n in ns}


def test_a_run_where_every_confirmed_send_was_processed_passes() -> None:
    outcome = result(confirmed=sent(1, 2, 3))
    outcome.processed.update([1, 2, 3, 3])

    assert outcome.failures() == []
    assert outcome.duplicates == 1
    assert "PASSED" in outcome.report()


def test_a_confirmed_send_neither_processed_nor_dead_lettered_is_lost() -> None:
    outcome = result(confirmed=sent(1, 2, 3))
    outcome.processed.update([1])
    outcome.dead = [DeadLetter(2, "m2", "broker rejected", "", at=None)]

    assert outcome.lost == [3]
    assert outcome.failures() == [
        "lost: 1 confirmed sends never processed",
        "unexpectedly dead-lettered: 1",
    ]


def test_an_unconfirmed_send_that_never_arrived_is_not_lost() -> None:
    outcome = result(confirmed=sent(1), unconfirmed_ids={2})
    outcome.processed.update([1])

    assert outcome.lost == []
    assert outcome.failures() == []


def test_a_handler_slot_still_taken_after_the_drain_fails_the_run() -> None:
    outcome = result(confirmed=sent(1), in_flight={9100: 0.0, 9101: 2.0})
    outcome.processed.update([1])

    assert outcome.failures() == ["slots stuck at the end: 2"]


def test_a_worker_process_whose_metrics_do_not_answer_fails_the_run() -> None:
    outcome = result(confirmed=sent(1), in_flight={9100: 0.0, 9101: None})
    outcome.processed.update([1])

    assert outcome.stuck_slots is None
    assert outcome.failures()[0].startswith("slots stuck at the end: unknown")


def test_every_supervisor_exit_fails_the_run_and_is_marked_in_the_table() -> None:
    outcome = result(confirmed=sent(1), supervisor_exits=[(12.0, 1, "worker_kill@11s")])
    outcome.processed.update([1])

    assert outcome.failures() == ["supervisor exits: 1"]
    row = next(line for line in outcome.table().splitlines() if line.startswith("supervisor"))
    assert row.split()[-3:] == ["1", "0", "FAIL"]


def test_an_event_is_blamed_on_the_last_fault_started_before_it() -> None:
    outcome = result(faults=[Fault("tcp_cut", 10.0), Fault("worker_kill", 20.0)])

    assert outcome.preceding(5.0) == "no fault"
    assert outcome.preceding(15.0) == "tcp_cut@10s"
    assert outcome.preceding(25.0) == "worker_kill@20s"
    assert outcome.preceding(None) == "unknown time"


def test_the_record_file_is_read_in_whole_lines_only(tmp_path: Path) -> None:
    run = Run(Config(workdir=tmp_path))
    run.record.write_bytes(b"1 100\n2 100\n3 1")
    run._read_records()
    assert dict(run.result.processed) == {1: 1, 2: 1}

    with run.record.open("ab") as record:
        record.write(b"01\n1 101\n")
    run._read_records()
    assert dict(run.result.processed) == {1: 2, 2: 1, 3: 1}
