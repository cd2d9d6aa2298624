"""Unit tests of the workers' answers to `inspect` and of what counts as a request
(`amqtask._control`)."""

from __future__ import annotations

from typing import Any

import orjson

from amqtask._control import (
    merge_into_workers,
    parse_request,
    pool_reply,
    render_workers,
    worker_reply,
)
from amqtask._operator import worker_connection_name
from amqtask._pool import ChildPool, Environment

REPLY_TO = "amq.rabbitmq.reply-to.g1h2AA5yZXF1ZXN0QHJhYmJpdAAAAAA.abc"


def pool(size: int, **counts: int) -> ChildPool:
    made = ChildPool(Environment(), size, [])
    for name, value in counts.items():
        setattr(made, name, value)
    return made


def reply(name: str, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "queues": ("orders", "orders.due"),
        "concurrency": 4,
        "prefetch": 16,
        "pool_type": "process",
        "in_flight": 3,
        "running": 2,
        "processed": {"succeeded": 5, "failed": 1},
        "pool": None,
    }
    return worker_reply(name, **{**fields, **overrides})


def test_a_worker_without_a_process_pool_answers_pool_null() -> None:
    assert pool_reply([]) is None
    assert reply("amqtask", pool=pool_reply([]))["pool"] is None


def test_the_pool_answer_sums_the_children_of_every_environment() -> None:
    native = pool(4, busy=1, recycled=2, crashed=1, killed_time_limit=0)
    other = pool(2, busy=2, recycled=0, crashed=0, killed_time_limit=3)

    assert pool_reply([native, other]) == {
        "size": 6,
        "alive": 0,  # none started
        "busy": 3,
        "recycled": 2,
        "crashed": 1,
        "killed_time_limit": 3,
    }


def test_a_new_pool_counts_nothing_yet() -> None:
    assert pool_reply([pool(3)]) == {
        "size": 3,
        "alive": 0,
        "busy": 0,
        "recycled": 0,
        "crashed": 0,
        "killed_time_limit": 0,
    }


def test_the_reply_names_the_worker_as_its_connection_does_and_is_json() -> None:
    name = worker_connection_name("shop", concurrency=4, prefetch=16, pool="process")

    answer = reply(name, pool={"size": 4, "alive": 4})

    assert answer["name"] == name
    assert isinstance(answer["host"], str)
    assert isinstance(answer["pid"], int)
    assert answer["started_at"] is not None
    assert answer["started_at"] in name
    assert answer["queues"] == ["orders", "orders.due"]
    assert (answer["concurrency"], answer["prefetch"], answer["pool_type"]) == (4, 16, "process")
    assert (answer["in_flight"], answer["running"]) == (3, 2)
    assert answer["processed"] == {"failed": 1, "succeeded": 5}
    assert orjson.loads(orjson.dumps(answer)) == answer


def test_a_connection_name_that_is_not_a_workers_still_gives_host_and_pid() -> None:
    answer = reply("my-program")

    assert answer["name"] == "my-program"
    assert isinstance(answer["host"], str)
    assert isinstance(answer["pid"], int)
    assert answer["started_at"] is None


def test_an_inspect_request_with_a_direct_reply_to_is_answered() -> None:
    assert parse_request(b'{"op": "inspect"}', REPLY_TO, "c1") == "inspect"
    assert parse_request(b'{"op": "inspect"}', "amq.rabbitmq.reply-to", "c1") == "inspect"


def test_malformed_or_unknown_requests_are_ignored() -> None:
    assert parse_request(b'{"op": "shutdown"}', REPLY_TO, "c1") is None
    assert parse_request(b"not json", REPLY_TO, "c1") is None
    assert parse_request(b'["inspect"]', REPLY_TO, "c1") is None
    assert parse_request(b"{}", REPLY_TO, "c1") is None
    assert parse_request(b'{"op": "inspect"}', None, "c1") is None
    assert parse_request(b'{"op": "inspect"}', REPLY_TO, None) is None


def test_a_reply_to_that_names_a_queue_is_refused() -> None:
    # Answering there would publish into any queue the sender names, a work queue included.
    assert parse_request(b'{"op": "inspect"}', "orders", "c1") is None
    assert parse_request(b'{"op": "inspect"}', "amqtask.control.x", "c1") is None


def workers_listing(*connections: str) -> dict[str, Any]:
    """An `amqtask workers` report's shape (`amqtask._operator.workers_report`)."""
    workers = [{"connection": c, "amqtask_worker": True, "pool": "process"} for c in connections]
    return {
        "queues": [{"queue": "orders", "workers": [dict(w) for w in workers]}],
        "workers": workers,
    }


def test_workers_that_answered_get_in_flight_and_pool_children_the_others_null() -> None:
    listing = workers_listing("a worker host=x pid=1", "a worker host=y pid=2")
    children = {"size": 2, "alive": 2, "busy": 1, "recycled": 0, "crashed": 0}
    answered = reply("a worker host=x pid=1", in_flight=4, pool=children)

    merge_into_workers(listing, [answered])

    for worker in (listing["workers"][0], listing["queues"][0]["workers"][0]):
        assert worker["in_flight"] == 4
        assert worker["pool_children"] == children
        assert worker["pool"] == "process"  # the pool's kind, as before
    for worker in (listing["workers"][1], listing["queues"][0]["workers"][1]):
        assert worker["in_flight"] is None
        assert worker["pool_children"] is None


def test_the_workers_section_shows_in_flight_and_the_pool_or_says_nobody_answered() -> None:
    children = pool_reply([pool(4, busy=1, crashed=1, killed_time_limit=2)])
    assert children is not None
    children["alive"] = 3
    pooled = reply(worker_connection_name("shop", concurrency=4, prefetch=16, pool="process"))
    text = render_workers([{**pooled, "pool": children}, reply("other")], timeout=1.0)

    lines = text.splitlines()
    assert lines[0] == "Workers (2 answered)"
    assert lines[1].endswith(
        "queues orders, orders.due  in flight 3 (prefetch 16)  pool 3/4 alive, 1 busy, "
        "recycled 0, crashed 1, killed on time limit 2"
    )
    assert lines[2].endswith("in flight 3 (prefetch 16)  no process pool")
    assert render_workers([], timeout=2.5).startswith("Workers: no worker answered within 2.5 s")
