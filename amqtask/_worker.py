"""The worker: consume, validate, run the handler, then settle. At-least-once.

Every delivery ends in exactly one of:
- handler returned            -> ack (only now: a crash before this means redelivery);
- undecodable or invalid      -> a copy with the reason in its headers is published to the
                                 dead-letter queue and confirmed, then the original is acked;
- handler raised              -> the same, with the exception's type, message and traceback;
- shutdown before it finished -> left unacked: the broker redelivers it to another consumer.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from amqtask import _codec
from amqtask._app import App, Handler
from amqtask._exceptions import AmqtaskError, DecodeError
from amqtask._transport import SETTLE_ERRORS, IncomingDelivery, Subscription

log = structlog.get_logger("amqtask.worker")

_DEAD_LETTER_ERRORS: tuple[type[BaseException], ...] = (AmqtaskError, *SETTLE_ERRORS)


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

    def __init__(self, app: App, settings: WorkerSettings | None = None) -> None:
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

    @property
    def queues(self) -> tuple[str, ...]:
        return tuple(
            dict.fromkeys(handler.contract.queue for handler in self.app.handlers.values())
        )

    async def start(self) -> None:
        """Connect, check the queues exist, and start consuming.

        Raises `TopologyMissing` when `amqtask declare` has not created the queues.
        """
        await self.app.connect()
        await self.app.transport.ensure_exists(self.app.topology, self.queues)
        prefetch = self.settings.effective_prefetch
        for queue in self.queues:
            subscription = await self.app.transport.consume(
                queue, self._consumer(queue), prefetch=prefetch
            )
            self._subscriptions.append(subscription)
        log.info(
            "worker_started",
            queues=list(self.queues),
            tasks=sorted(f"{name} v{version}" for name, version in self._contracts),
            concurrency=self.settings.concurrency,
            prefetch=prefetch,
        )

    async def stop(self) -> None:
        """Stop consuming, let running handlers finish (up to `shutdown_timeout`), and close.

        Handlers still running after the timeout are cancelled and their messages left unacked,
        so the broker redelivers them.
        """
        if self._stopping:
            return
        self._stopping = True
        for subscription in self._subscriptions:
            await subscription.cancel()
        running = set(self._running)
        log.info("worker_stopping", in_flight=len(running), timeout=self.settings.shutdown_timeout)
        if running:
            _, pending = await asyncio.wait(running, timeout=self.settings.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
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
            try:
                await self._process(queue, delivery)
            finally:
                self._running.discard(task)

    async def _process(self, queue: str, delivery: IncomingDelivery) -> None:
        started = time.perf_counter()
        message_id = delivery.message_id
        try:
            contract, payload = _codec.decode_task(delivery, self._contracts)
        except DecodeError as exc:
            task_name = _codec.header_text((delivery.headers or {}).get(_codec.TASK))
            await self._dead_letter(queue, delivery, reason=exc.reason, error=exc.detail)
            self._outcome("rejected", task_name, message_id, started, reason=exc.reason)
            return
        handler = self.app.handlers[contract.key]
        try:
            await self._run_handler(handler, payload)
        except Exception as exc:
            await self._dead_letter(
                queue,
                delivery,
                reason=_codec.Reasons.HANDLER_ERROR,
                error=f"{type(exc).__name__}: {exc}",
                exc=exc,
            )
            self._outcome(
                "failed", contract.name, message_id, started, error=f"{type(exc).__name__}: {exc}"
            )
            return
        await self._settle(delivery, "ack")
        self._outcome("succeeded", contract.name, message_id, started)

    async def _run_handler(self, handler: Handler, payload: Any) -> Any:
        if handler.is_async:
            return await handler.func(payload)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, handler.func, payload)

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
        level = log.info if outcome == "succeeded" else log.warning
        level(
            f"task_{outcome}",
            task=task,
            message_id=message_id,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            outcome=outcome,
            **extra,
        )
