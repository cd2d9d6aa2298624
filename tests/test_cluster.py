"""Where a cluster put the app's quorum queues, as `declare` and `rebalance` report it
(`amqtask._cluster`). No broker needed: the management API's answers come in as values."""

from __future__ import annotations

from pydantic import BaseModel

import amqtask
from amqtask._cluster import balanced, placement_report, render_placement
from amqtask._status import QueueStats


class Job(BaseModel):
    n: int


N1, N2, N3 = "rabbit@n1", "rabbit@n2", "rabbit@n3"
APP = amqtask.App("amqp://localhost/", [amqtask.contract("jobs.run", Job, queue="jobs")])
QUORUM = [queue.name for queue in APP.topology.queues if queue.type == "quorum"]


def healthy(leaders: list[str]) -> dict[str, QueueStats]:
    return {
        name: QueueStats(
            name, exists=True, leader=leader, members=(N1, N2, N3), online=(N1, N2, N3)
        )
        for name, leader in zip(QUORUM, leaders, strict=True)
    }


def test_each_quorum_queue_is_listed_with_its_leader_and_members_and_leaders_are_counted() -> None:
    leaders = [(N1, N2, N3)[i % 3] for i in range(len(QUORUM))]

    report = placement_report(APP.topology, healthy(leaders), [N1, N2, N3])

    assert [row["queue"] for row in report["queues"]] == QUORUM
    assert report["queues"][0] == {
        "queue": "jobs",
        "leader": N1,
        "members": [N1, N2, N3],
        "online": [N1, N2, N3],
        "replicas": 3,
    }
    assert report["leaders"] == {N1: 8, N2: 8, N3: 7}
    assert report["warnings"] == []
    text = render_placement(report)
    assert "jobs  leader rabbit@n1  members online 3/3 (replicas wanted 3)" in text
    assert "leaders per node (these queues): rabbit@n1: 8, rabbit@n2: 8, rabbit@n3: 7" in text


def test_leaders_are_judged_on_all_the_clusters_quorum_queues_not_one_apps() -> None:
    # The balanced locator put this app's queues where the cluster had fewest leaders.
    stats = healthy([N3] * len(QUORUM))

    even = placement_report(APP.topology, stats, [N1, N2, N3], {N1: 30, N2: 31, N3: 30})
    uneven = placement_report(APP.topology, stats, [N1, N2, N3], {N1: 60, N2: 31, N3: 0})

    assert even["warnings"] == []
    assert even["all_leaders"] == {N1: 30, N2: 31, N3: 30}
    assert "leaders per node (all quorum queues): rabbit@n1: 30" in render_placement(even)
    assert len(uneven["warnings"]) == 1
    assert "spread unevenly" in uneven["warnings"][0]


def test_a_member_down_a_lost_quorum_and_missing_replicas_are_warned_about() -> None:
    stats = healthy([N1] * len(QUORUM))
    stats["jobs"] = QueueStats(
        "jobs", exists=True, leader=N1, members=(N1, N2, N3), online=(N1, N2)
    )
    stats["jobs.due"] = QueueStats(
        "jobs.due", exists=True, leader=None, members=(N1, N2, N3), online=(N1,)
    )
    stats["jobs.dead"] = QueueStats(
        "jobs.dead", exists=True, leader=N1, members=(N1,), online=(N1,)
    )

    warnings = placement_report(APP.topology, stats, [N1, N2, N3])["warnings"]

    assert warnings[0] == (
        "queue 'jobs' has 2 of its 3 members online (down: rabbit@n3); it serves on while a "
        "majority runs"
    )
    assert warnings[1].startswith("NO QUORUM: queue 'jobs.due' has 1 of its 3 members online")
    assert warnings[2].startswith("queue 'jobs.dead' has 1 replica(s), fewer than the 3 wanted")
    assert "rabbitmq-queues grow" in warnings[2]
    assert "spread unevenly" in warnings[3]  # and every leader is on n1


def test_a_single_node_broker_is_not_warned_about_replicas_it_cannot_have() -> None:
    stats = {
        name: QueueStats(name, exists=True, leader=N1, members=(N1,), online=(N1,))
        for name in QUORUM
    }

    assert placement_report(APP.topology, stats, [N1])["warnings"] == []


def test_leaders_are_balanced_when_no_node_carries_much_more_than_the_mean() -> None:
    assert balanced([8, 8, 7])
    assert balanced([1, 1, 0])
    assert balanced([])
    assert not balanced([12, 11, 0])  # a node came back and leads nothing
    assert not balanced([2, 0, 0])
