"""Unit tests of `amqtask status` without a broker (`amqtask._status`).

The management API is played by a stub HTTP server on localhost, answering with JSON shaped like
RabbitMQ 3.10's `GET /api/queues/{vhost}/{name}`.
"""

from __future__ import annotations

import base64
import http.server
import socket
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import orjson
import pytest
from pydantic import BaseModel

import amqtask
from amqtask._status import (
    UNKNOWN_OVER_AMQP,
    Management,
    ManagementUnavailable,
    QueueStats,
    Sample,
    Source,
    merge,
    parse_management_queue,
    queues_of,
    rates,
    render,
    report,
)
from amqtask.routing import Names


class Job(BaseModel):
    n: int


JOB = amqtask.contract("jobs.run", Job, queue="jobs")
OTHER = amqtask.contract("jobs.other", Job, queue="other", version=2)
NAMES = Names("ns")

# A quorum queue as the 3.10 management API shows it (fields trimmed to the ones read).
QUEUE_JSON = {
    "name": "jobs",
    "vhost": "/",
    "type": "quorum",
    "messages": 7,
    "messages_ready": 5,
    "messages_unacknowledged": 2,
    "consumers": 1,
    "message_stats": {
        "publish": 40,
        "publish_details": {"rate": 1.5},
        "deliver_get": 33,
        "deliver_get_details": {"rate": 1.25},
        "ack": 31,
        "ack_details": {"rate": 1.0},
    },
}


class StubManagement(http.server.BaseHTTPRequestHandler):
    queues: ClassVar[dict[str, dict[str, Any]]] = {"/api/queues/%2F/jobs": QUEUE_JSON}

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(b"admin:s3cret").decode()
        if self.headers.get("Authorization") != expected:
            self._answer(401, {"error": "not_authorised"})
        elif self.path == "/api/queues/%2F/broken":
            self._answer(200, b"<html>not the API</html>")
        elif self.path in self.queues:
            self._answer(200, self.queues[self.path])
        else:
            self._answer(404, {"error": "Object Not Found", "reason": "Not Found"})

    def _answer(self, code: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stub_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubManagement)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_queue_is_read_from_the_management_api(stub_url: str) -> None:
    management = Management.from_urls(
        stub_url.replace("http://", "http://admin:s3cret@"), "amqp://guest:guest@h/"
    )

    stats = management.queue("/", "jobs")

    assert stats == QueueStats(
        "jobs",
        exists=True,
        ready=5,
        unacked=2,
        consumers=1,
        published=40,
        delivered=33,
        publish_rate=1.5,
        deliver_rate=1.25,
        dead_letter_pending=0,
    )
    assert stats.messages == 7
    assert management.queue("/", "gone") == QueueStats("gone", exists=False)


def test_credentials_come_from_the_amqp_url_when_the_management_url_has_none(
    stub_url: str,
) -> None:
    management = Management.from_urls(stub_url + "/", "amqp://admin:s3cret@h:5672/")

    assert management.base_url == stub_url
    assert management.queue("/", "jobs").unacked == 2


def test_refused_credentials_unreachable_and_non_api_answers_raise(stub_url: str) -> None:
    wrong = Management.from_urls(stub_url, "amqp://guest:guest@h/")
    with pytest.raises(ManagementUnavailable, match="HTTP 401"):
        wrong.queue("/", "jobs")
    right = Management.from_urls(stub_url, "amqp://admin:s3cret@h/")
    with pytest.raises(ManagementUnavailable, match="did not answer with JSON"):
        right.queue("/", "broken")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(ManagementUnavailable, match="cannot reach the management API"):
        Management.from_urls(f"http://127.0.0.1:{closed}", "amqp://h/", timeout=2).queue("/", "x")


def test_a_management_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="expected http"):
        Management.from_urls("amqp://h:15672", "amqp://h/")


