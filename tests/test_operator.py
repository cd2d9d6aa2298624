"""Unit tests of `amqtask._operator`: how a worker names its connection, and the workers report
built from the management API's consumer and connection lists."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime

from pydantic import BaseModel

import amqtask
from amqtask._operator import (
    parse_worker_name,
    render_workers,
    worker_connection_name,
    workers_report,
)


class Job(BaseModel):
    n: int


RESIZE = amqtask.contract("images.resize", Job, queue="images")
THUMB = amqtask.contract("images.thumb", Job, queue="images")
MAIL = amqtask.contract("mail.send", Job)
STARTED = datetime(2025, 1, 2, 3, 4, 5, 678, tzinfo=UTC)


def test_a_worker_names_its_connection_after_itself_and_the_name_reads_back() -> None:
    name = worker_connection_name(
        "shop", concurrency=8, prefetch=16, pool="process", started=STARTED
    )

    assert name == (
        f"shop worker host={socket.gethostname()} pid={os.getpid()} concurrency=8 prefetch=16 "
        "pool=process started=2025-01-02T03:04:05+00:00"
    )
    assert parse_worker_name(name) == {
        "app": "shop",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "concurrency": 8,
        "prefetch": 16,
        "pool": "process",
        "started": "2025-01-02T03:04:05+00:00",
    }


def test_names_of_other_programs_are_not_taken_for_workers() -> None:
    assert parse_worker_name("amqtask") is None
    assert parse_worker_name("billing worker of the night") is None
    assert parse_worker_name("x worker host=a") is None  # no pid


def consumer(queue: str, address: str, prefetch: int = 10) -> dict[str, object]:
    """A consumer as `/api/consumers` lists it: its connection named by address."""
    return {
        "queue": {"name": queue, "vhost": "/"},
        "prefetch_count": prefetch,
        "channel_details": {
            "connection_name": address,
            "peer_host": "10.0.0.7",
            "peer_port": int(address.split(":")[1].split()[0]),
        },
    }


WORKER_AT = "10.0.0.7:51234 -> 10.0.0.2:5672"
OTHER_AT = "10.0.0.7:51300 -> 10.0.0.2:5672"


def test_the_report_lists_per_work_queue_the_workers_consuming_it_or_its_due_queue() -> None:
    worker = worker_connection_name(
        "shop", concurrency=4, prefetch=4, pool="thread", started=STARTED
    )
    consumers = [
        consumer("images", WORKER_AT, 4),
        consumer("images.due", WORKER_AT, 4),
        consumer("images", OTHER_AT, 1),
        consumer("unrelated", WORKER_AT),  # another app's queue: not listed
    ]
    connections = [
        {"name": WORKER_AT, "user_provided_name": worker, "connected_at": 1735787045000},
        {"name": OTHER_AT, "client_properties": {"connection_name": "a node.js consumer"}},
    ]

    report = workers_report([RESIZE, THUMB, MAIL], consumers, connections)

    images, mail = report["queues"]
    assert images["queue"] == "images"
    assert images["tasks"] == ["images.resize v1", "images.thumb v1"]
    theirs, ours = images["workers"]  # by connection name
    assert theirs["connection"] == "a node.js consumer"
    assert theirs["amqtask_worker"] is False
    assert ours["amqtask_worker"] is True
    assert (ours["host"], ours["pid"], ours["concurrency"], ours["pool"]) == (
        socket.gethostname(),
        os.getpid(),
        4,
        "thread",
    )
    assert ours["queues"] == {"images": 4, "images.due": 4}
    assert ours["connected_at"] == "2025-01-02T03:04:05+00:00"
    assert ours["peer"] == "10.0.0.7:51234"
    assert mail == {"queue": "mail.send", "tasks": ["mail.send v1"], "workers": []}

    text = render_workers(report)
    assert f"pid {os.getpid()}  concurrency 4  prefetch 4  pool thread" in text
    assert "'a node.js consumer' (not an amqtask worker)  prefetch 1" in text
    assert "mail.send  (mail.send v1)\n    no consumer" in text
    assert text.endswith("1 worker process(es)")
