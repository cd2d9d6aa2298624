"""Unit tests of broker-side delays (`amqtask.routing._delay`), down to a walk of the levels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from pydantic import BaseModel

from amqtask import contract
from amqtask.routing import MAX_DELAY_SECONDS, Names, delay_routing_key, delay_seconds
from amqtask.topology import Binding, Topology, derive

SEVEN_DAYS = 7 * 24 * 3600


class Payload(BaseModel):
    n: int


# --- delay_seconds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "whole"),
    [
        (0.2, 1),
        (1e-9, 1),
        (1, 1),
        (1.0, 1),
        (1.01, 2),
        (2.5, 3),
        (60, 60),
        (SEVEN_DAYS, 604_800),
        (MAX_DELAY_SECONDS - 0.5, MAX_DELAY_SECONDS),
        (MAX_DELAY_SECONDS, MAX_DELAY_SECONDS),
    ],
)
def test_delay_seconds_rounds_up_to_whole_seconds_so_a_task_never_runs_early(
    seconds: float, whole: int
) -> None:
    assert delay_seconds(seconds) == whole
    assert isinstance(delay_seconds(seconds), int)


def test_the_longest_delay_is_just_over_twelve_days_and_fills_all_twenty_bits() -> None:
    assert MAX_DELAY_SECONDS == 2**20 - 1
    assert MAX_DELAY_SECONDS > 12 * 86400


@pytest.mark.parametrize("seconds", [0, 0.0, -0.0, -1, -0.5, -math.inf])
def test_a_delay_that_is_not_positive_is_a_value_error(seconds: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        delay_seconds(seconds)


@pytest.mark.parametrize("seconds", [math.nan, math.inf])
def test_a_delay_that_is_not_finite_is_a_value_error(seconds: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        delay_seconds(seconds)


@pytest.mark.parametrize(
    "seconds", [MAX_DELAY_SECONDS + 1, MAX_DELAY_SECONDS + 0.01, 2**20, 10**12, 1e300]
)
def test_a_delay_beyond_the_longest_supported_is_a_value_error(seconds: float) -> None:
    with pytest.raises(ValueError, match=f"exceeds the longest supported, {MAX_DELAY_SECONDS} s"):
        delay_seconds(seconds)


# --- delay_routing_key ------------------------------------------------------------------------


def test_the_routing_key_spells_the_delay_in_binary_most_significant_bit_first() -> None:
    assert delay_routing_key(5, "images") == "0." * 17 + "1.0.1.images"
    assert delay_routing_key(1, "images") == "0." * 19 + "1.images"
    assert delay_routing_key(2**19, "images") == "1." + "0." * 19 + "images"
    assert delay_routing_key(MAX_DELAY_SECONDS, "images") == "1." * 20 + "images"


@pytest.mark.parametrize("seconds", [1, 2, 3, 5, 1000, SEVEN_DAYS, MAX_DELAY_SECONDS])
def test_the_routing_key_is_twenty_bits_then_the_queue_name(seconds: int) -> None:
    key = delay_routing_key(seconds, "orders.place.v2")

    words = key.split(".")
    assert len(words) == 20 + 3
    assert set(words[:20]) <= {"0", "1"}
    assert int("".join(words[:20]), 2) == seconds
    assert key.endswith(".orders.place.v2")


# --- a walk through the levels ----------------------------------------------------------------


def topic_matches(pattern: str, key: str) -> bool:
    """RabbitMQ topic matching: words split on '.', '*' is one word, '#' zero or more words."""

    def match(pattern: list[str], key: list[str]) -> bool:
        if not pattern:
            return not key
        head, rest = pattern[0], pattern[1:]
        if head == "#":
            return any(match(rest, key[skip:]) for skip in range(len(key) + 1))
        return bool(key) and head in ("*", key[0]) and match(rest, key[1:])

    return match(pattern.split("."), key.split("."))


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b", "a.b", True),
        ("*.b", "a.b", True),
        ("*.b", "a.b.c", False),
        ("*.b", "b", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "a.b", True),
        ("*.*.images", "0.1.images", True),
        ("*.*.images", "0.1.x.images", False),
        ("*.*.x.images", "0.1.images", False),
    ],
)
def test_the_topic_matcher_of_these_tests_follows_rabbitmq(
    pattern: str, key: str, matches: bool
) -> None:
    assert topic_matches(pattern, key) is matches


@dataclass
class Walk:
    """Where a delayed message ended and what it went through on the way."""

    queue: str
    waited_ms: int
    levels: list[int]


def route(topology: Topology, exchange: str, key: str) -> Binding:
    """The one binding of a topic exchange that `key` matches: a delayed message is never
    copied, and never dropped."""
    assert next(e for e in topology.exchanges if e.name == exchange).type == "topic"
    matched = [
        binding
        for binding in topology.bindings
        if binding.exchange == exchange and topic_matches(binding.routing_key, key)
    ]
    assert len(matched) == 1, f"{key!r} on {exchange!r} matches {matched}"
    return matched[0]


def walk(topology: Topology, seconds: int, queue: str) -> Walk:
    """Follow a message published to the entry exchange with the delay key, the way the broker
    would: through exchange bindings, into level queues whose TTL expires into the exchange
    named by x-dead-letter-exchange (routing key unchanged), until it lands in a queue that is
    not a level: a work queue's due queue."""
    names = topology.names
    levels = {f"{names.namespace}.delay.{level}": level for level in range(20)}
    key = delay_routing_key(seconds, queue)
    exchange, waited_ms = f"{names.namespace}.delay.19", 0
    visited: list[int] = []
    for _ in range(100):
        binding = route(topology, exchange, key)
        if binding.to_exchange:
            exchange = binding.queue
            continue
        if binding.queue not in levels:
            return Walk(binding.queue, waited_ms, visited)
        args = dict(topology.queue(binding.queue).arguments)
        # RabbitMQ drops a message dead-lettered into a queue it already died in (x-death).
        assert levels[binding.queue] not in visited
        assert "x-dead-letter-routing-key" not in args
        visited.append(levels[binding.queue])
        waited_ms += int(args["x-message-ttl"])
        exchange = str(args["x-dead-letter-exchange"])
    raise AssertionError(f"{key!r} never left the delay levels")


