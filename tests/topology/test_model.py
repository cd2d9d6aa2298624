"""Unit tests of the desired topology derived from contracts (`amqtask.topology._model`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import TypeVar

import pytest
from pydantic import BaseModel

from amqtask import ContractError, contract
from amqtask.routing import Names, due_queue_name
from amqtask.topology import Binding, Exchange, Queue, Topology, derive
from amqtask.topology._model import Entity, arguments, dead_letter_queue, due_queue, work_queue

E = TypeVar("E", bound=Entity)


class Payload(BaseModel):
    n: int


def is_delay_level(entity: Entity, namespace: str = "amqtask") -> bool:
    """Whether `entity` is part of the fixed delay levels, the same whatever the contracts.

    That is the level exchanges and queues, the deliver exchange and the bindings out of a level
    exchange. A deliver binding names a work queue, so it belongs to its contract.
    """
    prefix = f"{namespace}.delay."
    if isinstance(entity, Binding):
        return entity.exchange.startswith(prefix) and entity.exchange != f"{prefix}deliver"
    return entity.name.startswith(prefix)


def of_contracts(entities: Iterable[E], namespace: str = "amqtask") -> tuple[E, ...]:
    """The entities the contracts account for: all but the fixed delay levels."""
    return tuple(entity for entity in entities if not is_delay_level(entity, namespace))


def deliver_binding(queue: str, namespace: str = "amqtask") -> Binding:
    """The binding that hands a delayed message for work queue `queue` to its due queue: 20
    delay bits, then the work queue's name."""
    return Binding(f"{namespace}.delay.deliver", f"{queue}.due", "*." * 20 + queue)


def test_derive_declares_the_task_and_dead_letter_exchanges_as_durable_direct() -> None:
    topology = derive([contract("orders.place", Payload)])

    assert of_contracts(topology.exchanges) == (
        Exchange("amqtask.tasks", "direct", durable=True),
        Exchange("amqtask.dead", "direct", durable=True),
        Exchange("amqtask.control", "fanout", durable=True),
    )
    assert all(exchange.arguments == () for exchange in topology.exchanges)
    assert all(exchange.durable for exchange in topology.exchanges)


def test_derive_without_contracts_still_declares_the_exchanges() -> None:
    topology = derive([])

    assert [exchange.name for exchange in of_contracts(topology.exchanges)] == [
        "amqtask.tasks",
        "amqtask.dead",
        "amqtask.control",
    ]
    assert of_contracts(topology.queues) == ()
    assert of_contracts(topology.bindings) == ()


def test_each_contract_gets_a_work_queue_a_due_queue_and_a_dead_letter_queue() -> None:
    topology = derive([contract("orders.place", Payload), contract("mail.send", Payload)])

    assert [queue.name for queue in of_contracts(topology.queues)] == [
        "orders.place",
        "orders.place.due",
        "orders.place.dead",
        "mail.send",
        "mail.send.due",
        "mail.send.dead",
    ]
    assert all(queue.durable for queue in topology.queues)


def test_a_quorum_work_queue_dead_letters_at_least_once_with_reject_publish() -> None:
    queue = derive([contract("orders.place", Payload)]).queue("orders.place")

    assert dict(queue.arguments) == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "amqtask.dead",
        "x-dead-letter-routing-key": "orders.place",
        "x-dead-letter-strategy": "at-least-once",
        "x-delivery-limit": 10,
        "x-overflow": "reject-publish",
    }
    assert queue.type == "quorum"


def test_max_length_adds_x_max_length_to_the_work_queue() -> None:
    queue = derive([contract("orders.place", Payload, max_length=100)]).queue("orders.place")

    assert dict(queue.arguments) == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "amqtask.dead",
        "x-dead-letter-routing-key": "orders.place",
        "x-dead-letter-strategy": "at-least-once",
        "x-delivery-limit": 10,
        "x-max-length": 100,
        "x-overflow": "reject-publish",
    }


