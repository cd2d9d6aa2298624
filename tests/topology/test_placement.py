"""Quorum queues in a cluster: replica count and leader locator from the app and the contracts,
and how `declare` treats a queue placed otherwise when it was created. No broker needed."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

import amqtask
from amqtask import Conflict, contract
from amqtask.topology import Observation, Placement, State, derive, make_plan
from amqtask.topology._model import CREATION_ONLY


class Payload(BaseModel):
    n: int


PLACED = Placement(replicas=3, leader_locator="balanced")  # type: ignore[arg-type]


def test_the_app_places_every_quorum_queue_with_three_replicas_and_a_balanced_leader() -> None:
    app = amqtask.App("amqp://localhost/", [contract("orders.place", Payload)])

    quorum = [queue for queue in app.topology.queues if queue.type == "quorum"]

    assert len(quorum) == 3 + 20  # work, due and dead-letter queues; the delay levels
    for queue in quorum:
        args = dict(queue.arguments)
        assert args["x-quorum-initial-group-size"] == 3, queue.name
        assert args["x-queue-leader-locator"] == "balanced", queue.name


def test_a_contract_places_its_own_queues_over_the_apps_default() -> None:
    app = amqtask.App(
        "amqp://localhost/",
        [contract("orders.place", Payload, replicas=5, leader_locator="client-local")],
        replicas=2,
    )

    work = dict(app.topology.queue("orders.place").arguments)
    level = dict(app.topology.queue("amqtask.delay.0").arguments)

    assert (work["x-quorum-initial-group-size"], work["x-queue-leader-locator"]) == (
        5,
        "client-local",
    )
    assert (level["x-quorum-initial-group-size"], level["x-queue-leader-locator"]) == (
        2,
        "balanced",
    )


def test_an_app_without_placement_leaves_it_to_the_broker() -> None:
    app = amqtask.App(
        "amqp://localhost/", [contract("orders.place", Payload)], replicas=None, leader_locator=None
    )

    for queue in app.topology.queues:
        assert not CREATION_ONLY & dict(queue.arguments).keys()


def test_a_classic_queue_is_never_placed() -> None:
    topology = derive([contract("orders.place", Payload, queue_type="classic")], placement=PLACED)

    for name in ("orders.place", "orders.place.due", "orders.place.dead"):
        assert not CREATION_ONLY & dict(topology.queue(name).arguments).keys()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 0}, "replicas must be at least 1"),
        ({"replicas": True}, "replicas must be at least 1"),
        ({"leader_locator": "nearest"}, "'nearest' is not a valid LeaderLocator"),
        ({"queue_type": "classic", "replicas": 3}, "a classic queue lives on one node"),
    ],
)
def test_invalid_placement_is_a_contract_error(options: dict[str, object], message: str) -> None:
    with pytest.raises(amqtask.ContractError, match=message):
        contract("orders.place", Payload, **options)  # type: ignore[arg-type]


def test_an_app_with_an_invalid_default_placement_is_refused() -> None:
    with pytest.raises(amqtask.ContractError, match="replicas must be at least 1"):
        amqtask.App("amqp://localhost/", [], replicas=0)


def _queue_declared_before_placement(extra: tuple[Conflict, ...] = ()) -> State:
    topology = derive([contract("orders.place", Payload)], placement=PLACED)
    placement = (
        Conflict("queue", "orders.place", "x-quorum-initial-group-size", 3, None),
        Conflict("queue", "orders.place", "x-queue-leader-locator", "balanced", None),
    )
    observed = {
        (entity.kind, entity.name): Observation(exists=True)
        for entity in (*topology.exchanges, *topology.queues)
    }
    observed[("queue", "orders.place")] = Observation(exists=True, conflicts=(*placement, *extra))
    plan = make_plan(topology, observed)
    [step] = [s for s in plan.steps if s.entity.name == "orders.place"]
    assert step.placed_otherwise == placement
    return step.state


def test_a_queue_created_without_placement_is_up_to_date_with_a_note_not_a_conflict() -> None:
    topology = derive([contract("orders.place", Payload)], placement=PLACED)
    difference = Conflict("queue", "orders.place", "x-queue-leader-locator", "balanced", None)
    observed = {("queue", "orders.place"): Observation(exists=True, conflicts=(difference,))}

    plan = make_plan(topology, observed)

    [step] = [s for s in plan.steps if s.entity.name == "orders.place"]
    assert step.state is State.UP_TO_DATE
    assert plan.conflicts == ()
    assert step.entity not in plan.to_apply  # never redeclared: RabbitMQ would refuse (406)
    assert step.to_dict()["placed_otherwise"] == [
        {"argument": "x-queue-leader-locator", "expected": "balanced", "actual": None}
    ]
    assert (
        "note: queue 'orders.place': argument 'x-queue-leader-locator' is absent on the broker "
        "but the contracts want 'balanced'; it only placed the queue when it was created: left "
        "as is"
    ) in plan.render()


def test_placement_notes_do_not_hide_a_real_conflict() -> None:
    real = Conflict("queue", "orders.place", "x-max-length", 10, 20)

    assert _queue_declared_before_placement((real,)) is State.CONFLICT
    assert _queue_declared_before_placement() is State.UP_TO_DATE
