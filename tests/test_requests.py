"""What a transient call learns when its request's confirm comes back a failure: the types the
caller sees, whatever aiormq put on the confirmation. No broker needed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiormq.exceptions
import pytest
from pamqp import commands

import amqtask
from amqtask._codec import Outgoing
from amqtask._transport import _AioPikaReplyChannel

RETURNED = aiormq.exceptions.PublishError(
    SimpleNamespace(delivery=commands.Basic.Return(reply_code=312)),  # type: ignore[arg-type]
    commands.Basic.Return(reply_code=312),
)


@pytest.mark.parametrize(
    ("failure", "seen"),
    [
        (RETURNED, amqtask.Unroutable),
        (aiormq.exceptions.DeliveryError(None, commands.Basic.Nack(1)), amqtask.PublishNacked),
        (aiormq.exceptions.ChannelClosed(None, None), amqtask.ConnectionLost),
        # aiormq fails the confirmations of a channel closed without a reason with this:
        (asyncio.CancelledError(), amqtask.ConnectionLost),
        (Exception(), amqtask.ConnectionLost),
        (ValueError("routing key over 255 bytes"), ValueError),
    ],
    ids=["returned", "nacked", "channel-closed", "closed-without-reason", "bare", "unencodable"],
)
async def test_a_failed_confirm_reaches_the_call_typed(failure: BaseException, seen: type) -> None:
    refused: list[BaseException] = []
    confirmation: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    confirmation.set_exception(failure)
    message = Outgoing(b"{}", "m-1", correlation_id="m-1")
    channel: Any = SimpleNamespace()
    _AioPikaReplyChannel._confirm_done(
        refused.append, channel, "tasks", "job.v1.call", message, "job", confirmation
    )

    assert [type(exc) for exc in refused] == [seen]
    if isinstance(refused[0], amqtask.AmqtaskError):
        assert refused[0].task == "job"  # type: ignore[attr-defined]


async def test_a_confirmed_request_hands_nothing_over() -> None:
    refused: list[BaseException] = []
    confirmation: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    confirmation.set_result(commands.Basic.Ack(1))
    message = Outgoing(b"{}", "m-1")
    channel: Any = SimpleNamespace()
    _AioPikaReplyChannel._confirm_done(
        refused.append, channel, "tasks", "job.v1.call", message, "job", confirmation
    )

    assert refused == []