def test_a_quorum_queue_with_drop_head_overflow_has_no_at_least_once_strategy() -> None:
    drop = contract("orders.place", Payload, max_length=100, overflow="drop-head")

    queue = derive([drop]).queue("orders.place")

    assert dict(queue.arguments) == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "amqtask.dead",
        "x-dead-letter-routing-key": "orders.place",
        "x-delivery-limit": 10,
        "x-max-length": 100,
        "x-overflow": "drop-head",
    }


def test_a_classic_work_queue_has_neither_strategy_nor_overflow_without_a_limit() -> None:
    classic = contract("orders.place", Payload, queue_type="classic")

    queue = derive([classic]).queue("orders.place")

    assert dict(queue.arguments) == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "amqtask.dead",
        "x-dead-letter-routing-key": "orders.place",
    }
    assert queue.type == "classic"


def test_a_classic_work_queue_with_max_length_gets_the_limit_and_overflow() -> None:
    classic = contract("orders.place", Payload, queue_type="classic", max_length=5)

    queue = derive([classic]).queue("orders.place")

    assert dict(queue.arguments) == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "amqtask.dead",
        "x-dead-letter-routing-key": "orders.place",
        "x-max-length": 5,
        "x-overflow": "reject-publish",
    }


@pytest.mark.parametrize(
    ("queue_type", "limit"), [("quorum", (("x-delivery-limit", 2**31 - 1),)), ("classic", ())]
)
def test_the_dead_letter_queue_has_the_work_queues_type_and_no_delivery_limit_in_effect(
    queue_type: str, limit: tuple[tuple[str, int], ...]
) -> None:
    typed = contract("orders.place", Payload, queue_type=queue_type, max_length=3)

    queue = derive([typed]).queue("orders.place.dead")

    # Reading a letter hands it back, a delivery on a quorum queue: RabbitMQ 4.x's default limit
    # of 20 would drop it after 20 reads. -1 would drop it at the first on 3.10.
    assert queue == Queue(
        "orders.place.dead", durable=True, arguments=(*limit, ("x-queue-type", queue_type))
    )
    assert queue == dead_letter_queue(typed)


def test_the_dead_letter_routing_key_is_the_work_queue_name_not_the_task_name() -> None:
    versioned = contract("orders.place", Payload, version=2)

    topology = derive([versioned])

    assert dict(topology.queue("orders.place.v2").arguments)["x-dead-letter-routing-key"] == (
        "orders.place.v2"
    )
    assert of_contracts(topology.bindings) == (
        Binding("amqtask.tasks", "orders.place.v2", "orders.place.v2"),
        deliver_binding("orders.place.v2"),
        Binding("amqtask.dead", "orders.place.v2.dead", "orders.place.v2"),
    )


def test_bindings_route_tasks_by_routing_key_and_dead_letters_by_queue_name() -> None:
    placed = contract("orders.place", Payload, queue="orders")

    topology = derive([placed])

    assert of_contracts(topology.bindings) == (
        Binding("amqtask.tasks", "orders", "orders.place.v1"),
        deliver_binding("orders"),
        Binding("amqtask.dead", "orders.dead", "orders"),
    )
    assert topology.bindings_of("orders") == (
        Binding("amqtask.tasks", "orders", "orders.place.v1"),
    )
    assert topology.bindings_of("orders.due") == (deliver_binding("orders"),)
    assert topology.bindings_of("orders.dead") == (
        Binding("amqtask.dead", "orders.dead", "orders"),
    )


def test_a_namespace_renames_the_exchanges_and_the_dead_letter_exchange_argument() -> None:
    names = Names("tenant-a")

    topology = derive([contract("orders.place", Payload)], names)

    assert [exchange.name for exchange in of_contracts(topology.exchanges, "tenant-a")] == [
        "tenant-a.tasks",
        "tenant-a.dead",
        "tenant-a.control",
    ]
    assert dict(topology.queue("orders.place").arguments)["x-dead-letter-exchange"] == (
        "tenant-a.dead"
    )
    assert {binding.exchange for binding in of_contracts(topology.bindings, "tenant-a")} == {
        "tenant-a.tasks",
        "tenant-a.delay.deliver",
        "tenant-a.dead",
    }
    assert all(exchange.name.startswith("tenant-a.") for exchange in topology.exchanges)
    assert all(binding.exchange.startswith("tenant-a.") for binding in topology.bindings)
    assert topology.names == names


