"""Settling: every outcome of a delivery mapped, in one place, to what the broker is told.

| outcome                         | what happens                                                |
|---------------------------------|-------------------------------------------------------------|
| succeeded                       | reply (a call), then ack                                     |
| failed, retries left (no call)  | a copy goes through the delay levels, confirmed, then ack    |
| failed, no retry left / a call  | error reply (a call), dead letter with the reason, then ack  |
| rejected (`Reject`)             | the same, at once                                            |
| refused (not a task)            | the same, with the decoding problem as the reason           |
| expired (a call nobody awaits)  | ack, not run                                                 |

`settle` cannot raise and cannot hang: every publish and every ack has a bound. When what it
would publish cannot be built or is refused by the broker, the last resort is to reject the
delivery without requeue, so the queue's own dead-letter exchange takes it (without our reason
headers). A publish that failed in a way that may be transient (the connection is down, no
confirm in time) never turns a retry into a dead letter: the delivery is released (requeued)
and runs again. A reply is at-most-once: if it cannot be sent, the caller times out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never, cast

import structlog
from pydantic import ValidationError

from amqtask import _codec
from amqtask._codec import Envelope, Outgoing, Reasons
from amqtask._exceptions import PublishNacked, Unroutable
from amqtask._execution import (
    Expired,
    Failed,
    Outcome,
    Postponed,
    Refused,
    Rejected,
    Revoked,
    Skipped,
    Succeeded,
)
from amqtask._transport import IncomingDelivery, Transport
from amqtask.routing import Names, delay_routing_key, delay_seconds

log = structlog.get_logger("amqtask.worker")

# The broker said no: publishing the same again will not help.
_REFUSED = (PublishNacked, Unroutable)

SETTLE_TIMEOUT = 10.0
"""Seconds an ack, a reject or a release may take. A settle that cannot complete in that time
belongs to a dead connection; the broker redelivers the message, so giving up loses nothing."""


@dataclass(slots=True)
class Settled:
    """What became of a delivery, for the worker's log line and metrics."""

    outcome: str  # succeeded, retried, failed, rejected, expired, released
    details: dict[str, Any] = field(default_factory=dict)


