"""Unit tests of `amqtask.contract`: defaults, derived names and every `ContractError`."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from pydantic import BaseModel

from amqtask import (
    AmqtaskError,
    Contract,
    ContractError,
    Isolation,
    Overflow,
    QueueType,
    Retry,
    contract,
)
from amqtask._contract import DEFAULT_DELIVERY_LIMIT, NO_RETRY


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
    assert resize.retry == Retry()
    assert resize.delivery_limit == DEFAULT_DELIVERY_LIMIT == 10


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


@pytest.mark.parametrize("queue", ["images.*", "*", "#", "images.#", "a*b", "a#b", "*.images"])
def test_a_queue_name_with_a_topic_wildcard_is_a_contract_error(queue: str) -> None:
    # The name ends a delay routing key and a deliver pattern: a wildcard would misroute.
    with pytest.raises(ContractError, match=r"no '\*' or '#'"):
        contract("images.resize", Resize, queue=queue)


# --- delivery_limit ---------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3, 1000])
def test_a_positive_delivery_limit_is_kept(limit: int) -> None:
    assert contract("images.resize", Resize, delivery_limit=limit).delivery_limit == limit


@pytest.mark.parametrize("limit", [0, -1, True, False, 1.5, "10", None])
def test_a_delivery_limit_that_is_not_a_positive_integer_is_a_contract_error(limit: Any) -> None:
    with pytest.raises(ContractError, match="delivery_limit must be at least 1"):
        contract("images.resize", Resize, delivery_limit=limit)


# --- Retry ------------------------------------------------------------------------------------


def test_retry_defaults_to_five_attempts_one_second_apart_doubling_up_to_ten_minutes() -> None:
    retry = Retry()

    assert (retry.attempts, retry.backoff, retry.initial, retry.max_delay) == (5, 2.0, 1.0, 600.0)
    assert retry.on == (Exception,)


def test_a_contract_keeps_the_retry_it_is_given() -> None:
    retry = Retry(attempts=2, initial=5)

    assert contract("images.resize", Resize, retry=retry).retry is retry
    assert contract("images.resize", Resize, retry=None).retry == Retry()


@pytest.mark.parametrize("attempts", [0, -1])
def test_fewer_than_one_attempt_is_a_contract_error(attempts: int) -> None:
    with pytest.raises(ContractError, match="attempts must be at least 1"):
        Retry(attempts=attempts)


@pytest.mark.parametrize("attempts", [True, False, 2.0, "3", None])
def test_attempts_that_are_not_an_integer_are_a_contract_error(attempts: Any) -> None:
    with pytest.raises(ContractError, match="attempts must be an integer"):
        Retry(attempts=attempts)


@pytest.mark.parametrize(
    "settings",
    [
        {"backoff": 0.5},
        {"backoff": 0},
        {"backoff": -2},
        {"initial": 0},
        {"initial": -1},
        {"initial": 10, "max_delay": 5},
        {"max_delay": 0.5},
    ],
    ids=[
        "backoff-half",
        "backoff-zero",
        "backoff-negative",
        "initial-zero",
        "initial-negative",
        "max-below-initial",
        "max-below-default-initial",
    ],
)
def test_backoff_below_one_or_a_non_positive_initial_or_max_below_initial_is_an_error(
    settings: dict[str, Any],
) -> None:
    with pytest.raises(ContractError, match="Retry needs finite backoff >= 1, initial > 0"):
        Retry(**settings)


def test_the_boundaries_of_retry_are_accepted() -> None:
    retry = Retry(attempts=1, backoff=1, initial=0.5, max_delay=0.5)

    assert (retry.attempts, retry.backoff, retry.initial, retry.max_delay) == (1, 1, 0.5, 0.5)


def test_a_retry_error_is_a_contract_error() -> None:
    with pytest.raises(AmqtaskError):
        Retry(attempts=0)


def test_delay_before_doubles_from_one_second_and_is_capped_at_max_delay() -> None:
    retry = Retry(attempts=20)

    delays = [retry.delay_before(attempt) for attempt in range(2, 14)]

    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]


def test_delay_before_follows_initial_backoff_and_max_delay() -> None:
    retry = Retry(attempts=10, backoff=3, initial=0.5, max_delay=10)

    delays = [retry.delay_before(attempt) for attempt in range(2, 7)]

    assert delays == [0.5, 1.5, 4.5, 10, 10]


def test_a_backoff_of_one_waits_the_same_before_every_attempt() -> None:
    retry = Retry(attempts=4, backoff=1, initial=30)

    assert [retry.delay_before(attempt) for attempt in range(2, 5)] == [30, 30, 30]


def test_retries_until_the_last_attempt_has_failed() -> None:
    retry = Retry(attempts=3)

    assert [retry.retries(ValueError(), attempt) for attempt in (1, 2, 3, 4)] == [
        True,
        True,
        False,
        False,
    ]


def test_a_single_attempt_never_retries() -> None:
    assert not Retry(attempts=1).retries(ValueError(), 1)
    assert NO_RETRY.attempts == 1
    assert not NO_RETRY.retries(ValueError(), 1)


class Transient(ConnectionError):
    pass


def test_only_the_exceptions_in_on_and_their_subclasses_are_retried() -> None:
    retry = Retry(on=(ConnectionError, TimeoutError))

    assert retry.retries(ConnectionError(), 1)
    assert retry.retries(Transient(), 1)
    assert retry.retries(TimeoutError(), 1)
    assert not retry.retries(ValueError(), 1)
    assert not retry.retries(KeyError("k"), 1)


def test_by_default_every_exception_is_retried_but_not_cancellation_or_exit() -> None:
    retry = Retry()

    assert retry.retries(ValueError(), 1)
    assert retry.retries(Transient(), 4)
    assert not retry.retries(asyncio.CancelledError(), 1)
    assert not retry.retries(KeyboardInterrupt(), 1)
    assert not retry.retries(SystemExit(1), 1)


def test_on_given_as_a_list_is_kept_as_a_tuple_so_retry_stays_hashable() -> None:
    retry = Retry(on=[ValueError, KeyError])  # type: ignore[arg-type]

    assert retry.on == (ValueError, KeyError)
    assert hash(retry) == hash(Retry(on=(ValueError, KeyError)))


def test_retry_is_immutable_and_equal_by_value() -> None:
    retry = Retry(attempts=3)

    assert retry == Retry(attempts=3)
    assert retry != Retry(attempts=4)
    assert len({retry, Retry(attempts=3)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.attempts = 4  # type: ignore[misc]


def test_contracts_with_different_retries_differ() -> None:
    first = contract("images.resize", Resize, retry=Retry(attempts=2))

    assert first != contract("images.resize", Resize, retry=Retry(attempts=3))


# --- where and how long the handler runs ---------------------------------------------------------


def test_execution_settings_default_to_the_workers_choice() -> None:
    c = contract("images.resize", Resize)
    assert (c.time_limit, c.soft_time_limit, c.isolation, c.python, c.launcher) == (
        None,
        None,
        None,
        None,
        (),
    )


def test_a_contract_keeps_its_time_limits_isolation_interpreter_and_launcher() -> None:
    c = contract(
        "images.resize",
        Resize,
        time_limit=60,
        soft_time_limit=50.5,
        isolation="process",
        python="/opt/other/bin/python",
        launcher=["bwrap", "--ro-bind", "/", "/"],
    )
    assert c.time_limit == 60
    assert c.soft_time_limit == 50.5
    assert c.isolation is Isolation.PROCESS
    assert c.python == "/opt/other/bin/python"
    assert c.launcher == ("bwrap", "--ro-bind", "/", "/")
    hash(c)  # still a value


@pytest.mark.parametrize("limit", [0, -1, float("inf"), float("nan"), True, "10"])
def test_a_time_limit_that_is_not_positive_finite_seconds_is_a_contract_error(limit: Any) -> None:
    with pytest.raises(ContractError, match="time_limit must be a positive number"):
        contract("images.resize", Resize, time_limit=limit)
    with pytest.raises(ContractError, match="soft_time_limit must be a positive number"):
        contract("images.resize", Resize, soft_time_limit=limit)


def test_a_soft_time_limit_not_below_the_hard_one_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="must be below time_limit"):
        contract("images.resize", Resize, time_limit=10, soft_time_limit=10)


def test_an_unknown_isolation_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="'container' is not a valid Isolation"):
        contract("images.resize", Resize, isolation="container")


@pytest.mark.parametrize("settings", [{"python": "/usr/bin/python3"}, {"launcher": ["bwrap"]}])
def test_another_interpreter_or_a_launcher_needs_process_isolation(
    settings: dict[str, Any],
) -> None:
    with pytest.raises(ContractError, match="add isolation='process'"):
        contract("images.resize", Resize, **settings)
    assert contract("images.resize", Resize, isolation="process", **settings).isolation == (
        Isolation.PROCESS
    )