def test_the_default_namespace_is_amqtask() -> None:
    assert derive([]).names == Names("amqtask")


def test_contracts_sharing_a_queue_with_the_same_settings_share_one_queue() -> None:
    place = contract("orders.place", Payload, queue="orders", max_length=10)
    cancel = contract("orders.cancel", Payload, queue="orders", max_length=10)

    topology = derive([place, cancel])

    assert [queue.name for queue in of_contracts(topology.queues)] == [
        "orders",
        "orders.due",
        "orders.dead",
    ]
    assert of_contracts(topology.bindings) == (
        Binding("amqtask.tasks", "orders", "orders.place.v1"),
        deliver_binding("orders"),
        Binding("amqtask.dead", "orders.dead", "orders"),
        Binding("amqtask.tasks", "orders", "orders.cancel.v1"),
    )


def test_the_same_contract_twice_derives_each_entity_once() -> None:
    place = contract("orders.place", Payload)

    assert derive([place, place]) == derive([place])


def test_contracts_sharing_a_queue_with_different_settings_are_a_contract_error() -> None:
    place = contract("orders.place", Payload, queue="orders", max_length=10)
    cancel = contract("orders.cancel", Payload, queue="orders", max_length=20)

    with pytest.raises(ContractError, match=r"'orders'.*'orders\.place'.*'orders\.cancel'"):
        derive([place, cancel])


def test_contracts_sharing_a_queue_with_different_queue_types_are_a_contract_error() -> None:
    place = contract("orders.place", Payload, queue="orders")
    cancel = contract("orders.cancel", Payload, queue="orders", queue_type="classic")

    with pytest.raises(ContractError, match="different settings"):
        derive([place, cancel])


def test_a_work_queue_named_like_another_contracts_dead_letter_queue_is_a_contract_error() -> None:
    place = contract("orders.place", Payload, queue="orders")
    clash = contract("orders.clash", Payload, queue="orders.dead")

    with pytest.raises(ContractError, match=r"'orders\.dead'"):
        derive([place, clash])


def test_entities_lists_exchanges_then_queues_then_bindings() -> None:
    topology = derive([contract("orders.place", Payload)])

    assert topology.entities == (*topology.exchanges, *topology.queues, *topology.bindings)
    # tasks, dead, deliver, control and 20 level exchanges; 3 contract and 20 level queues;
    # task, deliver and dead-letter bindings, then a queue and an exchange binding per level.
    assert [entity.kind for entity in topology.entities] == (
        ["exchange"] * 24 + ["queue"] * 23 + ["binding"] * 43
    )


def test_looking_up_an_unknown_queue_raises_key_error() -> None:
    with pytest.raises(KeyError):
        derive([]).queue("nope")


def test_entities_and_topology_are_frozen_and_hashable() -> None:
    topology = derive([contract("orders.place", Payload, max_length=4)])

    for entity in topology.entities:
        assert hash(entity) == hash(dataclasses.replace(entity))
        first_field = dataclasses.fields(entity)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(entity, first_field, "other")
    assert hash(topology) == hash(derive([contract("orders.place", Payload, max_length=4)]))
    assert len(set(topology.entities)) == len(topology.entities)


def test_arguments_are_frozen_as_a_sorted_tuple_whatever_the_insertion_order() -> None:
    assert arguments({"b": 1, "a": "x"}) == (("a", "x"), ("b", 1))
    assert arguments({"a": "x", "b": 1}) == arguments({"b": 1, "a": "x"})


def test_a_queue_without_a_type_argument_is_classic() -> None:
    assert Queue("plain").type == "classic"


def test_work_queue_is_what_derive_declares() -> None:
    place = contract("orders.place", Payload)

    assert work_queue(place, Names()) == derive([place]).queue("orders.place")


