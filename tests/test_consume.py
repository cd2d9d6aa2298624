"""Unit tests of the worker's consumer on aio-pika (`amqtask._consume`): batched acks that never
ack a delivery before it finished, never wait on a long task, and never cross a channel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aio_pika.exceptions
import aiormq.exceptions
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from amqtask import _consume
from amqtask._consume import ACK_DELAY, AckBatch, Consumer, Delivery


@dataclass(eq=False)
class FakeChannel:
    """An aiormq channel that records the settle frames written to it, in order."""

    is_closed: bool = False
    frames: list[tuple[str, int, bool]] = field(default_factory=list)
    consumers: dict[str, Any] = field(default_factory=dict)
    fail: BaseException | None = None

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        if self.fail is not None:
            raise self.fail
        self.frames.append(("ack", delivery_tag, multiple))

    async def basic_reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        if self.fail is not None:
            raise self.fail
        self.frames.append(("release" if requeue else "reject", delivery_tag, False))


def acked(frames: list[tuple[str, int, bool]], delivered: int) -> list[int]:
    """Every tag the frames ack, as the broker reads them: `multiple` acks each tag up to its own
    that is still outstanding. Fails on a frame that names a tag no longer outstanding."""
    outstanding = set(range(1, delivered + 1))
    result = []
    for kind, tag, multiple in frames:
        assert tag in outstanding, f"{kind} of tag {tag}, which is not outstanding: {frames}"
        tags = sorted(t for t in outstanding if t <= tag) if multiple else [tag]
        outstanding -= set(tags)
        if kind == "ack":
            result += tags
    return result


def batch(channel: FakeChannel, threshold: int = 100) -> AckBatch:
    return AckBatch(channel, threshold=threshold, timeout=1.0)  # type: ignore[arg-type]


async def test_consecutive_finished_deliveries_are_acked_by_one_frame_within_the_delay() -> None:
    channel = FakeChannel()
    acks = batch(channel)
    for tag in (2, 1, 3, 4):
        acks.ack(tag)
    assert channel.frames == []  # not yet: the others may finish meanwhile

    await asyncio.sleep(ACK_DELAY * 5)

    assert channel.frames == [("ack", 4, True)]


async def test_enough_finished_deliveries_are_acked_at_once_without_the_delay() -> None:
    channel = FakeChannel()
    acks = batch(channel, threshold=3)
    for tag in (1, 2, 3):
        acks.ack(tag)
    await asyncio.sleep(0)  # one turn of the loop: no timer

    assert channel.frames == [("ack", 3, True)]


async def test_a_long_task_holds_back_no_ack_of_the_deliveries_after_it() -> None:
    channel = FakeChannel()
    acks = batch(channel)
    for tag in (1, 3, 4, 5):  # 2 is still running
        acks.ack(tag)
    await asyncio.sleep(ACK_DELAY * 5)

    # 1 with `multiple` (nothing below it is unfinished), the others one by one: none covers 2.
    assert channel.frames == [
        ("ack", 1, True),
        ("ack", 3, False),
        ("ack", 4, False),
        ("ack", 5, False),
    ]

    acks.ack(2)
    acks.ack(6)
    await acks.flush()

    assert channel.frames[4:] == [("ack", 6, True)]  # 2 and 6: 3 to 5 are settled already
    assert acked(channel.frames, 6) == [1, 3, 4, 5, 2, 6]


async def test_a_reject_is_written_at_once_and_before_any_ack_that_passes_its_tag() -> None:
    channel = FakeChannel()
    acks = batch(channel)
    acks.ack(1)
    await acks.reject(2, requeue=False)
    acks.ack(3)
    await acks.reject(4, requeue=True)
    await acks.flush()

    assert channel.frames == [
        ("reject", 2, False),
        ("ack", 1, True),
        ("release", 4, False),
        ("ack", 3, True),
    ]
    assert acked(channel.frames, 4) == [1, 3]


async def test_flush_writes_the_acks_still_waiting_without_waiting_for_the_delay() -> None:
    channel = FakeChannel()
    acks = batch(channel)
    acks.ack(1)
    acks.ack(2)
    await acks.flush()

    assert channel.frames == [("ack", 2, True)]
    await asyncio.sleep(ACK_DELAY * 5)
    assert channel.frames == [("ack", 2, True)]  # nothing written twice


async def test_an_ack_on_a_closed_channel_raises_for_the_settle_step_to_log() -> None:
    channel = FakeChannel(is_closed=True)

    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        batch(channel).ack(1)


async def test_a_failed_write_is_logged_and_fails_the_waiting_reject_without_hanging() -> None:
    channel = FakeChannel(fail=aiormq.exceptions.ChannelInvalidStateError("closed"))
    acks = batch(channel)
    acks.ack(1)
    acks.ack(3)  # with the reject of 2, one frame would ack both: 2 deliveries
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(aiormq.exceptions.ChannelInvalidStateError),
    ):
        await acks.reject(2, requeue=True)

    assert [(e["event"], e["how"], e["deliveries"]) for e in logs] == [("settle_failed", "ack", 2)]


async def test_a_write_that_never_completes_gives_up_after_the_timeout() -> None:
    class Stuck(FakeChannel):
        async def basic_ack(
            self, delivery_tag: int, multiple: bool = False, wait: bool = True
        ) -> None:
            await asyncio.Event().wait()  # a connection whose write queue never drains

    acks = AckBatch(Stuck(), threshold=1, timeout=0.05)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        acks.ack(1)
        await asyncio.wait_for(acks.flush(), timeout=5)

    assert [e["event"] for e in logs] == ["settle_failed"]


@settings(max_examples=200, deadline=None)
@given(
    order=st.permutations(list(range(1, 13))),
    outcomes=st.lists(st.sampled_from(["ack", "reject", "release", "never"]), min_size=12),
    flush_every=st.integers(1, 12),
)
def test_whatever_the_order_each_finished_delivery_is_acked_once_and_no_other(
    order: list[int], outcomes: list[str], flush_every: int
) -> None:
    async def scenario() -> list[tuple[str, int, bool]]:
        channel = FakeChannel()
        acks = batch(channel)
        for done, tag in enumerate(order, 1):
            outcome = outcomes[tag - 1]
            if outcome == "ack":
                acks.ack(tag)
            elif outcome in ("reject", "release"):
                await acks.reject(tag, requeue=outcome == "release")
            if done % flush_every == 0:
                await acks.flush()
        await acks.flush()
        return channel.frames

    frames = asyncio.run(scenario())

    expected = sorted(tag for tag in order if outcomes[tag - 1] == "ack")
    assert sorted(acked(frames, 12)) == expected  # each once; never a "never" nor a rejected one
    settled = [tag for kind, tag, _ in frames if kind != "ack"]
    assert sorted(settled) == sorted(t for t in order if outcomes[t - 1] in ("reject", "release"))


def deliver_frame(tag: int, channel: FakeChannel) -> Any:
    """What aiormq hands a consumer: a `DeliveredMessage`'s fields."""
    properties = SimpleNamespace(
        headers={"amqtask-task": "jobs.run"},
        message_id=f"m-{tag}",
        content_type="application/json",
        content_encoding=None,
        correlation_id=None,
        reply_to=None,
        message_type="jobs.run",
    )
    return SimpleNamespace(
        body=b"{}",
        header=SimpleNamespace(properties=properties),
        delivery=SimpleNamespace(
            delivery_tag=tag, redelivered=False, exchange="ns.tasks", routing_key="jobs.run.v1"
        ),
        channel=channel,
    )