class Settler:
    """Maps each outcome to acks and publishes (see the module's table). Never raises."""

    def __init__(
        self,
        transport: Transport,
        names: Names,
        *,
        publish_timeout: float,
        settle_timeout: float = SETTLE_TIMEOUT,
    ) -> None:
        self._transport = transport
        self._names = names
        self._publish_timeout = publish_timeout
        self._settle_timeout = settle_timeout

    async def settle(self, envelope: Envelope, outcome: Outcome) -> Settled:
        try:
            return await self._settle(envelope, outcome)
        except Exception as exc:
            # A defect of ours must not leave the delivery unacked for good.
            log.exception("settle_crashed", message_id=envelope.message_id, error=repr(exc))
            await self._broker_dead_letter(envelope)
            return Settled("failed", {"reason": "settle_crashed", "error": _codec.describe(exc)})

    async def _settle(self, envelope: Envelope, outcome: Outcome) -> Settled:
        contract = envelope.contract
        match outcome:
            case Succeeded(result) if envelope.is_call:
                assert contract is not None
                try:
                    reply = _codec.encode_reply(contract, result, request=envelope.delivery)
                except Exception as exc:
                    output = _codec.safe_text(getattr(contract.output, "__name__", "its model"))
                    fits = isinstance(exc, ValidationError)
                    kind = "does not fit" if fits else "cannot be encoded as"
                    error = f"the handler's result {kind} {output}: {_codec.safe_text(exc)}"
                    return await self._fail(
                        envelope, "failed", Reasons.INVALID_RESULT, error, exc, answer=None
                    )
                await self._reply(envelope, reply)
                await self._ack(envelope)
                return Settled("succeeded", {"attempt": envelope.attempt})
            case Succeeded():
                await self._ack(envelope)
                return Settled("succeeded", {"attempt": envelope.attempt})
            case Failed(exc, reason, headers):
                assert contract is not None
                error = _codec.describe(exc)
                # A call's caller is waiting: its failure is answered, never retried later.
                if not envelope.is_call and contract.retry.retries(exc, envelope.attempt):
                    return await self._retry(envelope, exc, error)
                return await self._fail(
                    envelope,
                    "failed",
                    reason,  # handler_error, time_limit or crashed
                    error,
                    exc,
                    answer=_codec.safe_text(exc),  # the caller gets the type separately
                    headers=headers,
                )
            case Rejected(reason, signal):
                return await self._fail(envelope, "rejected", Reasons.REJECTED, reason, signal)
            case Refused(problem):
                return await self._fail(
                    envelope, "rejected", problem.reason, problem.detail, problem, decoded=False
                )
            case Expired():
                await self._ack(envelope)
                return Settled("expired", {"correlation_id": envelope.delivery.correlation_id})
            case Revoked(terminated):
                if envelope.is_call:
                    why = "revoked while running" if terminated else "revoked before it ran"
                    await self._reply(
                        envelope,
                        _codec.error_reply(envelope.delivery, reason=Reasons.REVOKED, error=why),
                    )
                await self._ack(envelope)
                return Settled("revoked", {"attempt": envelope.attempt, "terminated": terminated})
            case Skipped(why):
                await self._ack(envelope)
                return Settled("skipped", {"attempt": envelope.attempt, "why": why})
            case Postponed(why):
                return await self._release(envelope, why)
            case _:
                assert_never(outcome)

    # --- the three ways out: retry, dead letter, reply ---------------------------------------

    async def _retry(self, envelope: Envelope, exc: BaseException, error: str) -> Settled:
        """Re-publish through the delay levels for the next attempt, confirmed, then ack.

        The worker holds nothing while the task waits: the delay is a broker queue's TTL.
        """
        contract = envelope.contract
        assert contract is not None
        attempt = envelope.attempt
        seconds = delay_seconds(contract.retry.delay_before(attempt + 1))
        copy = _codec.retry_copy(envelope.delivery, attempt=attempt + 1, exc=exc)
        stored, refused = await self._publish(
            envelope,
            self._names.delay_entry_exchange,
            delay_routing_key(seconds, envelope.queue),
            copy,
            what="retry",
        )
        if refused is not None:
            return await self._fail(
                envelope,
                "failed",
                Reasons.HANDLER_ERROR,
                f"{error} (no retry: {_codec.safe_text(refused)})",
                exc,
            )
        if not stored:
            return await self._release(envelope, error)
        await self._ack(envelope)
        return Settled("retried", {"attempt": attempt, "retry_in_s": seconds, "error": error})

    async def _fail(
        self,
        envelope: Envelope,
        outcome: str,
        reason: str,
        error: str,
        exc: BaseException,
        *,
        answer: str | None = None,
        decoded: bool = True,
        headers: Mapping[str, Any] | None = None,
    ) -> Settled:
        """Answer a waiting caller with why its request failed, then dead-letter the delivery.

        `answer` is what the caller reads (default: `error`). A delivery that was never
        `decoded` gets no traceback in the reply and no exception details on its dead letter.
        `headers` are added to the dead letter (a crash's exit code or signal).
        """
        details: dict[str, Any] = {"reason": reason, "error": error}
        if decoded:
            details["attempt"] = envelope.attempt
        if envelope.is_call:
            reply = _codec.error_reply(
                envelope.delivery,
                reason=reason,
                error=error if answer is None else answer,
                exc=exc,
                traceback=decoded,
            )
            await self._reply(envelope, reply)
        try:
            copy = _codec.dead_letter(
                envelope.delivery,
                queue=envelope.queue,
                reason=reason,
                error=error,
                exc=exc if decoded else None,
            )
            copy.headers.update(headers or {})
        except Exception as build_error:  # unreachable by design; the broker's route remains
            log.exception("dead_letter_build_failed", error=repr(build_error))
            await self._broker_dead_letter(envelope)
            return Settled(outcome, details)
        stored, refused = await self._publish(
            envelope, self._names.dead_letter_exchange, envelope.queue, copy, what="dead_letter"
        )
        if refused is not None:
            await self._broker_dead_letter(envelope)
        elif not stored:
            return await self._release(envelope, error)
        else:
            await self._ack(envelope)
        return Settled(outcome, details)

    async def _reply(self, envelope: Envelope, reply: Outgoing) -> None:
        # To the caller's direct reply-to address, unconfirmed (`Transport.reply`): a caller that
        # has gone makes the broker drop the reply (at-most-once); a publish that fails is
        # logged, not retried. Bounded like a settle: the channel may wait for a reconnect.
        delivery = envelope.delivery
        try:
            async with asyncio.timeout(self._publish_timeout):
                await self._transport.reply(
                    delivery.reply_to or "",
                    _codec.fit_headers(reply, self._transport.header_budget),
                    task=envelope.task or "?",
                )
        except Exception as exc:
            log.warning(
                "reply_failed",
                message_id=delivery.message_id,
                correlation_id=delivery.correlation_id,
                error=repr(exc),
            )

    async def _publish(
        self, envelope: Envelope, exchange: str, routing_key: str, copy: Outgoing, *, what: str
    ) -> tuple[bool, BaseException | None]:
        """Publish a copy, confirmed: (True, None) once stored; (False, error) when the broker
        refused it; (False, None) when the outcome is unknown or the failure may be transient
        (then the delivery is released, never given up on)."""
        try:
            await self._transport.publish(
                exchange,
                routing_key,
                _codec.fit_headers(copy, self._transport.header_budget),
                task=envelope.task or "?",
                timeout=self._publish_timeout,
            )
        except _REFUSED as exc:
            log.error(f"{what}_refused", message_id=envelope.message_id, error=repr(exc))
            return False, exc
        except Exception as exc:
            log.warning(f"{what}_publish_failed", message_id=envelope.message_id, error=repr(exc))
            return False, None
        return True, None

    # --- telling the broker, bounded ---------------------------------------------------------

    async def _release(self, envelope: Envelope, error: str) -> Settled:
        """Requeue: the copy could not be published for now; the task runs again later."""
        delivery = _incoming(envelope)
        await self._bounded("release", envelope, lambda: delivery.reject(requeue=True))
        return Settled("released", {"attempt": envelope.attempt, "error": error})

    async def _ack(self, envelope: Envelope) -> None:
        delivery = _incoming(envelope)
        if getattr(delivery, "acks_at_once", False):
            # A batched ack (`amqtask._consume`) only queues its tag: no timer needed to bound it.
            try:
                await delivery.ack()
            except Exception as exc:
                log.warning(
                    "settle_failed", how="ack", message_id=envelope.message_id, error=repr(exc)
                )
            return
        await self._bounded("ack", envelope, delivery.ack)

    async def _broker_dead_letter(self, envelope: Envelope) -> None:
        """The last resort: the queue's dead-letter exchange takes the message as it is."""
        delivery = _incoming(envelope)
        await self._bounded("reject", envelope, lambda: delivery.reject(requeue=False))

    async def _bounded(
        self, how: str, envelope: Envelope, settle: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            async with asyncio.timeout(self._settle_timeout):
                await settle()
        except Exception as exc:
            # The delivery's channel died (e.g. a reconnect) or its connection is stuck: the tag
            # is void, and the broker redelivers the message. At-least-once: the handler may see
            # it again.
            log.warning("settle_failed", how=how, message_id=envelope.message_id, error=repr(exc))


def _incoming(envelope: Envelope) -> IncomingDelivery:
    return cast(IncomingDelivery, envelope.delivery)  # the worker opens envelopes of these