def test_to_dict_describes_each_entity_as_plain_data() -> None:
    topology = derive([contract("orders.place", Payload, queue_type="classic")])

    assert topology.exchanges[0].to_dict() == {
        "kind": "exchange",
        "name": "amqtask.tasks",
        "type": "direct",
        "durable": True,
        "arguments": {},
    }
    assert topology.queue("orders.place.dead").to_dict() == {
        "kind": "queue",
        "name": "orders.place.dead",
        "type": "classic",
        "durable": True,
        "arguments": {"x-queue-type": "classic"},
    }
    assert topology.bindings[0].to_dict() == {
        "kind": "binding",
        "name": "amqtask.tasks -> orders.place [orders.place.v1]",
        "exchange": "amqtask.tasks",
        "destination_kind": "queue",
        "destination": "orders.place",
        "routing_key": "orders.place.v1",
    }


def test_to_dict_of_an_exchange_to_exchange_binding_names_an_exchange_destination() -> None:
    binding = Binding("amqtask.delay.1", "amqtask.delay.0", "*.#", to_exchange=True)

    assert binding.to_dict() == {
        "kind": "binding",
        "name": "amqtask.delay.1 => exchange amqtask.delay.0 [*.#]",
        "exchange": "amqtask.delay.1",
        "destination_kind": "exchange",
        "destination": "amqtask.delay.0",
        "routing_key": "*.#",
    }
    assert Binding("amqtask.delay.1", "amqtask.delay.1", "*.#").destination_kind == "queue"


def test_an_empty_topology_has_no_entities() -> None:
    assert Topology().entities == ()


# --- delay levels -----------------------------------------------------------------------------


def level_pattern(level: int, bit: str) -> str:
    """20 delay bits, most significant first, with `bit` at `level`; then any queue name."""
    words = ["*"] * 20
    words[19 - level] = bit
    return ".".join(words) + ".#"


def expected_delay_levels(namespace: str) -> tuple[list[Exchange], list[Queue], list[Binding]]:
    """The delay levels written out by hand: what `derive` must add whatever the contracts."""
    deliver = f"{namespace}.delay.deliver"
    exchanges = [Exchange(deliver, "topic")]
    queues, bindings = [], []
    for level in range(20):
        name = f"{namespace}.delay.{level}"
        after = f"{namespace}.delay.{level - 1}" if level > 0 else deliver
        exchanges.append(Exchange(name, "topic", durable=True))
        queues.append(
            Queue(
                name,
                durable=True,
                arguments=arguments(
                    {
                        "x-queue-type": "quorum",
                        "x-message-ttl": 1000 * 2**level,
                        "x-dead-letter-exchange": after,
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                    }
                ),
            )
        )
        bindings.append(Binding(name, name, level_pattern(level, "1")))
        bindings.append(Binding(name, after, level_pattern(level, "0"), to_exchange=True))
    return exchanges, queues, bindings


@pytest.mark.parametrize("namespace", ["amqtask", "tenant-a"])
def test_derive_adds_twenty_delay_levels_and_a_deliver_exchange(namespace: str) -> None:
    topology = derive([contract("orders.place", Payload)], Names(namespace))
    exchanges, queues, bindings = expected_delay_levels(namespace)

    levels = [entity for entity in topology.entities if is_delay_level(entity, namespace)]

    # Counters: exact, duplicates included, whatever order the levels are declared in.
    assert Counter(e for e in levels if isinstance(e, Exchange)) == Counter(exchanges)
    assert Counter(e for e in levels if isinstance(e, Queue)) == Counter(queues)
    assert Counter(e for e in levels if isinstance(e, Binding)) == Counter(bindings)
    assert len(levels) == 21 + 20 + 40


def test_the_delay_levels_are_the_same_whatever_the_contracts() -> None:
    some = derive([contract("orders.place", Payload), contract("mail.send", Payload)])

    levels = [entity for entity in some.entities if is_delay_level(entity)]

    assert levels == [entity for entity in derive([]).entities if is_delay_level(entity)]


