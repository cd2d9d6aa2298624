"""The store's values (`amqtask.store._model`): transitions only move a task forward."""

from __future__ import annotations

from datetime import timedelta

import pytest

from amqtask.store import TaskState, Transition, parse_duration, parse_store_url
from amqtask.store._model import ClaimVerdict, TaskInfo, claim_verdict, coalesce


def t(state: TaskState, attempt: int, at: float, task_id: str = "a", **kw: object) -> Transition:
    return Transition(task_id, "jobs.run", 1, state, attempt, at, **kw)  # type: ignore[arg-type]


def test_a_batch_keeps_one_transition_per_task_the_furthest_along() -> None:
    batch = [
        t(TaskState.QUEUED, 0, 1.0),
        t(TaskState.RUNNING, 1, 2.0, "b"),
        t(TaskState.RUNNING, 1, 3.0),
        t(TaskState.SUCCEEDED, 1, 4.0, result="1"),
    ]

    kept = coalesce(batch)

    assert [(x.id, x.state) for x in kept] == [("a", TaskState.SUCCEEDED), ("b", TaskState.RUNNING)]


def test_a_final_transition_carries_the_start_of_a_run_folded_into_it() -> None:
    (kept,) = coalesce([t(TaskState.RUNNING, 1, 2.0), t(TaskState.FAILED, 1, 5.0)])
    values = dict(zip(("id", "task", "version", "state"), kept.params(), strict=False))

    assert values["state"] == "failed"
    assert kept.params()[8] == 2.0  # started_at
    assert kept.params()[9] == 5.0  # finished_at


def test_a_late_queued_does_not_move_a_running_task_back() -> None:
    (kept,) = coalesce([t(TaskState.RUNNING, 1, 2.0), t(TaskState.QUEUED, 0, 1.0)])

    assert kept.state is TaskState.RUNNING


def test_the_next_attempt_follows_a_retry() -> None:
    (kept,) = coalesce([t(TaskState.RETRYING, 1, 2.0), t(TaskState.RUNNING, 2, 3.0)])

    assert (kept.state, kept.attempt) == (TaskState.RUNNING, 2)


def test_nothing_but_revoked_follows_revoked() -> None:
    (kept,) = coalesce([t(TaskState.REVOKED, 1, 2.0), t(TaskState.SUCCEEDED, 2, 3.0)])

    assert kept.state is TaskState.REVOKED


def test_final_states_expire_after_the_contracts_keep_and_others_never() -> None:
    assert t(TaskState.SUCCEEDED, 1, 100.0, keep=60.0).expires_at == 160.0
    assert t(TaskState.RUNNING, 1, 100.0).expires_at is None


@pytest.mark.parametrize(
    ("url", "kind", "target", "schema"),
    [
        ("sqlite:///tasks.db", "sqlite", "tasks.db", "amqtask"),
        ("sqlite:////var/lib/app/tasks.db", "sqlite", "/var/lib/app/tasks.db", "amqtask"),
        ("sqlite:///:memory:", "sqlite", ":memory:", "amqtask"),
        (
            "postgresql://app:secret@db:5432/app?schema=jobs&sslmode=require",
            "postgres",
            "postgresql://app:secret@db:5432/app?sslmode=require",
            "jobs",
        ),
    ],
)
def test_store_urls_name_the_kind_the_target_and_amqtasks_own_options(
    url: str, kind: str, target: str, schema: str
) -> None:
    parsed = parse_store_url(url)

    assert (parsed.kind, parsed.target, parsed.schema) == (kind, target, schema)


def test_claim_ttl_is_read_from_the_url() -> None:
    assert parse_store_url("sqlite:///x.db?claim_ttl=2.5").claim_ttl == 2.5


@pytest.mark.parametrize(
    "url",
    [
        "mysql://db/app",
        "sqlite://relative.db",
        "postgresql://db/app?schema=Robert'); DROP TABLE",
        "sqlite:///x.db?claim_ttl=0",
        "sqlite:///x.db?claim_ttl=soon",
    ],
)
def test_store_urls_amqtask_cannot_use_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"store|sqlite|claim_ttl"):
        parse_store_url(url)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172800), ("1w", 604800), ("1h30m", 5400)],
)
def test_durations_read_as_the_operator_writes_them(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1", "1y", "h1", "1h 30m", "-1h"])
def test_durations_that_are_not_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def row(**values: object) -> dict[str, object]:
    base: dict[str, object] = {
        "state": "running",
        "owner": None,
        "claim_expires": None,
        "committed_at": None,
    }
    return {**base, **values}


def test_a_refused_claim_says_why() -> None:
    assert claim_verdict(row(state="succeeded"), 0).verdict is ClaimVerdict.DONE
    assert claim_verdict(row(committed_at=5.0), 0).verdict is ClaimVerdict.COMMITTED
    assert claim_verdict(row(state="revoked"), 0).verdict is ClaimVerdict.REVOKED
    busy = claim_verdict(row(owner="w:1", claim_expires=20.0), 10.0)
    assert (busy.verdict, busy.expires_at) == (ClaimVerdict.BUSY, 20.0)


def test_task_info_as_json_has_iso_times_and_the_decoded_result() -> None:
    info = TaskInfo.from_row(
        {
            "id": "a",
            "task": "jobs.run",
            "version": 1,
            "state": "succeeded",
            "attempts": 1,
            "queued_at": 0.0,
            "due_at": None,
            "started_at": 1.5,
            "finished_at": 2.0,
            "updated_at": 2.0,
            "worker": "host:1",
            "error_type": None,
            "error": None,
            "reason": None,
            "traceback": None,
            "result": '{"doubled": 4}',
            "revoked_at": None,
            "expires_at": 86402.0,
        }
    )

    data = info.to_dict()

    assert data["result"] == {"doubled": 4}
    assert data["started_at"] == "1970-01-01T00:00:01.500000+00:00"
    assert data["state"] == "succeeded"
    assert data["revoke_requested"] is False
