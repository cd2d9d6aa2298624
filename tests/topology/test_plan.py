"""Unit tests of planning against observed broker state (`amqtask.topology._plan`)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import BaseModel

from amqtask import Conflict, TopologyConflict, TopologyError, contract
from amqtask.topology import (
    Binding,
    Exchange,
    Observation,
    Plan,
    Queue,
    State,
    Topology,
    derive,
    make_plan,
    parse_precondition,
)
from amqtask.topology._model import Entity, arguments
from amqtask.topology._plan import ObservationKey


class Payload(BaseModel):
    n: int


TASKS = Exchange("amqtask.tasks")
DEAD = Exchange("amqtask.dead")


def topology() -> Topology:
    return derive([contract("orders.place", Payload, queue_type="classic")])


def everything_exists(topology: Topology) -> dict[ObservationKey, Observation]:
    exchanges = {("exchange", exchange.name) for exchange in topology.exchanges}
    queues = {("queue", queue.name) for queue in topology.queues}
    return dict.fromkeys(exchanges | queues, Observation(exists=True))


def is_delay_level(entity: Entity) -> bool:
    """Whether `entity` is one of the fixed delay levels' (see tests/topology/test_model.py).

    A deliver binding names a contract's work queue, so it counts as the contract's.
    """
    if isinstance(entity, Binding):
        return re.fullmatch(r"amqtask\.delay\.\d+", entity.exchange) is not None
    return entity.name.startswith("amqtask.delay.")


def states(plan: Plan) -> dict[str, State]:
    """The state of each entity the contracts account for, by name (unique among them)."""
    steps = [step for step in plan.steps if not is_delay_level(step.entity)]
    assert len({step.entity.name for step in steps}) == len(steps)
    return {step.entity.name: step.state for step in steps}


def level_states(plan: Plan) -> dict[tuple[str, str], State]:
    """The state of each delay level entity, by kind and name: a level's queue and exchange
    share a name."""
    steps = [step for step in plan.steps if is_delay_level(step.entity)]
    return {(step.entity.kind, step.entity.name): step.state for step in steps}


def entity(data: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    """The one entity of `Plan.to_dict()` output with this kind and name."""
    found: list[dict[str, Any]] = [
        e for e in data["entities"] if (e["kind"], e["name"]) == (kind, name)
    ]
    assert len(found) == 1, found
    return found[0]


# A rendered line of a delay level entity: level or deliver exchange, level queue, or a binding
# out of a level exchange (a deliver binding is the contract's).
LEVEL_LINE = re.compile(
    r"[+=!~] (exchange|queue) +amqtask\.delay\.\S+ |[+=!~] binding +amqtask\.delay\.\d+ "
)


def level_pattern(level: int, bit: str) -> str:
    words = ["*"] * 20
    words[19 - level] = bit
    return ".".join(words) + ".#"


DELIVER_PLACE = "amqtask.delay.deliver -> orders.place.due [" + "*." * 20 + "orders.place]"
# Delayed messages used to be delivered to the work queue itself: `declare` removes that binding.
RETIRED_PLACE = "amqtask.delay.deliver -> orders.place [" + "*." * 20 + "orders.place]"


def length_conflict() -> Conflict:
    return Conflict(
        kind="queue", entity="orders.place", argument="x-max-length", expected=None, actual=10
    )


# --- make_plan ------------------------------------------------------------------------------


def test_with_nothing_observed_every_entity_and_binding_is_missing() -> None:
    plan = make_plan(topology(), {})

    assert {step.state for step in plan.steps} == {State.MISSING}
    assert plan.missing == topology().entities
    assert plan.to_apply == topology().entities
    assert plan.conflicts == ()
    assert not plan.up_to_date


def test_when_everything_exists_entities_are_up_to_date_and_bindings_unverified() -> None:
    desired = topology()

    plan = make_plan(desired, everything_exists(desired))

    assert states(plan) == {
        "amqtask.tasks": State.UP_TO_DATE,
        "amqtask.dead": State.UP_TO_DATE,
        "amqtask.control": State.UP_TO_DATE,
        "orders.place": State.UP_TO_DATE,
        "orders.place.due": State.UP_TO_DATE,
        "orders.place.dead": State.UP_TO_DATE,
        "amqtask.tasks -> orders.place [orders.place.v1]": State.UNVERIFIED,
        DELIVER_PLACE: State.UNVERIFIED,
        "amqtask.dead -> orders.place.dead [orders.place]": State.UNVERIFIED,
        RETIRED_PLACE: State.REMOVED,
    }
    assert level_states(plan) == {
        (e.kind, e.name): State.UNVERIFIED if isinstance(e, Binding) else State.UP_TO_DATE
        for e in desired.entities
        if is_delay_level(e)
    }
    assert len(level_states(plan)) == 21 + 20 + 40
    assert plan.up_to_date
    assert plan.missing == ()
    assert plan.to_apply == desired.bindings
    assert plan.to_remove == desired.retired


def test_steps_follow_exchanges_then_queues_then_bindings_then_retired_bindings() -> None:
    desired = topology()

    plan = make_plan(desired, everything_exists(desired))

    assert tuple(step.entity for step in plan.steps) == (*desired.entities, *desired.retired)


def test_an_observation_that_says_absent_counts_as_missing() -> None:
    desired = topology()
    observed = everything_exists(desired)
    observed[("queue", "orders.place.dead")] = Observation(exists=False)

    plan = make_plan(desired, observed)

    assert plan.missing == (
        desired.queue("orders.place.dead"),
        Binding("amqtask.dead", "orders.place.dead", "orders.place"),
    )


def test_an_observation_keyed_by_the_wrong_kind_does_not_count() -> None:
    desired = topology()
    observed = everything_exists(desired)
    del observed[("exchange", "amqtask.tasks")]
    observed[("queue", "amqtask.tasks")] = Observation(exists=True)

    plan = make_plan(desired, observed)

    assert states(plan)["amqtask.tasks"] is State.MISSING


def test_a_binding_is_missing_when_its_exchange_is_missing() -> None:
    desired = topology()
    observed = everything_exists(desired)
    del observed[("exchange", "amqtask.tasks")]

    plan = make_plan(desired, observed)

    assert states(plan)["amqtask.tasks -> orders.place [orders.place.v1]"] is State.MISSING
    assert states(plan)["amqtask.dead -> orders.place.dead [orders.place]"] is (State.UNVERIFIED)


def test_a_binding_is_missing_when_its_queue_is_missing() -> None:
    desired = topology()
    observed = everything_exists(desired)
    del observed[("queue", "orders.place")]

    plan = make_plan(desired, observed)

    assert states(plan)["amqtask.tasks -> orders.place [orders.place.v1]"] is State.MISSING
    assert plan.missing == (
        desired.queue("orders.place"),
        Binding("amqtask.tasks", "orders.place", "orders.place.v1"),
    )
    assert not plan.up_to_date
    # A binding to a queue that does not exist does not exist either: nothing to remove.
    assert RETIRED_PLACE not in states(plan)
    assert plan.to_remove == ()


def test_the_deliver_binding_is_missing_when_the_due_queue_is_missing() -> None:
    desired = topology()
    observed = everything_exists(desired)
    del observed[("queue", "orders.place.due")]

    plan = make_plan(desired, observed)

    assert plan.missing == (
        desired.queue("orders.place.due"),
        Binding("amqtask.delay.deliver", "orders.place.due", "*." * 20 + "orders.place"),
    )
    # The broker was declared before due queues: its old deliver binding goes.
    assert plan.to_remove == (
        Binding("amqtask.delay.deliver", "orders.place", "*." * 20 + "orders.place"),
    )


def test_nothing_is_removed_when_the_deliver_exchange_is_missing() -> None:
    desired = topology()
    observed = everything_exists(desired)
    del observed[("exchange", "amqtask.delay.deliver")]

    plan = make_plan(desired, observed)

    assert plan.to_remove == ()
    assert RETIRED_PLACE not in states(plan)


def test_with_nothing_observed_nothing_is_removed() -> None:
    plan = make_plan(topology(), {})

    assert plan.to_remove == ()
    assert State.REMOVED not in {step.state for step in plan.steps}


def test_a_conflicting_entity_is_reported_and_never_applied() -> None:
    desired = topology()
    observed = everything_exists(desired)
    conflict = length_conflict()
    observed[("queue", "orders.place")] = Observation(exists=True, conflicts=(conflict,))

    plan = make_plan(desired, observed)

    step = next(step for step in plan.steps if step.entity.name == "orders.place")
    assert step.state is State.CONFLICT
    assert step.conflicts == (conflict,)
    assert plan.conflicts == (conflict,)
    assert desired.queue("orders.place") not in plan.to_apply
    assert plan.missing == ()
    assert not plan.up_to_date


def test_a_dead_letter_queue_without_its_delivery_limit_is_up_to_date_with_a_policy_note() -> None:
    desired = derive([contract("orders.place", Payload)])  # quorum
    observed = everything_exists(desired)
    absent = Conflict("queue", "orders.place.dead", "x-delivery-limit", 2**31 - 1, None)
    other = Conflict("queue", "orders.place.dead", "x-delivery-limit", 2**31 - 1, 20)
    observed[("queue", "orders.place.dead")] = Observation(exists=True, conflicts=(absent,))

    plan = make_plan(desired, observed)

    step = next(step for step in plan.steps if step.entity.name == "orders.place.dead")
    assert (step.state, step.conflicts, step.by_policy) == (State.UP_TO_DATE, (), (absent,))
    assert plan.up_to_date
    assert desired.queue("orders.place.dead") not in plan.to_apply  # redeclaring would fail
    assert "set it with a policy" in plan.render()
    assert entity(plan.to_dict(), "queue", "orders.place.dead")["by_policy"] == [
        {"argument": "x-delivery-limit", "expected": 2**31 - 1, "actual": None}
    ]
    # Another limit than none was set by someone on purpose: a conflict, as before.
    observed[("queue", "orders.place.dead")] = Observation(exists=True, conflicts=(other,))
    assert make_plan(desired, observed).conflicts == (other,)


def test_a_binding_to_a_conflicting_queue_stays_unverified() -> None:
    desired = topology()
    observed = everything_exists(desired)
    observed[("queue", "orders.place")] = Observation(exists=True, conflicts=(length_conflict(),))

    plan = make_plan(desired, observed)

    assert states(plan)["amqtask.tasks -> orders.place [orders.place.v1]"] is (State.UNVERIFIED)


def test_a_missing_entity_ignores_a_conflict_attached_to_its_observation() -> None:
    desired = topology()
    observed = everything_exists(desired)
    observed[("queue", "orders.place")] = Observation(exists=False, conflicts=(length_conflict(),))

    plan = make_plan(desired, observed)

    assert states(plan)["orders.place"] is State.MISSING
    assert plan.conflicts == ()


def test_an_exchange_binding_is_missing_when_its_destination_exchange_is_missing() -> None:
    desired = topology()
    observed = everything_exists(desired)
    del observed[("exchange", "amqtask.delay.3")]

    plan = make_plan(desired, observed)

    assert level_states(plan) == {
        **level_states(make_plan(desired, everything_exists(desired))),
        ("exchange", "amqtask.delay.3"): State.MISSING,
        # Into the missing exchange from level 4, and both bindings out of it.
        ("binding", f"amqtask.delay.4 => exchange amqtask.delay.3 [{level_pattern(4, '0')}]"): (
            State.MISSING
        ),
        ("binding", f"amqtask.delay.3 -> amqtask.delay.3 [{level_pattern(3, '1')}]"): (
            State.MISSING
        ),
        ("binding", f"amqtask.delay.3 => exchange amqtask.delay.2 [{level_pattern(3, '0')}]"): (
            State.MISSING
        ),
    }


def test_a_missing_queue_does_not_make_a_binding_to_the_same_named_exchange_missing() -> None:
    desired = topology()
    observed = everything_exists(desired)
    del observed[("queue", "amqtask.delay.3")]

    plan = make_plan(desired, observed)

    assert plan.missing == (
        desired.queue("amqtask.delay.3"),
        Binding("amqtask.delay.3", "amqtask.delay.3", level_pattern(3, "1")),
    )


# --- Plan.to_dict ---------------------------------------------------------------------------


def test_to_dict_is_json_with_each_entity_its_state_and_a_summary() -> None:
    desired = topology()
    observed = everything_exists(desired)
    del observed[("queue", "orders.place.dead")]

    data = make_plan(desired, observed).to_dict()

    assert json.loads(json.dumps(data)) == data
    assert data["summary"] == {"missing": 2, "conflicts": 0, "removed": 1, "up_to_date": False}
    assert [e["name"] for e in data["entities"]] == [
        e.name for e in (*desired.entities, *desired.retired)
    ]
    assert data["entities"][0] == {
        "kind": "exchange",
        "name": "amqtask.tasks",
        "type": "direct",
        "durable": True,
        "arguments": {},
        "state": "up-to-date",
    }
    assert entity(data, "queue", "orders.place.dead") == {
        "kind": "queue",
        "name": "orders.place.dead",
        "type": "classic",
        "durable": True,
        "arguments": {"x-queue-type": "classic"},
        "state": "missing",
        "bindings": [{"exchange": "amqtask.dead", "routing_key": "orders.place"}],
    }
    assert entity(data, "binding", "amqtask.tasks -> orders.place [orders.place.v1]") == {
        "kind": "binding",
        "name": "amqtask.tasks -> orders.place [orders.place.v1]",
        "exchange": "amqtask.tasks",
        "destination_kind": "queue",
        "destination": "orders.place",
        "routing_key": "orders.place.v1",
        "state": "unverified",
    }
    # A queue's bindings are those it keeps: not the retired one about to be removed.
    assert entity(data, "queue", "orders.place")["bindings"] == [
        {"exchange": "amqtask.tasks", "routing_key": "orders.place.v1"},
    ]
    assert entity(data, "queue", "orders.place.due")["bindings"] == [
        {"exchange": "amqtask.delay.deliver", "routing_key": "*." * 20 + "orders.place"},
    ]
    assert entity(data, "binding", RETIRED_PLACE) == {
        "kind": "binding",
        "name": RETIRED_PLACE,
        "exchange": "amqtask.delay.deliver",
        "destination_kind": "queue",
        "destination": "orders.place",
        "routing_key": "*." * 20 + "orders.place",
        "state": "removed",
    }


def test_to_dict_lists_every_binding_of_a_shared_queue_on_that_queue() -> None:
    desired = derive(
        [
            contract("orders.place", Payload, queue="orders"),
            contract("orders.cancel", Payload, queue="orders"),
        ]
    )

    data = make_plan(desired, {}).to_dict()

    orders = next(entity for entity in data["entities"] if entity["name"] == "orders")
    assert orders["bindings"] == [
        {"exchange": "amqtask.tasks", "routing_key": "orders.place.v1"},
        {"exchange": "amqtask.tasks", "routing_key": "orders.cancel.v1"},
    ]
    assert orders["arguments"]["x-dead-letter-strategy"] == "at-least-once"


def test_to_dict_lists_only_queue_bindings_on_a_queue_not_those_to_a_same_named_exchange() -> None:
    data = make_plan(topology(), {}).to_dict()

    assert entity(data, "queue", "amqtask.delay.3")["bindings"] == [
        {"exchange": "amqtask.delay.3", "routing_key": level_pattern(3, "1")},
    ]
    into_level_3 = f"amqtask.delay.4 => exchange amqtask.delay.3 [{level_pattern(4, '0')}]"
    assert entity(data, "binding", into_level_3) == {
        "kind": "binding",
        "name": into_level_3,
        "exchange": "amqtask.delay.4",
        "destination_kind": "exchange",
        "destination": "amqtask.delay.3",
        "routing_key": level_pattern(4, "0"),
        "state": "missing",
    }
    assert "bindings" not in entity(data, "exchange", "amqtask.delay.3")


def test_to_dict_gives_a_conflicting_entity_its_conflict_details() -> None:
    desired = topology()
    observed = everything_exists(desired)
    observed[("queue", "orders.place")] = Observation(exists=True, conflicts=(length_conflict(),))

    data = make_plan(desired, observed).to_dict()

    orders = next(entity for entity in data["entities"] if entity["name"] == "orders.place")
    assert orders["state"] == "conflict"
    assert orders["conflicts"] == [{"argument": "x-max-length", "expected": None, "actual": 10}]
    assert data["summary"] == {"missing": 0, "conflicts": 1, "removed": 1, "up_to_date": False}
    assert json.loads(json.dumps(data)) == data


def test_to_dict_lists_every_conflict_of_an_entity() -> None:
    desired = topology()
    observed = everything_exists(desired)
    type_conflict = Conflict("queue", "orders.place", "x-queue-type", "classic", "quorum")
    observed[("queue", "orders.place")] = Observation(
        exists=True, conflicts=(length_conflict(), type_conflict)
    )

    data = make_plan(desired, observed).to_dict()

    orders = next(entity for entity in data["entities"] if entity["name"] == "orders.place")
    assert orders["conflicts"] == [
        {"argument": "x-max-length", "expected": None, "actual": 10},
        {"argument": "x-queue-type", "expected": "classic", "actual": "quorum"},
    ]


def test_to_dict_of_an_up_to_date_plan_says_so() -> None:
    desired = topology()

    data = make_plan(desired, everything_exists(desired)).to_dict()

    # Up to date though a retired binding is to be removed: AMQP cannot tell whether it is there.
    assert data["summary"] == {"missing": 0, "conflicts": 0, "removed": 1, "up_to_date": True}
    assert all("conflicts" not in entity for entity in data["entities"])
    assert all("bindings" not in e for e in data["entities"] if e["kind"] != "queue")


# --- Plan.render ----------------------------------------------------------------------------


def test_render_marks_each_state_and_ends_with_a_summary() -> None:
    desired = topology()
    observed = everything_exists(desired)
    del observed[("queue", "orders.place.dead")]
    observed[("queue", "orders.place")] = Observation(exists=True, conflicts=(length_conflict(),))

    rendered = make_plan(desired, observed).render().splitlines()
    lines = [line for line in rendered if not LEVEL_LINE.match(line)]
    level_lines = [line for line in rendered if LEVEL_LINE.match(line)]

    assert lines[0] == "= exchange amqtask.tasks (direct)  [up-to-date]"
    assert lines[1] == "= exchange amqtask.dead (direct)  [up-to-date]"
    assert lines[2] == "= exchange amqtask.control (fanout)  [up-to-date]"
    assert lines[3] == "! queue    orders.place (classic)  [conflict]"
    assert lines[4] == (
        "      queue 'orders.place': argument 'x-max-length' is 10 on the broker "
        "but the contracts want absent"
    )
    assert lines[5] == "= queue    orders.place.due (classic)  [up-to-date]"
    assert lines[6] == "+ queue    orders.place.dead (classic)  [missing]"
    assert lines[7] == "~ binding  amqtask.tasks -> orders.place [orders.place.v1]  [unverified]"
    assert lines[8] == f"~ binding  {DELIVER_PLACE}  [unverified]"
    assert lines[9] == "+ binding  amqtask.dead -> orders.place.dead [orders.place]  [missing]"
    assert lines[10] == f"- binding  {RETIRED_PLACE}  [removed]"
    # 24 exchanges, the due queue and 20 level queues up to date besides the conflict and the
    # missing queue.
    assert lines[11] == "2 to create, 1 conflicting, 45 up to date, 1 to remove"
    assert len(lines) == 12
    assert "= exchange amqtask.delay.deliver (topic)  [up-to-date]" in level_lines
    assert "= exchange amqtask.delay.7 (topic)  [up-to-date]" in level_lines
    assert "= queue    amqtask.delay.7 (quorum)  [up-to-date]" in level_lines
    assert (
        f"~ binding  amqtask.delay.7 => exchange amqtask.delay.6 [{level_pattern(7, '0')}]"
        "  [unverified]"
    ) in level_lines
    assert len(level_lines) == 21 + 20 + 40


def test_render_lists_every_conflict_of_an_entity_and_counts_the_entity_once() -> None:
    desired = topology()
    observed = everything_exists(desired)
    type_conflict = Conflict("queue", "orders.place", "x-queue-type", "classic", "quorum")
    observed[("queue", "orders.place")] = Observation(
        exists=True, conflicts=(length_conflict(), type_conflict)
    )

    plan = make_plan(desired, observed)
    lines = [line for line in plan.render().splitlines() if not LEVEL_LINE.match(line)]

    assert plan.conflicts == (length_conflict(), type_conflict)
    assert lines[3:6] == [
        "! queue    orders.place (classic)  [conflict]",
        "      queue 'orders.place': argument 'x-max-length' is 10 on the broker "
        "but the contracts want absent",
        "      queue 'orders.place': argument 'x-queue-type' is 'quorum' on the broker "
        "but the contracts want 'classic'",
    ]
    assert lines[-1] == "0 to create, 1 conflicting, 46 up to date, 1 to remove"


def test_render_of_an_empty_plan_is_only_the_summary() -> None:
    assert make_plan(Topology(), {}).render() == "0 to create, 0 conflicting, 0 up to date"


# --- parse_precondition ---------------------------------------------------------------------

# Texts captured from RabbitMQ 3.10 when redeclaring with other arguments.
RECEIVED_NONE = (
    "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'probe.q1' in vhost '/': "
    "received none but current is the value '10' of type 'byte'"
)
RECEIVED_OTHER = (
    "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'probe.q1' in vhost '/': "
    "received '20' but current is '10'"
)
CURRENT_NONE = (
    "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'probe.q1' in vhost '/': "
    "received the value '5' of type 'byte' but current is none"
)
EXCHANGE_TYPE = (
    "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'probe.x' in vhost '/': "
    "received 'topic' but current is 'direct'"
)
EXCHANGE_DURABLE = (
    "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'probe.x' in vhost '/': "
    "received 'false' but current is 'true'"
)


@pytest.mark.parametrize(
    ("text", "conflict"),
    [
        (RECEIVED_NONE, Conflict("queue", "probe.q1", "x-max-length", None, 10)),
        (RECEIVED_OTHER, Conflict("queue", "probe.q1", "x-max-length", 20, 10)),
        (CURRENT_NONE, Conflict("queue", "probe.q1", "x-message-ttl", 5, None)),
        (EXCHANGE_TYPE, Conflict("exchange", "probe.x", "type", "topic", "direct")),
        (EXCHANGE_DURABLE, Conflict("exchange", "probe.x", "durable", False, True)),
    ],
    ids=["received-none", "received-other", "current-none", "exchange-type", "exchange-durable"],
)
def test_rabbitmq_precondition_texts_parse_into_conflicts(text: str, conflict: Conflict) -> None:
    assert parse_precondition(text) == conflict


@pytest.mark.parametrize(
    "text",
    [
        "NOT_FOUND - no queue 'probe.q1' in vhost '/'",
        "PRECONDITION_FAILED - unknown delivery tag 42",
        "ACCESS_REFUSED - queue name 'amq.x' contains reserved prefix 'amq.*'",
        "",
    ],
)
def test_an_unrelated_broker_text_parses_to_none(text: str) -> None:
    assert parse_precondition(text) is None


def test_the_declared_queue_supplies_the_exact_expected_argument_value() -> None:
    declared = Queue("probe.q1", arguments=arguments({"x-max-length": 20}))

    assert parse_precondition(RECEIVED_OTHER, declared) == Conflict(
        "queue", "probe.q1", "x-max-length", 20, 10
    )


def test_the_declared_queue_keeps_a_string_value_the_broker_rendered_like_a_number() -> None:
    text = (
        "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue 'q' "
        "in vhost '/': received '2024' but current is 'orders'"
    )
    declared = Queue("q", arguments=arguments({"x-dead-letter-routing-key": "2024"}))

    conflict = parse_precondition(text, declared)

    assert conflict is not None
    assert conflict.expected == "2024"
    assert conflict.actual == "orders"


def test_an_argument_the_declaration_lacks_keeps_the_broker_value() -> None:
    assert parse_precondition(RECEIVED_NONE, Queue("probe.q1")) == Conflict(
        "queue", "probe.q1", "x-max-length", None, 10
    )


def test_the_declared_exchange_supplies_its_type_and_durability() -> None:
    declared = Exchange("probe.x", "topic", durable=False)

    assert parse_precondition(EXCHANGE_TYPE, declared) == Conflict(
        "exchange", "probe.x", "type", "topic", "direct"
    )
    assert parse_precondition(EXCHANGE_DURABLE, declared) == Conflict(
        "exchange", "probe.x", "durable", False, True
    )


# --- TopologyConflict -----------------------------------------------------------------------


def test_topology_conflict_message_names_entity_argument_and_both_values() -> None:
    conflict = Conflict("queue", "probe.q1", "x-max-length", 20, 10)

    error = TopologyConflict([conflict])

    message = str(error)
    assert "1 conflicting entity:" in message
    assert "queue 'probe.q1'" in message
    assert "argument 'x-max-length'" in message
    assert "is 10 on the broker but the contracts want 20" in message
    assert "amqtask declare" in message
    assert (error.kind, error.entity, error.argument) == ("queue", "probe.q1", "x-max-length")
    assert (error.expected, error.actual) == (20, 10)
    assert error.conflicts == (conflict,)
    assert isinstance(error, TopologyError)


def test_topology_conflict_message_lists_every_conflict_and_shows_absent_values() -> None:
    first = Conflict("queue", "probe.q1", "x-max-length", None, 10)
    second = Conflict("exchange", "probe.x", "type", "topic", "direct")

    message = str(TopologyConflict([first, second]))

    assert "2 conflicting entities:" in message
    assert (
        "  - queue 'probe.q1': argument 'x-max-length' is 10 on the broker but the contracts "
        "want absent"
    ) in message
    assert (
        "  - exchange 'probe.x': argument 'type' is 'direct' on the broker but the contracts "
        "want 'topic'"
    ) in message
