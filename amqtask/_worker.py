"""The worker: consume, validate, run the handler, then settle. At-least-once.

Every delivery ends in exactly one of:
- handler returned            -> ack (only now: a crash before this means redelivery);
- undecodable or invalid      -> a copy with the reason in its headers is published to the
                                 dead-letter queue and confirmed, then the original is acked;
- handler raised, retries left -> a copy for the next attempt goes through the broker's delay
                                 levels (backoff), confirmed, then the original is acked;
- handler raised, no retry     -> dead-lettered with the exception's type, message, traceback,
                                 attempt count and first/last failure times;
- handler raised `Reject`      -> dead-lettered at once;
- shutdown before it finished -> left unacked: the broker redelivers it to another consumer.

A call (a delivery with `reply_to`) is the same task with an answer: the worker replies with the
result, or with the error next to the dead-lettering (a call is never retried), and drops a call
whose caller stopped waiting before it could start (`call_expired`; acked, not run).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from amqtask import _codec, _tracing
from amqtask._app import App, Handler
from amqtask._contract import Contract
from amqtask._exceptions import AmqtaskError, DecodeError, Reject
from amqtask._metrics import WorkerMetrics
from amqtask._transport import SETTLE_ERRORS, IncomingDelivery, Subscription
from amqtask.routing import delay_routing_key, delay_seconds, due_queue_name

log = structlog.get_logger("amqtask.worker")

_DEAD_LETTER_ERRORS: tuple[type[BaseException], ...] = (AmqtaskError, *SETTLE_ERRORS)
_RETRY_ERRORS: tuple[type[BaseException], ...] = (*_DEAD_LETTER_ERRORS, ValueError)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How many tasks run at once, how many deliveries are held, how long shutdown waits."""

    concurrency: int = 10
    prefetch: int | None = None  # default: concurrency
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.prefetch is not None and self.prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {self.prefetch}")

    @property
    def effective_prefetch(self) -> int:
        return self.concurrency if self.prefetch is None else self.prefetch