def work_queues() -> Topology:
    """Work queues whose names end alike, so a loose deliver pattern would misroute."""
    return derive(
        [
            contract("images.resize", Payload, queue="images"),
            contract("images.crop", Payload, queue="x.images"),
            contract("images.tag", Payload, queue="images.x"),
            contract("orders.place", Payload, version=2),
        ]
    )


@pytest.mark.parametrize("seconds", [1, 2, 3, 5, 1000, SEVEN_DAYS, MAX_DELAY_SECONDS])
@pytest.mark.parametrize("queue", ["images", "x.images", "images.x", "orders.place.v2"])
def test_a_delayed_message_waits_exactly_its_delay_then_reaches_only_its_due_queue(
    seconds: int, queue: str
) -> None:
    arrival = walk(work_queues(), seconds, queue)

    assert arrival.queue == f"{queue}.due"
    assert arrival.waited_ms == seconds * 1000


@pytest.mark.parametrize("overflow", ["reject-publish", "drop-head"])
def test_the_last_hop_of_a_delay_never_targets_a_bounded_queue(overflow: str) -> None:
    # A full target would refuse the level's at-least-once dead-lettering, which then holds
    # every other queue's delayed messages for minutes.
    bounded = contract("images.resize", Payload, queue="images", max_length=5, overflow=overflow)
    topology = derive([bounded])

    arrival = walk(topology, 3, "images")

    assert arrival.queue == "images.due"
    assert "x-max-length" not in dict(topology.queue(arrival.queue).arguments)
    assert "x-max-length" in dict(topology.queue("images").arguments)


@pytest.mark.parametrize(
    ("seconds", "levels"),
    [
        (1, [0]),
        (5, [2, 0]),
        (1000, [9, 8, 7, 6, 5, 3]),
        (SEVEN_DAYS, [19, 16, 13, 12, 11, 9, 7]),
        (MAX_DELAY_SECONDS, list(reversed(range(20)))),
    ],
)
def test_a_delayed_message_waits_in_the_level_of_each_set_bit_highest_first(
    seconds: int, levels: list[int]
) -> None:
    assert walk(work_queues(), seconds, "images").levels == levels
    assert sum(2**level for level in levels) == seconds


def test_the_walk_follows_the_namespace() -> None:
    topology = derive([contract("images.resize", Payload, queue="images")], Names("tenant-a"))

    arrival = walk(topology, 5, "images")

    assert arrival == Walk("images.due", 5000, [2, 0])