async def test_acks_are_never_batched_across_a_channel_change() -> None:
    received: list[Delivery] = []

    async def on_message(delivery: Delivery) -> None:
        received.append(delivery)

    consumer = Consumer(on_message, prefetch=100, settle_timeout=1.0)
    old, new = FakeChannel(), FakeChannel()
    for tag in (1, 2):
        await consumer.on_delivered(deliver_frame(tag, old))
    old.is_closed = True  # the connection dropped; the robust channel reopens as a new one
    await consumer.on_delivered(deliver_frame(1, new))
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await received[0].ack()  # its tag died with its channel
    await received[2].ack()
    await consumer.flush()

    assert old.frames == []
    assert new.frames == [("ack", 1, True)]


async def test_a_delivery_reads_its_properties_and_is_settled_once() -> None:
    received: list[Delivery] = []

    async def on_message(delivery: Delivery) -> None:
        received.append(delivery)

    channel = FakeChannel()
    consumer = Consumer(on_message, prefetch=10, settle_timeout=1.0)
    await consumer.on_delivered(deliver_frame(7, channel))
    (delivery,) = received

    assert (delivery.body, delivery.message_id, delivery.delivery_tag) == (b"{}", "m-7", 7)
    assert dict(delivery.headers) == {"amqtask-task": "jobs.run"}
    assert (delivery.exchange, delivery.routing_key, delivery.redelivered) == (
        "ns.tasks",
        "jobs.run.v1",
        False,
    )
    assert (delivery.reply_to, delivery.correlation_id, delivery.content_encoding) == (
        None,
        None,
        None,
    )
    assert delivery.type == "jobs.run"  # what a retry or dead letter copies
    await delivery.ack()
    with pytest.raises(aio_pika.exceptions.MessageProcessError):
        await delivery.reject(requeue=True)  # a second settle would void the channel
    await consumer.flush()
    assert channel.frames == [("ack", 7, False)]  # alone: tags 1 to 6 are not settled


async def test_a_delivery_through_aio_pika_puts_the_direct_callback_on_its_channel() -> None:
    received: list[Delivery] = []

    async def on_message(delivery: Delivery) -> None:
        received.append(delivery)

    channel = FakeChannel()
    consumer = Consumer(on_message, prefetch=10, settle_timeout=1.0)
    consumer._tag = "ctag"
    channel.consumers["ctag"] = "aio-pika's callback"
    incoming = SimpleNamespace(
        channel=channel,
        body=b"{}",
        properties=SimpleNamespace(headers=None, message_type=None),
        delivery_tag=1,
        redelivered=True,
        exchange="",
        routing_key="q",
    )
    await consumer.on_incoming(incoming)  # type: ignore[arg-type]

    assert channel.consumers["ctag"] == consumer.on_delivered  # later deliveries skip aio-pika
    assert received[0].redelivered is True
    assert dict(received[0].headers) == {}


def test_the_write_bound_is_the_settle_steps() -> None:
    from amqtask._settle import SETTLE_TIMEOUT

    assert _consume.WRITE_TIMEOUT == SETTLE_TIMEOUT