def test_without_contracts_only_the_delay_levels_have_queues_and_bindings() -> None:
    topology = derive([])
    exchanges, queues, bindings = expected_delay_levels("amqtask")

    assert Counter(topology.queues) == Counter(queues)
    assert Counter(topology.bindings) == Counter(bindings)
    assert Counter(topology.exchanges) == Counter(
        [
            Exchange("amqtask.tasks"),
            Exchange("amqtask.dead"),
            Exchange("amqtask.control", "fanout"),
            *exchanges,
        ]
    )


def test_a_level_queue_keeps_the_routing_key_when_it_dead_letters() -> None:
    # The delay bits in the key pick the next levels' routes, so it must survive expiry.
    for queue in derive([]).queues:
        assert "x-dead-letter-routing-key" not in dict(queue.arguments)


def test_each_work_queue_gets_one_deliver_binding_to_its_due_queue_matching_its_name() -> None:
    topology = derive(
        [
            contract("orders.place", Payload, queue="orders"),
            contract("orders.cancel", Payload, queue="orders"),
            contract("mail.send", Payload, version=2),
        ]
    )

    delivered = [b for b in topology.bindings if b.exchange == "amqtask.delay.deliver"]

    assert delivered == [
        Binding("amqtask.delay.deliver", "orders.due", "*." * 20 + "orders"),
        Binding("amqtask.delay.deliver", "mail.send.v2.due", "*." * 20 + "mail.send.v2"),
    ]


# --- delivery limit ---------------------------------------------------------------------------


def test_a_quorum_work_queue_gets_the_default_delivery_limit_of_ten() -> None:
    queue = derive([contract("orders.place", Payload)]).queue("orders.place")

    assert dict(queue.arguments)["x-delivery-limit"] == 10


@pytest.mark.parametrize("limit", [1, 3, 50])
def test_the_delivery_limit_of_a_quorum_work_queue_comes_from_the_contract(limit: int) -> None:
    limited = contract("orders.place", Payload, delivery_limit=limit)

    topology = derive([limited])

    assert dict(topology.queue("orders.place").arguments)["x-delivery-limit"] == limit
    # Only the work queue: its dead-letter queue is read by people, not redelivered to workers.
    assert dict(topology.queue("orders.place.dead").arguments)["x-delivery-limit"] == 2**31 - 1


@pytest.mark.parametrize("limit", [10, 3])
def test_a_classic_work_queue_has_no_delivery_limit(limit: int) -> None:
    classic = contract("orders.place", Payload, queue_type="classic", delivery_limit=limit)

    topology = derive([classic])

    assert "x-delivery-limit" not in dict(topology.queue("orders.place").arguments)
    assert "x-delivery-limit" not in dict(topology.queue("orders.place.dead").arguments)


def test_contracts_sharing_a_queue_with_different_delivery_limits_are_a_contract_error() -> None:
    place = contract("orders.place", Payload, queue="orders", delivery_limit=3)
    cancel = contract("orders.cancel", Payload, queue="orders", delivery_limit=5)

    with pytest.raises(ContractError, match="x-delivery-limit"):
        derive([place, cancel])


# --- due queues -------------------------------------------------------------------------------


def test_the_due_queue_name_is_the_work_queue_name_with_due_appended() -> None:
    assert due_queue_name("orders.place.v2") == "orders.place.v2.due"


def test_a_quorum_due_queue_is_the_work_queue_without_its_length_limit() -> None:
    bounded = contract("orders.place", Payload, max_length=100, delivery_limit=4)

    topology = derive([bounded])

    assert dict(topology.queue("orders.place.due").arguments) == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "amqtask.dead",
        # The work queue's name: what the due queue dead-letters lands in orders.place.dead.
        "x-dead-letter-routing-key": "orders.place",
        "x-dead-letter-strategy": "at-least-once",
        "x-delivery-limit": 4,
        "x-overflow": "reject-publish",
    }
    assert topology.queue("orders.place.due") == due_queue(bounded, Names())


