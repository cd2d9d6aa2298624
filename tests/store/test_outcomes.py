"""The store step's outcomes, settled (`amqtask._settle`): revoked and skipped tasks are acked
without running, a postponed one goes back to its queue, a revoked call is answered."""

from __future__ import annotations

from amqtask import _codec
from amqtask._execution import Postponed, Revoked, Skipped
from tests.test_settle import FakeDelivery, settle


async def test_a_revoked_task_is_acked_and_nothing_is_published() -> None:
    outcome, delivery, transport = await settle(Revoked())

    assert (outcome, delivery.settled, transport.published) == ("revoked", ["ack"], [])


async def test_a_revoked_call_is_answered_with_the_reason_then_acked() -> None:
    call = FakeDelivery(
        headers={_codec.TASK: "jobs.ask", _codec.VERSION: 1},
        reply_to="amq.rabbitmq.reply-to.x",
        correlation_id="c-1",
    )

    outcome, delivery, transport = await settle(Revoked(terminated=True), delivery=call)

    (reply,) = transport.to("")
    assert (outcome, delivery.settled) == ("revoked", ["ack"])
    assert reply.headers[_codec.REASON] == "revoked"
    assert reply.correlation_id == "c-1"


async def test_a_duplicate_that_already_succeeded_is_acked_without_a_copy() -> None:
    outcome, delivery, transport = await settle(Skipped("already succeeded"))

    assert (outcome, delivery.settled, transport.published) == ("skipped", ["ack"], [])


async def test_a_postponed_task_is_released_to_come_back_later() -> None:
    outcome, delivery, transport = await settle(Postponed("claimed elsewhere"))

    assert (outcome, delivery.settled, transport.published) == ("released", ["release"], [])
