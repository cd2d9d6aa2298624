"""Unit tests of `amqtask.contract`: defaults, derived names and every `ContractError`."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import BaseModel

from amqtask import AmqtaskError, Contract, ContractError, Overflow, QueueType, contract


class Resize(BaseModel):
    url: str
    width: int


class Resized(BaseModel):
    url: str


def test_contract_defaults_to_a_quorum_queue_named_after_the_task() -> None:
    resize = contract("images.resize", Resize)

    assert isinstance(resize, Contract)
    assert resize.name == "images.resize"
    assert resize.input is Resize
    assert resize.output is None
    assert resize.queue == "images.resize"
    assert resize.queue_type is QueueType.QUORUM
    assert resize.max_length is None
    assert resize.overflow is Overflow.REJECT_PUBLISH
    assert resize.version == 1


def test_returns_becomes_the_contract_output() -> None:
    assert contract("images.resize", Resize, returns=Resized).output is Resized


def test_version_two_and_later_suffix_the_default_queue_name() -> None:
    assert contract("images.resize", Resize, version=2).queue == "images.resize.v2"
    assert contract("images.resize", Resize, version=7).queue == "images.resize.v7"


def test_an_explicit_queue_is_kept_as_given_whatever_the_version() -> None:
    resize = contract("images.resize", Resize, queue="images", version=3)

    assert resize.queue == "images"


def test_routing_key_carries_the_name_and_version() -> None:
    assert contract("images.resize", Resize).routing_key == "images.resize.v1"
    assert contract("images.resize", Resize, version=2).routing_key == "images.resize.v2"


def test_key_is_the_name_and_version() -> None:
    assert contract("images.resize", Resize, version=2).key == ("images.resize", 2)


def test_queue_type_and_overflow_accept_their_string_values() -> None:
    resize = contract(
        "images.resize", Resize, queue_type="classic", max_length=10, overflow="drop-head"
    )

    assert resize.queue_type is QueueType.CLASSIC
    assert resize.overflow is Overflow.DROP_HEAD
    assert resize.max_length == 10


def test_contracts_are_immutable_and_equal_by_value() -> None:
    first = contract("images.resize", Resize)
    second = contract("images.resize", Resize)

    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.queue = "other"  # type: ignore[misc]


def test_repr_names_the_task_version_and_queue() -> None:
    assert repr(contract("images.resize", Resize, version=2)) == (
        "<Contract images.resize v2 queue='images.resize.v2'>"
    )


@pytest.mark.parametrize("name", ["a", "images.resize", "A1_b-c:d.e", "9lives"])
def test_names_of_letters_digits_and_separators_are_accepted(name: str) -> None:
    assert contract(name, Resize).name == name


@pytest.mark.parametrize(
    "name",
    ["", ".resize", "-resize", "_resize", "images resize", "images/resize", "résumé", "a*"],
)
def test_an_invalid_task_name_is_a_contract_error(name: str) -> None:
    with pytest.raises(ContractError, match="invalid task name"):
        contract(name, Resize)


@pytest.mark.parametrize("model", [dict, Resize(url="u", width=1), "Resize", None, int])
def test_an_input_that_is_not_a_pydantic_model_class_is_a_contract_error(model: Any) -> None:
    with pytest.raises(ContractError, match="input must be a pydantic model class"):
        contract("images.resize", model)


@pytest.mark.parametrize("version", [0, -1, True, False, 1.0, "1", None])
def test_a_version_that_is_not_a_positive_integer_is_a_contract_error(version: Any) -> None:
    with pytest.raises(ContractError, match="version must be a positive integer"):
        contract("images.resize", Resize, version=version)


@pytest.mark.parametrize("max_length", [0, -5, True])
def test_a_max_length_below_one_is_a_contract_error(max_length: Any) -> None:
    with pytest.raises(ContractError, match="max_length must be at least 1"):
        contract("images.resize", Resize, max_length=max_length)


@pytest.mark.parametrize("queue", ["amq.images", "amq.", "", "q" * 201, "é" * 101])
def test_a_reserved_empty_or_too_long_queue_name_is_a_contract_error(queue: str) -> None:
    with pytest.raises(ContractError, match="invalid queue name"):
        contract("images.resize", Resize, queue=queue)


def test_a_queue_name_of_exactly_two_hundred_bytes_is_accepted() -> None:
    assert contract("images.resize", Resize, queue="q" * 200).queue == "q" * 200


def test_a_task_named_amq_gets_a_reserved_default_queue_and_is_refused() -> None:
    with pytest.raises(ContractError, match="reserved by RabbitMQ"):
        contract("amq.resize", Resize)


@pytest.mark.parametrize("queue_type", ["stream", "QUORUM", "lazy"])
def test_an_unknown_queue_type_is_a_contract_error(queue_type: str) -> None:
    with pytest.raises(ContractError, match=queue_type):
        contract("images.resize", Resize, queue_type=queue_type)


@pytest.mark.parametrize("overflow", ["reject-publish-dlx", "drop_head", "block"])
def test_an_unknown_overflow_is_a_contract_error(overflow: str) -> None:
    with pytest.raises(ContractError, match=overflow):
        contract("images.resize", Resize, max_length=5, overflow=overflow)


def test_contract_error_is_an_amqtask_error() -> None:
    assert issubclass(ContractError, AmqtaskError)
