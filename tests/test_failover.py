"""Several broker URLs: how they are given, the order they are tried in, and the pauses between
tries (`amqtask._failover`, `amqtask._urls.split_urls`). No broker needed."""

from __future__ import annotations

import asyncio
import socket

import pytest

import amqtask
from amqtask._failover import NEXT_URL_PAUSE, RECONNECT_BACKOFF, Failover, HostCycle
from amqtask._transport import AioPikaTransport, all_failed, open_connection
from amqtask._urls import split_urls

A, B, C = (f"amqp://guest:s3cret@node{i}:5672/" for i in (1, 2, 3))


@pytest.mark.parametrize(
    "given",
    [
        [A, B, C],
        f"{A},{B},{C}",
        f"{A}; {B} ;{C}",
        [f"{A},{B}", C],
        f" {A} ,, {B},{C}, ",
    ],
)
def test_urls_are_given_as_a_list_or_one_string_separated_by_commas_or_semicolons(
    given: str | list[str],
) -> None:
    assert split_urls(given) == (A, B, C)


@pytest.mark.parametrize("given", ["", " , ; ", []])
def test_no_url_at_all_is_refused(given: str | list[str]) -> None:
    with pytest.raises(ValueError, match="no broker URL"):
        split_urls(given)


def test_the_app_takes_several_urls_and_keeps_the_first_as_its_url() -> None:
    app = amqtask.App(f"{A};{B}", [])

    assert app.urls == (A, B)
    assert app.url == A


def test_in_order_the_urls_are_tried_as_given_and_a_failure_moves_to_the_next() -> None:
    cycle = HostCycle([A, B, C])

    assert cycle.round() == [A, B, C]
    assert cycle.current == A
    cycle.failed()
    assert cycle.current == B
    assert cycle.round() == [B, C, A]
    cycle.failed()
    cycle.failed()
    assert cycle.current == A  # round and round


def test_a_dead_node_is_left_for_the_next_at_once_and_all_down_backs_off_with_jitter() -> None:
    rand = iter([0.0, 0.5, 0.999, 0.999, 0.999, 0.999])
    cycle = HostCycle([A, B, C], rand=lambda: next(rand))

    # The first two failures leave URLs not yet tried: a short pause only.
    assert cycle.failed() == NEXT_URL_PAUSE
    assert cycle.failed() == NEXT_URL_PAUSE
    # Every URL failed in a row: exponential backoff with jitter, in [c/2, c].
    third = cycle.failed()
    fourth = cycle.failed()
    assert third == pytest.approx(RECONNECT_BACKOFF.first / 2)  # rand 0.0
    assert fourth == pytest.approx(RECONNECT_BACKOFF.first * 2 * 0.75)  # rand 0.5
    pauses = [cycle.failed() for _ in range(4)]
    assert max(pauses) <= RECONNECT_BACKOFF.cap
    assert pauses[-1] > RECONNECT_BACKOFF.cap * 0.99


def test_a_connect_starts_a_fresh_round_of_quick_tries() -> None:
    cycle = HostCycle([A, B], rand=lambda: 0.5)
    for _ in range(5):
        cycle.failed()
    assert cycle.pause > NEXT_URL_PAUSE

    cycle.connected()

    assert cycle.failures == 0
    assert cycle.failed() == NEXT_URL_PAUSE


def test_one_url_backs_off_from_the_first_failure() -> None:
    cycle = HostCycle([A], rand=lambda: 0.0)

    assert cycle.failed() == pytest.approx(RECONNECT_BACKOFF.first / 2)
    assert cycle.current == A


def test_shuffle_tries_each_url_once_a_round_in_a_new_order_never_the_failed_one_again() -> None:
    values = iter([0.9, 0.1] * 50)
    cycle = HostCycle([A, B, C], Failover.SHUFFLE, rand=lambda: next(values))
    seen_orders = set()
    for _ in range(6):
        order = cycle.round()
        assert sorted(order) == [A, B, C]
        seen_orders.add(tuple(order))
        last = order[-1]
        for _ in order:
            cycle.failed()
        assert cycle.current != last  # a new round does not start where the last one failed
    assert len(seen_orders) > 1


def test_shuffle_spreads_first_connects_over_the_nodes() -> None:
    import random

    rng = random.Random(7)
    firsts = {HostCycle([A, B, C], "shuffle", rand=rng.random).current for _ in range(50)}

    assert firsts == {A, B, C}


def test_start_at_makes_a_url_current_and_keeps_the_order() -> None:
    cycle = HostCycle([A, B, C])

    cycle.start_at(C)

    assert cycle.round() == [C, A, B]


def test_an_unknown_failover_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="random"):
        HostCycle([A], "random")


# --- connecting to several URLs, none of which answers -------------------------------------------


def refused_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"amqp://guest:s3cret@127.0.0.1:{port}/"


async def test_a_connect_tries_every_url_and_names_each_failure_without_passwords() -> None:
    first, second = refused_url(), refused_url()
    transport = AioPikaTransport([first, second], connect_timeout=2)

    with pytest.raises(amqtask.BrokerUnreachable) as raised:
        await transport.connect()

    message = str(raised.value)
    assert "s3cret" not in message
    assert first.replace("s3cret", "***") in message
    assert second.replace("s3cret", "***") in message
    assert "refused" in message.lower()
    await asyncio.sleep(0.1)
    assert asyncio.all_tasks() == {asyncio.current_task()}  # no reconnect loop left behind


async def test_a_plain_connection_tries_the_urls_in_turn() -> None:
    with pytest.raises(amqtask.BrokerUnreachable, match=r"127\.0\.0\.1.*127\.0\.0\.1"):
        await open_connection([refused_url(), refused_url()], name="t", timeout=2)


def test_one_failure_per_url_for_a_reason_waiting_cannot_fix_is_that_error() -> None:
    errors = [amqtask.AuthenticationFailed(url=url, user="ada") for url in (A, B)]

    assert all_failed(errors, [A, B]) is errors[0]


def test_mixed_failures_are_one_unreachable_error_caused_by_one_that_may_pass() -> None:
    refused = amqtask.BrokerUnreachable(url=A, reason="Connection refused")
    refused.__cause__ = ConnectionRefusedError()
    errors = [amqtask.AuthenticationFailed(url=B, user="ada"), refused]

    combined = all_failed(errors, [B, A])

    assert isinstance(combined, amqtask.BrokerUnreachable)
    assert "authentication failed for user 'ada'" in str(combined)
    assert "Connection refused" in str(combined)
    assert isinstance(combined.__cause__, ConnectionRefusedError)  # a starting worker waits


def test_a_malformed_url_among_several_is_refused_before_any_connect() -> None:
    transport = AioPikaTransport([A, "http://nope"])

    with pytest.raises(amqtask.InvalidURL, match="only amqp and amqps"):
        asyncio.run(transport.connect())


def test_the_urls_of_an_app_can_be_replaced_before_it_connects() -> None:
    app = amqtask.App(A, [])

    app.use_urls(f"{B},{C}")

    assert (app.url, app.urls) == (B, (B, C))
    assert isinstance(app.transport, AioPikaTransport)
    assert app.transport.urls == (B, C)
    assert app.transport.current_url == B