def test_a_queue_without_traffic_has_zero_counters_and_unknown_rates() -> None:
    stats = parse_management_queue(
        "q", {"messages_ready": 0, "messages_unacknowledged": 0, "consumers": 0}
    )

    assert (stats.published, stats.delivered) == (0, 0)
    assert (stats.publish_rate, stats.deliver_rate) == (None, None)


def test_a_new_quorum_queue_without_statistics_yet_is_unknown_not_zero() -> None:
    stats = parse_management_queue("q", {"name": "q", "type": "quorum"})

    assert (stats.ready, stats.unacked, stats.consumers) == (None, None, None)


def test_messages_in_dead_letter_hand_over_are_read_from_messages_dlx() -> None:
    # RabbitMQ 3.10, a quorum level whose dead-letter target refuses: 37 held, none ready.
    stuck = {"messages": 37, "messages_ready": 0, "messages_unacknowledged": 0, "messages_dlx": 37}

    assert parse_management_queue("q", stuck).dead_letter_pending == 37


def test_without_messages_dlx_the_hand_over_is_what_messages_holds_beyond_ready_and_unacked() -> (
    None
):
    payload = {"messages": 9, "messages_ready": 5, "messages_unacknowledged": 1}

    assert parse_management_queue("q", payload).dead_letter_pending == 3
    assert parse_management_queue("q", {"messages_ready": 5}).dead_letter_pending is None


def test_merge_keeps_amqp_counts_and_adds_the_management_numbers() -> None:
    amqp = QueueStats("jobs", exists=True, ready=6, consumers=2)
    management = parse_management_queue("jobs", {**QUEUE_JSON, "messages_dlx": 4})

    merged = merge(amqp, management)

    assert (merged.ready, merged.consumers, merged.unacked) == (6, 2, 2)
    assert merged.dead_letter_pending == 4
    assert (merged.published, merged.delivered, merged.publish_rate) == (40, 33, 1.5)
    assert merge(amqp, QueueStats("jobs", exists=False)) == amqp
    missing = QueueStats("jobs", exists=False)
    assert merge(missing, management) == missing


def test_status_looks_at_work_due_dead_letter_and_delay_queues_once() -> None:
    shared = amqtask.contract("jobs.again", Job, queue="jobs")

    queues = queues_of([JOB, shared, OTHER], NAMES)

    assert queues[:6] == ("jobs", "jobs.due", "jobs.dead", "other", "other.due", "other.dead")
    assert queues[6:] == tuple(f"ns.delay.{k}" for k in range(20))


def amqp_sample(taken_at: float, **ready: int) -> Sample:
    queues = {
        name: QueueStats(name, exists=True, ready=count, consumers=1)
        for name, count in ready.items()
    }
    return Sample(Source.AMQP, queues, taken_at=taken_at)


