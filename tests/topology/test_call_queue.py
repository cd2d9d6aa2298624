"""Unit tests of transient calls' topology and messages: `contract(..., calls="transient")` gets
a classic call queue of its work queue's own, and its requests are transient messages."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from amqtask import Calls, ContractError, contract
from amqtask._codec import encode_call
from amqtask._evolution import check, export
from amqtask.routing import call_queue_name, call_routing_key, routing_key
from amqtask.topology import Binding, Queue, derive
from amqtask.topology._model import call_queue


class Payload(BaseModel):
    n: int


def test_a_contract_with_transient_calls_gets_a_classic_call_queue_bound_by_its_call_key() -> None:
    resize = contract("images.resize", Payload, calls="transient")

    topology = derive([resize])

    assert resize.calls is Calls.TRANSIENT
    assert topology.queue("images.resize.calls") == Queue(
        "images.resize.calls",
        arguments=(
            ("x-dead-letter-exchange", "amqtask.dead"),
            ("x-dead-letter-routing-key", "images.resize"),  # into the work queue's .dead
            ("x-queue-type", "classic"),
        ),
    )
    assert topology.bindings_of("images.resize.calls") == (
        Binding("amqtask.tasks", "images.resize.calls", "images.resize.v1.call"),
    )
    assert topology.queue("images.resize").type == "quorum"  # sends stay durable


def test_durable_calls_are_the_default_and_get_no_call_queue() -> None:
    resize = contract("images.resize", Payload)

    assert resize.calls is Calls.DURABLE
    assert "images.resize.calls" not in {queue.name for queue in derive([resize]).queues}


def test_the_call_queue_is_bounded_like_the_work_queue() -> None:
    resize = contract(
        "images.resize", Payload, calls="transient", max_length=50, overflow="drop-head"
    )

    args = dict(call_queue(resize, derive([]).names).arguments)

    assert (args["x-max-length"], args["x-overflow"]) == (50, "drop-head")


def test_contracts_sharing_a_queue_share_its_call_queue() -> None:
    small = contract("images.small", Payload, queue="images", calls="transient")
    large = contract("images.large", Payload, queue="images", calls="transient")
    plain = contract("images.plain", Payload, queue="images")

    topology = derive([small, large, plain])

    assert [q.name for q in topology.queues].count("images.calls") == 1
    assert {b.routing_key for b in topology.bindings_of("images.calls")} == {
        "images.small.v1.call",
        "images.large.v1.call",
    }


def test_a_work_queue_named_like_a_transient_contracts_call_queue_is_a_contract_error() -> None:
    place = contract("orders.place", Payload, queue="orders", calls="transient")
    clash = contract("orders.clash", Payload, queue="orders.calls")

    with pytest.raises(ContractError, match=r"'orders\.calls' clashes with the call queue"):
        derive([place, clash])
    # Without transient calls the name is free.
    derive([contract("orders.place", Payload, queue="orders"), clash])


def test_an_unknown_calls_value_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="sometimes"):
        contract("images.resize", Payload, calls="sometimes")


@pytest.mark.parametrize(("calls", "persistent"), [("durable", True), ("transient", False)])
def test_a_call_request_is_persistent_unless_the_contract_has_transient_calls(
    calls: str, persistent: bool
) -> None:
    resize = contract("images.resize", Payload, calls=calls)

    message = encode_call(resize, {"n": 1}, reply_to="amq.rabbitmq.reply-to", timeout=5)

    assert message.persistent is persistent


def test_a_call_routing_key_never_routes_like_a_task() -> None:
    # A task's key ends in ".v{N}", a call's in ".call": no task name makes them equal.
    assert call_routing_key("a.v1", 1) == "a.v1.v1.call" != routing_key("a.v1.v1", 1)
    assert call_queue_name("images") == "images.calls"


def test_switching_to_transient_calls_breaks_only_new_callers_meeting_old_workers() -> None:
    durable = contract("images.resize", Payload)
    transient = contract("images.resize", Payload, calls="transient")
    before = export([durable], namespace="amqtask")

    (change,) = check(before, export([transient], namespace="amqtask"))
    (back,) = check(export([transient], namespace="amqtask"), before)

    assert "calls" not in before["contracts"][0]  # absent means durable, as in older exports
    assert (change.path, change.old_to_new, change.new_to_old) == (
        "calls",
        "compatible",
        "breaking",
    )
    assert "deploy the workers" in change.note
    assert (back.old_to_new, back.new_to_old) == ("breaking", "compatible")