def test_a_due_queue_dead_letters_at_least_once_even_when_its_work_queue_drops_head() -> None:
    drop = contract("orders.place", Payload, max_length=100, overflow="drop-head")

    queue = derive([drop]).queue("orders.place.due")

    assert "x-max-length" not in dict(queue.arguments)
    assert dict(queue.arguments)["x-dead-letter-strategy"] == "at-least-once"
    assert dict(queue.arguments)["x-overflow"] == "reject-publish"


def test_a_classic_due_queue_is_classic_and_unbounded_like_an_unbounded_work_queue() -> None:
    classic = contract("orders.place", Payload, queue_type="classic", max_length=5)

    queue = derive([classic]).queue("orders.place.due")

    assert dict(queue.arguments) == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "amqtask.dead",
        "x-dead-letter-routing-key": "orders.place",
    }


def test_what_a_due_queue_dead_letters_is_routed_to_its_work_queues_dead_letter_queue() -> None:
    topology = derive([contract("orders.place", Payload, queue="orders", max_length=3)])
    args = dict(topology.queue("orders.due").arguments)

    routed = [
        binding.queue
        for binding in topology.bindings
        if binding.exchange == args["x-dead-letter-exchange"]
        and binding.routing_key == args["x-dead-letter-routing-key"]
    ]

    assert routed == ["orders.dead"]


def test_contracts_sharing_a_queue_share_its_due_queue() -> None:
    place = contract("orders.place", Payload, queue="orders", max_length=10)
    cancel = contract("orders.cancel", Payload, queue="orders", max_length=10)

    topology = derive([place, cancel])

    assert [queue.name for queue in topology.queues].count("orders.due") == 1
    assert topology.bindings_of("orders.due") == (deliver_binding("orders"),)


@pytest.mark.parametrize("first", [True, False])
def test_a_queue_named_like_another_contracts_due_queue_is_a_contract_error(first: bool) -> None:
    place = contract("orders.place", Payload, queue="orders")
    clash = contract("orders.clash", Payload, queue="orders.due")

    with pytest.raises(ContractError) as caught:
        derive([place, clash] if first else [clash, place])

    assert str(caught.value) == (
        "task 'orders.clash': queue 'orders.due' clashes with the due queue of queue 'orders' "
        "(task 'orders.place'); pick another queue name"
    )


def test_a_queue_named_like_another_contracts_dead_letter_queue_is_named_in_the_error() -> None:
    clash = contract("orders.clash", Payload, queue="orders.dead")
    place = contract("orders.place", Payload, queue="orders")

    with pytest.raises(ContractError, match="clashes with the dead-letter queue of queue 'orders'"):
        derive([clash, place])


@pytest.mark.parametrize("namespace", ["amqtask", "tenant-a"])
def test_a_queue_named_like_a_delay_level_is_a_contract_error(namespace: str) -> None:
    clash = contract("orders.clash", Payload, queue=f"{namespace}.delay.3")

    with pytest.raises(
        ContractError, match=f"clashes with delay level 3 of namespace '{namespace}'"
    ):
        derive([clash], Names(namespace))


def test_a_queue_whose_name_ends_in_due_is_fine_when_no_queue_owns_that_name() -> None:
    topology = derive([contract("orders.place", Payload, queue="orders.due")])

    assert topology.queue("orders.due.due").name == "orders.due.due"


# --- retired bindings -------------------------------------------------------------------------


def test_the_deliver_binding_to_the_work_queue_itself_is_retired_once_per_queue() -> None:
    topology = derive(
        [
            contract("orders.place", Payload, queue="orders"),
            contract("orders.cancel", Payload, queue="orders"),
            contract("mail.send", Payload, version=2),
        ],
        Names("tenant-a"),
    )

    assert topology.retired == (
        Binding("tenant-a.delay.deliver", "orders", "*." * 20 + "orders"),
        Binding("tenant-a.delay.deliver", "mail.send.v2", "*." * 20 + "mail.send.v2"),
    )
    # Retired bindings are what must go, never part of what is wanted.
    assert not set(topology.retired) & set(topology.entities)


def test_without_contracts_nothing_is_retired() -> None:
    assert derive([]).retired == ()
    assert Topology().retired == ()