def test_report_over_amqp_counts_and_says_what_it_cannot_know() -> None:
    queues: dict[str, QueueStats] = {
        "jobs": QueueStats("jobs", exists=True, ready=3, consumers=1),
        "jobs.due": QueueStats("jobs.due", exists=True, ready=4, consumers=1),
        "jobs.dead": QueueStats("jobs.dead", exists=True, ready=2, consumers=0),
        "ns.delay.0": QueueStats("ns.delay.0", exists=True, ready=1, consumers=0),
        "ns.delay.4": QueueStats("ns.delay.4", exists=True, ready=2, consumers=0),
    }
    for k in range(1, 20):
        if k != 4:
            name = f"ns.delay.{k}"
            queues[name] = QueueStats(name, exists=k != 19, ready=0, consumers=0)

    data = report([OTHER, JOB], NAMES, Sample(Source.AMQP, queues))

    assert data["source"] == "amqp"
    other, job = data["tasks"]  # by task name
    assert job == {
        "task": "jobs.run",
        "version": 1,
        "queue": "jobs",
        "queue_type": "quorum",
        "exists": True,
        "ready": 3,
        "due_queue": "jobs.due",
        "due": 4,
        "unacked": None,
        "consumers": 1,
        "dead_letter_queue": "jobs.dead",
        "dead_letters": 2,
        # Over AMQP the dead-letter hand-over cannot be seen: unknown, never 0.
        "dead_letter_pending": None,
        "rates": {"in": None, "out": None, "net": None},
        # Leaders and members are not visible over AMQP either.
        "leader": None,
        "members": None,
        "members_online": None,
    }
    assert other["exists"] is False
    assert other["ready"] is None
    assert (other["due"], other["dead_letter_pending"]) == (None, None)
    assert data["delayed"] == {
        "messages": 3,
        "dead_letter_pending": None,
        "levels": 20,
        "missing_levels": ["ns.delay.19"],
    }
    assert data["notes"] == [UNKNOWN_OVER_AMQP]

    text = render(data)
    assert "status of namespace 'ns' via AMQP" in text
    assert text.splitlines()[1].split() == [
        "task",
        "queue",
        "ready",
        "due",
        "unacked",
        "consumers",
        "dead",
        "dl-pending",
        "in/s",
        "out/s",
        "net/s",
        "leader",
        "online",
    ]
    assert text.splitlines()[3].split() == [
        "jobs.run",
        "v1",
        "jobs",
        "3",
        "4",
        "?",
        "1",
        "2",
        "?",
        "-",
        "-",
        "-",
        "?",
        "?",
    ]
    assert text.splitlines()[2].split() == ["jobs.other", "v2", "other", "missing"]
    assert (
        "delayed: 3 message(s) in the delay levels of 'ns' (all tasks); 1 of 20 levels missing"
        in text
    )
    assert "dl-pending in the delay levels: ? " in text
    assert "missing queue(s): other: run amqtask declare" in text
    assert f"? {UNKNOWN_OVER_AMQP}" in text


def test_watch_rates_come_from_successive_samples() -> None:
    first = Sample(
        Source.MANAGEMENT,
        {
            "jobs": QueueStats(
                "jobs", True, ready=10, unacked=2, consumers=1, published=100, delivered=50
            )
        },
        taken_at=100.0,
    )
    second = Sample(
        Source.MANAGEMENT,
        {
            "jobs": QueueStats(
                "jobs", True, ready=4, unacked=2, consumers=1, published=120, delivered=76
            )
        },
        taken_at=102.0,
    )

    data = report([JOB], NAMES, second, first)

    assert data["tasks"][0]["rates"] == {"in": 10.0, "out": 13.0, "net": -3.0}
    assert data["interval"] == 2.0
    assert data["notes"] == []
    assert "via AMQP and the management API" in render(data)
    # Over AMQP alone only the backlog's net change is known.
    assert report([JOB], NAMES, amqp_sample(12.0, jobs=1), amqp_sample(10.0, jobs=5))["tasks"][0][
        "rates"
    ] == {"in": None, "out": None, "net": -2.0}


def test_a_single_management_sample_shows_the_brokers_own_rates() -> None:
    stats = parse_management_queue("jobs", QUEUE_JSON)

    assert rates(None, stats, None) == {"in": 1.5, "out": 1.25, "net": 0.25}


def test_the_management_api_shows_what_work_due_and_delay_queues_hold_in_hand_over() -> None:
    def stats(name: str, ready: int, pending: int) -> QueueStats:
        return QueueStats(
            name, True, ready=ready, unacked=0, consumers=0, dead_letter_pending=pending
        )

    queues = {
        "jobs": stats("jobs", 3, 1),
        "jobs.due": stats("jobs.due", 2, 2),
        "jobs.dead": stats("jobs.dead", 0, 0),
        **{f"ns.delay.{k}": stats(f"ns.delay.{k}", 0, 0) for k in range(20)},
    }
    queues["ns.delay.0"] = stats("ns.delay.0", 1, 37)

    data = report([JOB], NAMES, Sample(Source.MANAGEMENT, queues))

    assert data["tasks"][0]["due"] == 2
    assert data["tasks"][0]["dead_letter_pending"] == 3
    assert data["delayed"]["messages"] == 1
    assert data["delayed"]["dead_letter_pending"] == 37
    text = render(data)
    assert text.splitlines()[2].split()[3:10] == ["3", "2", "0", "0", "0", "3", "-"]
    assert "dl-pending in the delay levels: 37 " in text


