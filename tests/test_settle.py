"""Unit tests of settling (`amqtask._settle`): every outcome ends in exactly one settle, whatever
the broker or the message does, and no settle waits without bound."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

import amqtask
from amqtask import _codec
from amqtask._codec import Envelope, Outgoing, open_envelope
from amqtask._exceptions import PublishInterrupted, PublishNacked, PublishTimeout, Unroutable
from amqtask._execution import Expired, Failed, Outcome, Rejected, Succeeded
from amqtask._settle import Settler
from amqtask.routing import Names


class Job(BaseModel):
    n: int


class Out(BaseModel):
    doubled: int


JOB = amqtask.contract("jobs.run", Job, retry=amqtask.Retry(attempts=3))
ASK = amqtask.contract("jobs.ask", Job, returns=Out)
CONTRACTS = {JOB.key: JOB, ASK.key: ASK}
NAMES = Names("ns")


@dataclass
class FakeDelivery:
    """An incoming message that records how it was settled."""

    body: bytes = b'{"n": 1}'
    headers: Mapping[str, Any] = field(
        default_factory=lambda: {_codec.TASK: "jobs.run", _codec.VERSION: 1}
    )
    message_id: str | None = "m-1"
    content_type: str | None = _codec.CONTENT_TYPE
    content_encoding: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    redelivered: bool | None = False
    settled: list[str] = field(default_factory=list)
    hang: bool = False

    async def ack(self) -> None:
        if self.hang:
            await asyncio.Event().wait()  # a connection whose write queue never drains
        self.settled.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("release" if requeue else "reject")


@dataclass
class FakeTransport:
    """Publishes into a list; `fail` maps an exchange to the error its publish raises."""

    fail: dict[str, BaseException] = field(default_factory=dict)
    published: list[tuple[str, str, Outgoing]] = field(default_factory=list)
    header_budget: int = 131072 - 4096

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        *,
        task: str,
        timeout: float | None,
        mandatory: bool = True,
    ) -> None:
        if exchange in self.fail:
            raise self.fail[exchange]
        self.published.append((exchange, routing_key, message))

    async def reply(self, reply_to: str, message: Outgoing, *, task: str) -> None:
        await self.publish("", reply_to, message, task=task, timeout=None, mandatory=False)

    def to(self, exchange: str) -> list[Outgoing]:
        return [message for sent_to, _, message in self.published if sent_to == exchange]


def envelope(delivery: FakeDelivery) -> Envelope:
    return open_envelope(delivery, "jobs.run", CONTRACTS)


async def settle(
    outcome: Outcome, delivery: FakeDelivery | None = None, transport: FakeTransport | None = None
) -> tuple[str, FakeDelivery, FakeTransport]:
    delivery = delivery or FakeDelivery()
    transport = transport or FakeTransport()
    settler = Settler(transport, NAMES, publish_timeout=1.0, settle_timeout=0.2)  # type: ignore[arg-type]
    settled = await settler.settle(envelope(delivery), outcome)
    return settled.outcome, delivery, transport


def failure(exc: BaseException) -> Failed:
    try:
        raise exc
    except BaseException as caught:
        return Failed(caught)


async def test_a_success_is_acked() -> None:
    outcome, delivery, transport = await settle(Succeeded(None))
    assert (outcome, delivery.settled, transport.published) == ("succeeded", ["ack"], [])


async def test_a_failure_with_attempts_left_is_retried_through_the_delay_levels_then_acked() -> (
    None
):
    outcome, delivery, transport = await settle(failure(ValueError("boom")))
    assert (outcome, delivery.settled) == ("retried", ["ack"])
    (copy,) = transport.to(NAMES.delay_entry_exchange)
    assert copy.headers[_codec.ATTEMPT] == 2


@pytest.mark.parametrize(
    "error",
    [
        PublishInterrupted("cut", task="t", message_id="m"),
        PublishTimeout("slow", task="t", message_id="m"),
        ConnectionResetError("reset"),
    ],
)
async def test_a_retry_whose_publish_may_be_transient_is_released_never_dead_lettered(
    error: BaseException,
) -> None:
    transport = FakeTransport(fail={NAMES.delay_entry_exchange: error})
    outcome, delivery, transport = await settle(failure(ValueError("boom")), transport=transport)
    assert (outcome, delivery.settled) == ("released", ["release"])
    assert transport.to(NAMES.dead_letter_exchange) == []


async def test_a_retry_the_broker_refuses_is_dead_lettered_with_why() -> None:
    refused = Unroutable("no route", task="t", message_id="m")
    transport = FakeTransport(fail={NAMES.delay_entry_exchange: refused})
    outcome, delivery, transport = await settle(failure(ValueError("boom")), transport=transport)
    assert (outcome, delivery.settled) == ("failed", ["ack"])
    (letter,) = transport.to(NAMES.dead_letter_exchange)
    assert "no retry" in letter.headers[_codec.ERROR]


async def test_a_dead_letter_the_broker_refuses_falls_back_to_the_queues_own_dead_lettering() -> (
    None
):
    refused = PublishNacked("nack", task="t", message_id="m")
    transport = FakeTransport(fail={NAMES.dead_letter_exchange: refused})
    outcome, delivery, _ = await settle(Rejected("no", amqtask.Reject("no")), transport=transport)
    assert (outcome, delivery.settled) == ("rejected", ["reject"])


async def test_a_dead_letter_that_cannot_be_built_falls_back_to_the_queues_own_dead_lettering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Outgoing:
        raise RuntimeError("a defect in building the copy")

    monkeypatch.setattr(_codec, "dead_letter", broken)
    _, delivery, transport = await settle(Rejected("no", amqtask.Reject("no")))
    assert delivery.settled == ["reject"]
    assert transport.published == []


async def test_a_defect_anywhere_in_settling_still_settles_the_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Outgoing:
        raise RuntimeError("a defect")

    monkeypatch.setattr(_codec, "retry_copy", broken)
    outcome, delivery, _ = await settle(failure(ValueError("boom")))
    assert delivery.settled == ["reject"]
    assert outcome == "failed"


async def test_an_ack_that_never_completes_is_given_up_on_within_the_bound() -> None:
    async with asyncio.timeout(5):
        outcome, delivery, _ = await settle(Succeeded(None), FakeDelivery(hang=True))
    assert outcome == "succeeded"
    assert delivery.settled == []  # void: the broker redelivers it once the connection is gone


async def test_an_expired_call_is_acked_without_a_reply() -> None:
    call = FakeDelivery(reply_to="amq.rabbitmq.reply-to.x", correlation_id="c")
    outcome, delivery, transport = await settle(Expired(), call)
    assert (outcome, delivery.settled, transport.published) == ("expired", ["ack"], [])


def ask_delivery() -> FakeDelivery:
    return FakeDelivery(
        headers={_codec.TASK: "jobs.ask", _codec.VERSION: 1},
        reply_to="amq.rabbitmq.reply-to.x",
        correlation_id="c-1",
    )


async def test_a_call_result_that_cannot_be_encoded_is_answered_as_an_error_and_dead_lettered() -> (
    None
):
    delivery = ask_delivery()
    settler = Settler(FakeTransport(), NAMES, publish_timeout=1.0)  # type: ignore[arg-type]
    transport: Any = settler._transport
    settled = await settler.settle(
        open_envelope(delivery, "jobs.ask", CONTRACTS), Succeeded({"doubled": object()})
    )
    assert settled.outcome == "failed"
    (reply,) = transport.to("")
    assert reply.headers[_codec.REASON] == "invalid_result"
    assert reply.correlation_id == "c-1"
    (letter,) = transport.to(NAMES.dead_letter_exchange)
    assert letter.headers[_codec.REASON] == "invalid_result"
    assert delivery.settled == ["ack"]


async def test_a_failed_call_is_answered_and_dead_lettered_never_retried() -> None:
    delivery = ask_delivery()
    settler = Settler(FakeTransport(), NAMES, publish_timeout=1.0)  # type: ignore[arg-type]
    transport: Any = settler._transport
    settled = await settler.settle(
        open_envelope(delivery, "jobs.ask", CONTRACTS), failure(KeyError("k"))
    )
    assert settled.outcome == "failed"
    assert transport.to(NAMES.delay_entry_exchange) == []
    (reply,) = transport.to("")
    assert reply.headers[_codec.ERROR_TYPE] == "builtins.KeyError"


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError("caf\udce9"),
        amqtask.Reject(None),  # type: ignore[arg-type]
        KeyboardInterrupt(),
        SystemExit(2),
        asyncio.CancelledError(),
    ],
)
async def test_any_exception_becomes_a_dead_letter_whose_headers_encode(exc: BaseException) -> None:
    outcome: Outcome = (
        Rejected(_codec.safe_text(exc.reason), exc)
        if isinstance(exc, amqtask.Reject)
        else failure(exc)
    )
    no_retry = FakeDelivery(
        headers={_codec.TASK: "jobs.run", _codec.VERSION: 1, "amqtask-attempt": 3}
    )
    _, delivery, transport = await settle(outcome, no_retry)
    (letter,) = transport.to(NAMES.dead_letter_exchange)
    _codec.field_table(letter.headers)  # what pamqp sends: raises if a header cannot go out
    assert delivery.settled == ["ack"]


async def test_a_copy_with_headers_over_the_frame_leaves_the_largest_foreign_ones_off() -> None:
    huge = FakeDelivery(
        headers={_codec.TASK: "jobs.run", _codec.VERSION: 1, "junk": "j" * 200_000, "keep": "k"}
    )
    _, _, transport = await settle(failure(ValueError("boom")), huge)
    (copy,) = transport.to(NAMES.delay_entry_exchange)
    assert "junk" not in copy.headers
    assert copy.headers["keep"] == "k"
    assert copy.headers[_codec.DROPPED_HEADERS] == "junk"
    assert len(_codec.field_table(copy.headers)) <= transport.header_budget


async def test_a_crash_on_its_last_attempt_is_dead_lettered_as_crashed_with_its_signal() -> None:
    last_attempt = FakeDelivery(
        headers={_codec.TASK: "jobs.run", _codec.VERSION: 1, "amqtask-attempt": 3}
    )
    crash = amqtask.HandlerCrashed(signal="SIGSEGV")
    outcome, delivery, transport = await settle(
        Failed(crash, "crashed", {_codec.SIGNAL: "SIGSEGV"}), last_attempt
    )
    (letter,) = transport.to(NAMES.dead_letter_exchange)
    assert (outcome, delivery.settled) == ("failed", ["ack"])
    assert letter.headers[_codec.REASON] == "crashed"
    assert letter.headers[_codec.SIGNAL] == "SIGSEGV"
    assert letter.headers[_codec.ERROR_TYPE] == "amqtask._exceptions.HandlerCrashed"


@pytest.mark.parametrize(
    "exc", [amqtask.HandlerCrashed(exit_code=1), amqtask.TimeLimitExceeded(5, killed=True)]
)
async def test_a_crash_or_a_time_limit_with_attempts_left_is_retried_like_any_failure(
    exc: BaseException,
) -> None:
    outcome, _, transport = await settle(Failed(exc, "crashed"))
    assert outcome == "retried"
    assert transport.to(NAMES.dead_letter_exchange) == []
