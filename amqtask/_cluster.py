"""Quorum queues in a cluster: which node leads each one and which hold its replicas, for
`amqtask declare` and `amqtask rebalance`.

AMQP shows none of this. The management API does (`GET /api/queues/{vhost}/{name}`: `leader`,
`members`, `online`; `GET /api/nodes`), from any node of the cluster. A queue's replicas are
placed when it is created (`x-quorum-initial-group-size`, `x-queue-leader-locator`); later the
operator moves them: `rabbitmq-queues grow NODE all` adds replicas on a node that joined, and a
rebalance (`amqtask rebalance`, or `rabbitmq-queues rebalance quorum`) spreads the leaders again
after a node came back, since the queues it led elected leaders elsewhere meanwhile.

The report is pure; reading it and asking for a rebalance are the only I/O.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from amqtask import topology as topo
from amqtask._status import Management, QueueStats

# RabbitMQ's replica count for a quorum queue declared without `x-quorum-initial-group-size`
# (its `quorum_cluster_size` setting, 3 unless configured).
BROKER_DEFAULT_REPLICAS = 3

NO_MANAGEMENT = (
    "leaders and members of quorum queues are not visible over AMQP: pass --management-url "
    "to see them"
)


def quorum_queues(topology: topo.Topology) -> list[topo.Queue]:
    return [queue for queue in topology.queues if queue.type == "quorum"]


def _wanted_replicas(queue: topo.Queue) -> int:
    value = dict(queue.arguments).get("x-quorum-initial-group-size")
    return (
        value if isinstance(value, int) and not isinstance(value, bool) else BROKER_DEFAULT_REPLICAS
    )


def placement_report(
    topology: topo.Topology,
    stats: Mapping[str, QueueStats],
    nodes: Sequence[str],
    all_leaders: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Per quorum queue of `topology` that exists: leader, members, members online and the
    replicas wanted; leaders per running node (`nodes`), of these queues and of all the
    cluster's quorum queues (`all_leaders`, when known); and warnings for a queue with a member
    down, fewer replicas than wanted (where the cluster has the nodes for them), no quorum, or
    leaders spread unevenly over the nodes (judged on all the cluster's quorum queues: the
    balanced locator and a rebalance even those out, not one app's)."""
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    leaders: Counter[str] = Counter({node: 0 for node in nodes})
    for queue in quorum_queues(topology):
        seen = stats.get(queue.name)
        if seen is None or not seen.exists or seen.members is None:
            continue
        members = seen.members
        online = tuple(node for node in seen.online or () if node in members)
        wanted = _wanted_replicas(queue)
        rows.append(
            {
                "queue": queue.name,
                "leader": seen.leader,
                "members": list(members),
                "online": list(online),
                "replicas": wanted,
            }
        )
        if seen.leader is not None:
            leaders[seen.leader] += 1
        if seen.quorum_lost:
            warnings.append(
                f"NO QUORUM: queue {queue.name!r} has {len(online)} of its {len(members)} members "
                "online: it takes and delivers nothing until a majority of them is back"
            )
        elif len(online) < len(members):
            down = ", ".join(sorted(set(members) - set(online)))
            warnings.append(
                f"queue {queue.name!r} has {len(online)} of its {len(members)} members online "
                f"(down: {down}); it serves on while a majority runs"
            )
        possible = min(wanted, len(nodes)) if nodes else wanted
        if len(members) < possible:
            warnings.append(
                f"queue {queue.name!r} has {len(members)} replica(s), fewer than the {possible} "
                "wanted (it was created while fewer nodes ran): add them with "
                "`rabbitmq-queues grow NODE all` on each node that lacks one"
            )
    overall = Counter({node: 0 for node in nodes})
    overall.update(all_leaders if all_leaders is not None else leaders)
    if rows and not balanced([overall[node] for node in nodes]):
        warnings.append(
            "leaders are spread unevenly over the nodes (a node came back, or queues were "
            "declared without a balanced leader locator): run `amqtask rebalance APP` or "
            "`rabbitmq-queues rebalance quorum`"
        )
    return {
        "queues": rows,
        "leaders": dict(leaders),
        "all_leaders": dict(overall),
        "nodes": list(nodes),
        "warnings": warnings,
    }