# --- clusters: leaders, members, quorum ---------------------------------------------------------

N1, N2, N3 = "rabbit@n1", "rabbit@n2", "rabbit@n3"


def test_a_quorum_queues_leader_and_members_are_read_from_the_management_api() -> None:
    payload = {**QUEUE_JSON, "leader": N2, "members": [N1, N2, N3], "online": [N2, N3]}

    stats = parse_management_queue("jobs", payload)

    assert (stats.leader, stats.members, stats.online) == (N2, (N1, N2, N3), (N2, N3))
    assert stats.quorum_lost is False  # two of three: a majority
    merged = merge(QueueStats("jobs", exists=True, ready=5, consumers=1), stats)
    assert (merged.leader, merged.members, merged.online) == (N2, (N1, N2, N3), (N2, N3))


@pytest.mark.parametrize(
    ("leader", "online", "lost"),
    [
        (N1, (N1, N2, N3), False),
        (N1, (N1,), True),  # a leader that still believes it leads, alone
        (None, (N1, N2), True),  # no leader elected yet
        (None, None, None),  # not known (AMQP only)
    ],
)
def test_a_queue_without_a_leader_or_a_majority_online_has_lost_its_quorum(
    leader: str | None, online: tuple[str, ...] | None, lost: bool | None
) -> None:
    members = None if online is None else (N1, N2, N3)
    stats = QueueStats("jobs", exists=True, leader=leader, members=members, online=online)

    assert stats.quorum_lost is lost


def test_a_classic_queue_reports_its_node_and_no_members() -> None:
    stats = parse_management_queue("jobs", {**QUEUE_JSON, "type": "classic", "node": N1})

    assert (stats.leader, stats.members, stats.quorum_lost) == (N1, None, None)


def test_status_says_loudly_which_queues_lost_their_quorum() -> None:
    queues = {
        name: QueueStats(
            name, exists=True, ready=0, unacked=0, consumers=1, members=(N1, N2, N3), online=(N3,)
        )
        for name in ("jobs", "jobs.due", "ns.delay.3")
    }
    queues["jobs.dead"] = QueueStats(
        "jobs.dead", exists=True, ready=0, leader=N1, members=(N1, N2, N3), online=(N1, N2, N3)
    )

    data = report([JOB], NAMES, Sample(Source.MANAGEMENT, queues))

    assert [lost["queue"] for lost in data["no_quorum"]] == ["jobs", "jobs.due", "ns.delay.3"]
    [job] = data["tasks"]
    assert (job["leader"], job["members"], job["members_online"]) == (None, 3, 1)
    assert len(data["warnings"]) == 3
    text = render(data)
    lines = text.splitlines()
    assert lines[1].startswith("NO QUORUM: queue 'jobs' has 1 of its 3 members online")
    assert "its counts read 0" in lines[1]
    assert lines[5].split()[-2:] == ["none", "1/3"]  # the table's leader and online cells
    assert text.count("NO QUORUM") == 3  # once each, at the top
    # The delay levels share one line, however many lost their quorum.
    assert lines[3].startswith("NO QUORUM: 1 of the 20 delay levels (ns.delay.3) lost their")


def test_a_management_url_per_node_falls_back_to_the_next_that_answers(stub_url: str) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    management = Management.from_urls(
        f"{dead.replace('http://', 'http://admin:s3cret@')},{stub_url}", "amqp://h/"
    )

    assert management.fallbacks == (stub_url,)
    assert management.queue("/", "jobs").ready == 5