class Worker:
    """Consumes the queues of the app's contracts that have handlers."""

    def __init__(
        self,
        app: App,
        settings: WorkerSettings | None = None,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if not app.handlers:
            raise AmqtaskError("the app has no handlers: register them with @app.handler(...)")
        self.app = app
        self.settings = settings or WorkerSettings()
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.concurrency, thread_name_prefix="amqtask-handler"
        )
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()  # every delivery's task, started or waiting
        self._running: set[asyncio.Task[Any]] = set()  # those whose handler has started
        self._stopping = False
        self._contracts = app.handled
        self.counts: dict[str, int] = defaultdict(int)
        self.metrics = metrics
        self._watch: asyncio.Task[None] | None = None
        self.abandoned = 0  # handlers still running when shutdown gave up on them

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue this worker consumes: each handled work queue, then its due queue."""
        return tuple(self._work_queue_of)

    @property
    def _work_queue_of(self) -> dict[str, str]:
        """Each consumed queue and the work queue whose tasks it holds.

        A due queue holds the work queue's delayed sends and retries: they run with the same
        handlers and are retried and dead-lettered under the work queue's name.
        """
        work = dict.fromkeys(handler.contract.queue for handler in self.app.handlers.values())
        return {source: queue for queue in work for source in (queue, due_queue_name(queue))}

    async def start(self) -> None:
        """Connect, check the queues exist, and start consuming.

        Raises `TopologyMissing` when `amqtask declare` has not created the queues.
        """
        prefetch = self.settings.effective_prefetch
        try:
            await self.app.connect(queues=self.queues)
            for source, queue in self._work_queue_of.items():
                subscription = await self.app.transport.consume(
                    source, self._consumer(queue), prefetch=prefetch
                )
                self._subscriptions.append(subscription)
        except BaseException:
            self._executor.shutdown(wait=False)
            await self.app.close()
            raise
        if self.metrics is not None:
            self.metrics.prefetch.set(prefetch)
            self._watch = asyncio.create_task(self._watch_connection(self.metrics))
        log.info(
            "worker_started",
            queues=list(self.queues),
            tasks=sorted(f"{name} v{version}" for name, version in self._contracts),
            concurrency=self.settings.concurrency,
            prefetch=prefetch,
        )

    async def _watch_connection(self, metrics: WorkerMetrics) -> None:
        while True:
            metrics.set_connected(self.app.transport.connected)
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """Stop consuming, let running handlers finish (up to `shutdown_timeout`), and close.

        Handlers still running after the timeout are cancelled and their messages left unacked,
        so the broker redelivers them.
        """
        if self._stopping:
            return
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        for subscription in self._subscriptions:
            await subscription.cancel()
        running = set(self._running)
        log.info("worker_stopping", in_flight=len(running), timeout=self.settings.shutdown_timeout)
        if running:
            _, pending = await asyncio.wait(running, timeout=self.settings.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                self.abandoned = len(pending)
                log.warning("worker_abandoned_tasks", count=len(pending))
                await asyncio.wait(pending, timeout=1.0)
        for task in self._tasks:
            task.cancel()  # deliveries that never started: they stay unacked
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self.app.close()
        log.info("worker_stopped", **dict(self.counts))

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until `stop` is set, then stop gracefully."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def _consumer(self, queue: str) -> Any:
        async def on_message(delivery: IncomingDelivery) -> None:
            # Our own task, not the client library's delivery task: aiormq cancels those when the
            # connection drops, which would abort a handler halfway. A handler runs to its end;
            # if its channel died meanwhile, the ack fails, is logged, and the broker redelivers.
            task = asyncio.create_task(self._guarded(queue, delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_message

    async def _guarded(self, queue: str, delivery: IncomingDelivery) -> None:
        async with self._slots:
            if self._stopping:
                return  # not started: left unacked, redelivered once our channel closes
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            metrics = self.metrics
            if metrics is not None:
                name = _codec.header_text((delivery.headers or {}).get(_codec.TASK))
                metrics.received.labels(name or "unknown").inc()
                metrics.in_flight.inc()
            try:
                await self._process(queue, delivery)
            finally:
                self._running.discard(task)
                if metrics is not None:
                    metrics.in_flight.dec()

    async def _process(self, queue: str, delivery: IncomingDelivery) -> None:
        started = time.perf_counter()
        message_id = delivery.message_id
        try:
            contract, payload = _codec.decode_task(delivery, self._contracts)
        except DecodeError as exc:
            task_name = _codec.header_text((delivery.headers or {}).get(_codec.TASK))
            await self._fail(
                queue, delivery, reason=exc.reason, error=exc.detail, exc=exc, decoded=False
            )
            self._outcome("rejected", task_name, message_id, started, reason=exc.reason)
            return
        if _codec.call_expired(delivery):
            # The caller has given up: nobody would read the result.
            await self._settle(delivery, "ack")
            self.counts["expired"] += 1
            log.warning(
                "call_expired",
                task=contract.name,
                message_id=message_id,
                correlation_id=delivery.correlation_id,
            )
            return
        handler = self.app.handlers[contract.key]
        attempt = _codec.attempt_of(delivery)
        try:
            result = await self._run_handler(handler, payload, delivery.headers)
        except Reject as signal:
            await self._fail(
                queue, delivery, reason=_codec.Reasons.REJECTED, error=signal.reason, exc=signal
            )
            self._outcome(
                "rejected",
                contract.name,
                message_id,
                started,
                reason="rejected",
                error=signal.reason,
            )
            return
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            # A call's caller is waiting: its failure is answered, not retried later.
            if delivery.reply_to is None and contract.retry.retries(exc, attempt):
                delay = await self._retry(queue, delivery, contract, attempt, exc)
                self._outcome(
                    "retried",
                    contract.name,
                    message_id,
                    started,
                    attempt=attempt,
                    retry_in_s=delay,
                    error=error,
                )
                return
            await self._fail(
                queue,
                delivery,
                reason=_codec.Reasons.HANDLER_ERROR,
                error=error,
                exc=exc,
                answer=str(exc),  # the caller gets the type separately, as RemoteError's
            )
            self._outcome(
                "failed", contract.name, message_id, started, attempt=attempt, error=error
            )
            return
        if delivery.reply_to and not await self._reply(queue, contract, delivery, result):
            self._outcome(
                "failed",
                contract.name,
                message_id,
                started,
                attempt=attempt,
                reason=_codec.Reasons.INVALID_RESULT,
            )
            return
        await self._settle(delivery, "ack")
        self._outcome("succeeded", contract.name, message_id, started, attempt=attempt)

    async def _retry(
        self,
        queue: str,
        delivery: IncomingDelivery,
        contract: Contract[Any, Any],
        attempt: int,
        exc: BaseException,
    ) -> int | None:
        """Re-publish through the delay levels for the next attempt, confirmed, then ack.

        The worker holds nothing while the task waits: the delay is a broker queue's TTL.
        Returns the delay in seconds, or None if the copy could not be published (then the task
        is dead-lettered rather than lost or retried in a tight loop).
        """
        copy = _codec.retry_copy(delivery, attempt=attempt + 1, exc=exc)
        try:
            seconds = delay_seconds(contract.retry.delay_before(attempt + 1))
            await self.app.transport.publish(
                self.app.names.delay_entry_exchange,
                delay_routing_key(seconds, queue),
                copy,
                task=contract.name,
                timeout=self.app.publish_timeout,
            )
        except _RETRY_ERRORS as publish_error:
            log.error(
                "retry_publish_failed", message_id=delivery.message_id, error=repr(publish_error)
            )
            await self._dead_letter(
                queue,
                delivery,
                reason=_codec.Reasons.HANDLER_ERROR,
                error=f"{type(exc).__name__}: {exc} (no retry: {publish_error})",
                exc=exc,
            )
            return None
        await self._settle(delivery, "ack")
        return seconds

    async def _reply(
        self, queue: str, contract: Contract[Any, Any], delivery: IncomingDelivery, result: Any
    ) -> bool:
        """Answer a call with the handler's result, checked against the output model.

        A result that does not fit is answered with an error and dead-lettered: returns False.
        """
        try:
            reply = _codec.encode_reply(contract, result, request=delivery)
        except ValidationError as exc:
            output = getattr(contract.output, "__name__", repr(contract.output))
            error = f"the handler's result does not fit {output}: {exc}"
            await self._fail(
                queue, delivery, reason=_codec.Reasons.INVALID_RESULT, error=error, exc=exc
            )
            return False
        await self._send_reply(delivery, reply)
        return True

    async def _fail(
        self,
        queue: str,
        delivery: IncomingDelivery,
        *,
        reason: str,
        error: str,
        exc: BaseException,
        answer: str | None = None,
        decoded: bool = True,
    ) -> None:
        """Answer a waiting caller with why its request failed, then dead-letter the delivery.

        `answer` is what the caller reads (default: `error`). A delivery that was never
        `decoded` gets no traceback in the reply and no exception details on its dead letter.
        """
        await self._reply_error(
            delivery,
            reason=reason,
            error=error if answer is None else answer,
            exc=exc,
            traceback=decoded,
        )
        await self._dead_letter(
            queue, delivery, reason=reason, error=error, exc=exc if decoded else None
        )

    async def _reply_error(
        self,
        delivery: IncomingDelivery,
        *,
        reason: str,
        error: str,
        exc: BaseException | None = None,
        traceback: bool = True,
    ) -> None:
        """Tell a waiting caller why its call failed (nothing for a task sent without reply_to)."""
        if delivery.reply_to:
            reply = _codec.error_reply(
                delivery, reason=reason, error=error, exc=exc, traceback=traceback
            )
            await self._send_reply(delivery, reply)

    async def _send_reply(self, delivery: IncomingDelivery, reply: _codec.Outgoing) -> None:
        # Through the default exchange to the caller's direct reply-to address, and not
        # `mandatory`: RabbitMQ 3.10 returns those as unroutable. A caller that has gone makes
        # the broker drop the reply (at-most-once); a publish that fails is logged, not retried.
        assert delivery.reply_to
        try:
            await self.app.transport.publish(
                "",
                delivery.reply_to,
                reply,
                task=_codec.header_text(reply.headers.get(_codec.TASK)) or "?",
                timeout=self.app.publish_timeout,
                mandatory=False,
            )
        except _DEAD_LETTER_ERRORS as exc:
            log.warning(
                "reply_failed",
                message_id=delivery.message_id,
                correlation_id=delivery.correlation_id,
                error=repr(exc),
            )

    async def _run_handler(
        self, handler: Handler, payload: Any, headers: Mapping[str, Any] | None = None
    ) -> Any:
        if not _tracing.ENABLED:
            return await self._call(handler, payload)
        with _tracing.consumer_span(headers or {}, handler.contract.name):
            return await self._call(handler, payload)

    async def _call(self, handler: Handler, payload: Any) -> Any:
        if handler.is_async:
            return await handler.func(payload)
        loop = asyncio.get_running_loop()
        # The thread runs in a copy of this context, so the handler sees the current span.
        context = contextvars.copy_context()
        return await loop.run_in_executor(self._executor, context.run, handler.func, payload)

    async def _dead_letter(
        self,
        queue: str,
        delivery: IncomingDelivery,
        *,
        reason: str,
        error: str,
        exc: BaseException | None = None,
    ) -> None:
        """Publish a copy with the reason to the dead-letter queue, confirmed, then ack.

        If that publish fails, the original is rejected instead: the queue's dead-letter
        exchange still routes it to the dead-letter queue, without the reason headers.
        """
        copy = _codec.dead_letter(delivery, queue=queue, reason=reason, error=error, exc=exc)
        try:
            await self.app.transport.publish(
                self.app.names.dead_letter_exchange,
                queue,
                copy,
                task=_codec.header_text((delivery.headers or {}).get(_codec.TASK)) or "?",
                timeout=self.app.publish_timeout,
            )
        except _DEAD_LETTER_ERRORS as publish_error:
            log.error(
                "dead_letter_publish_failed",
                message_id=delivery.message_id,
                queue=queue,
                error=repr(publish_error),
            )
            await self._settle(delivery, "reject")
            return
        await self._settle(delivery, "ack")

    async def _settle(self, delivery: IncomingDelivery, how: str) -> None:
        try:
            if how == "ack":
                await delivery.ack()
            else:
                await delivery.reject(requeue=False)
        except SETTLE_ERRORS as exc:
            # The delivery's channel died (e.g. a reconnect): its tag is void and the broker
            # redelivers the message. At-least-once: the handler may see it again.
            log.warning("settle_failed", how=how, message_id=delivery.message_id, error=repr(exc))

    def _outcome(
        self,
        outcome: str,
        task: str | None,
        message_id: str | None,
        started: float,
        **extra: Any,
    ) -> None:
        self.counts[outcome] += 1
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.outcome(outcome, task, seconds, extra.get("reason"))
        level = log.info if outcome in ("succeeded", "retried") else log.warning
        level(
            f"task_{outcome}",
            task=task,
            message_id=message_id,
            duration_ms=round(seconds * 1000, 3),
            outcome=outcome,
            **extra,
        )