def balanced(counts: Sequence[int]) -> bool:
    """Whether leader counts per node are spread evenly enough: the gap between the busiest and
    the idlest node is at most the mean (or 1). A rebalance spreads all the cluster's queues,
    not one app's, so an app's own leaders are rarely exactly even."""
    if len(counts) < 2 or not sum(counts):
        return True
    return max(counts) - min(counts) <= max(1, sum(counts) // len(counts))


def render_placement(report: Mapping[str, Any]) -> str:
    """The placement report as text: a line per quorum queue, leaders per node, warnings."""
    lines = [f"quorum queues on {len(report['nodes'])} running node(s):"]
    for row in report["queues"]:
        lines.append(
            f"  {row['queue']}  leader {row['leader'] or 'NONE'}  "
            f"members online {len(row['online'])}/{len(row['members'])} "
            f"(replicas wanted {row['replicas']})"
        )
    for label, key in (("these queues", "leaders"), ("all quorum queues", "all_leaders")):
        spread = ", ".join(f"{node}: {count}" for node, count in sorted(report[key].items()))
        lines.append(f"leaders per node ({label}): {spread or 'none'}")
    lines.extend(f"warning: {warning}" for warning in report["warnings"])
    return "\n".join(lines)


def all_leaders(management: Management) -> Counter[str]:
    """How many quorum queues (of every vhost) each node leads. Raises `ManagementUnavailable`."""
    answer = management.get("/queues?columns=type,leader") or []
    return Counter(
        queue["leader"]
        for queue in answer
        if isinstance(queue, Mapping)
        and queue.get("type") == "quorum"
        and isinstance(queue.get("leader"), str)
    )


def nodes(management: Management) -> list[dict[str, Any]]:
    """Every node of the cluster, by name, and whether it runs. Raises `ManagementUnavailable`."""
    answer = management.get("/nodes?columns=name,running") or []
    return sorted(
        (
            {"name": node["name"], "running": node.get("running") is True}
            for node in answer
            if isinstance(node, Mapping) and isinstance(node.get("name"), str)
        ),
        key=lambda node: str(node["name"]),
    )


def running_nodes(management: Management) -> list[str]:
    """The names of the cluster's running nodes. Raises `ManagementUnavailable`."""
    answer = management.get("/nodes") or []
    return sorted(
        node["name"]
        for node in answer
        if isinstance(node, Mapping) and isinstance(node.get("name"), str) and node.get("running")
    )


async def read_placement(
    management: Management, vhost: str, topology: topo.Topology
) -> dict[str, Any]:
    """The placement report of `topology`'s quorum queues, read from the management API.
    Raises `ManagementUnavailable`."""

    def read() -> dict[str, Any]:
        names = [queue.name for queue in quorum_queues(topology)]
        return placement_report(
            topology,
            management.queues(vhost, names),
            running_nodes(management),
            all_leaders(management),
        )

    return await asyncio.to_thread(read)


async def rebalance(
    management: Management,
    vhost: str,
    topology: topo.Topology,
    *,
    settle: float = 15.0,
    interval: float = 1.0,
) -> dict[str, Any]:
    """Ask the cluster to spread queue leaders evenly (`POST /api/rebalance/queues`: every
    queue of every vhost, as `rabbitmq-queues rebalance all` does), wait up to `settle` seconds
    for the leaders to spread, and return `topology`'s placement report.

    RabbitMQ moves the leaders in the background, a few seconds for dozens of queues.
    Raises `ManagementUnavailable`.
    """
    await asyncio.to_thread(management.post, "/rebalance/queues")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle
    while True:
        await asyncio.sleep(interval)
        report = await read_placement(management, vhost, topology)
        if balanced(list(report["all_leaders"].values())) or loop.time() > deadline:
            return report
