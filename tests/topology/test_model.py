"""Unit tests of the desired topology derived from contracts (`amqtask.topology._model`)."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import BaseModel

from amqtask import ContractError, contract
from amqtask.routing import Names
from amqtask.topology import Binding, Exchange, Queue, Topology, derive
from amqtask.topology._model import arguments, dead_letter_queue, work_queue


class Payload(BaseModel):
    n: int


def test_derive_declares_the_task_and_dead_letter_exchanges_as_durable_direct() -> None:
    topology = derive([contract("orders.place", Payload)])

    assert topology.exchanges == (
        Exchange("amqtask.tasks", "direct", durable=True),
        Exchange("amqtask.dead", "direct", durable=True),
    )
    assert all(exchange.arguments == () for exchange in topology.exchanges)


def test_derive_without_contracts_still_declares_both_exchanges() -> None:
    topology = derive([])

    assert [exchange.name for exchange in topology.exchanges] == ["amqtask.tasks", "amqtask.dead"]
    assert topology.queues == ()
    assert topology.bindings == ()


def test_each_contract_gets_a_work_queue_and_a_dead_letter_queue() -> None:
    topology = derive([contract("orders.place", Payload), contract("mail.send", Payload)])

    assert [queue.name for queue in topology.queues] == [
        "orders.place",
        "orders.place.dead",
        "mail.send",
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


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_the_dead_letter_queue_has_the_work_queues_type_and_nothing_else(queue_type: str) -> None:
    typed = contract("orders.place", Payload, queue_type=queue_type, max_length=3)

    queue = derive([typed]).queue("orders.place.dead")

    assert queue == Queue(
        "orders.place.dead", durable=True, arguments=(("x-queue-type", queue_type),)
    )
    assert queue == dead_letter_queue(typed)


def test_the_dead_letter_routing_key_is_the_work_queue_name_not_the_task_name() -> None:
    versioned = contract("orders.place", Payload, version=2)

    topology = derive([versioned])

    assert dict(topology.queue("orders.place.v2").arguments)["x-dead-letter-routing-key"] == (
        "orders.place.v2"
    )
    assert topology.bindings == (
        Binding("amqtask.tasks", "orders.place.v2", "orders.place.v2"),
        Binding("amqtask.dead", "orders.place.v2.dead", "orders.place.v2"),
    )


def test_bindings_route_tasks_by_routing_key_and_dead_letters_by_queue_name() -> None:
    placed = contract("orders.place", Payload, queue="orders")

    topology = derive([placed])

    assert topology.bindings == (
        Binding("amqtask.tasks", "orders", "orders.place.v1"),
        Binding("amqtask.dead", "orders.dead", "orders"),
    )
    assert topology.bindings_of("orders") == (
        Binding("amqtask.tasks", "orders", "orders.place.v1"),
    )
    assert topology.bindings_of("orders.dead") == (
        Binding("amqtask.dead", "orders.dead", "orders"),
    )


def test_a_namespace_renames_the_exchanges_and_the_dead_letter_exchange_argument() -> None:
    names = Names("tenant-a")

    topology = derive([contract("orders.place", Payload)], names)

    assert [exchange.name for exchange in topology.exchanges] == ["tenant-a.tasks", "tenant-a.dead"]
    assert dict(topology.queue("orders.place").arguments)["x-dead-letter-exchange"] == (
        "tenant-a.dead"
    )
    assert {binding.exchange for binding in topology.bindings} == {
        "tenant-a.tasks",
        "tenant-a.dead",
    }
    assert topology.names == names


def test_the_default_namespace_is_amqtask() -> None:
    assert derive([]).names == Names("amqtask")


def test_contracts_sharing_a_queue_with_the_same_settings_share_one_queue() -> None:
    place = contract("orders.place", Payload, queue="orders", max_length=10)
    cancel = contract("orders.cancel", Payload, queue="orders", max_length=10)

    topology = derive([place, cancel])

    assert [queue.name for queue in topology.queues] == ["orders", "orders.dead"]
    assert topology.bindings == (
        Binding("amqtask.tasks", "orders", "orders.place.v1"),
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
    assert [entity.kind for entity in topology.entities] == [
        "exchange",
        "exchange",
        "queue",
        "queue",
        "binding",
        "binding",
    ]


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
        "queue": "orders.place",
        "routing_key": "orders.place.v1",
    }


def test_an_empty_topology_has_no_entities() -> None:
    assert Topology().entities == ()
