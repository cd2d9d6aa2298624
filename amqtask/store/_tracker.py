"""The worker's side of the task store: a pipeline step before the handler, a record after.

`Tracker.run` is the step between decoding and settling (see `amqtask._worker`). It yields an
outcome like the handler's run does:

1. a revoked task id: `Revoked()`, acked without running;
2. a `deduplicate` contract: the task id is claimed (owner and expiry, renewed while it runs).
   Already succeeded, or its effects committed: `Skipped`; revoked: `Revoked`; claimed by a
   live run elsewhere: wait (polling) until that run ends or its claim expires, for at most
   `busy_wait` seconds, then `Postponed` (released to the queue). While the store cannot be
   reached, the claim is retried with backoff: the task waits, holding its slot;
3. otherwise `running` is recorded and the handler runs, as a task of its own that a
   `revoke(terminate=True)` cancels (an `async def` at its current await; a process-pool child
   is killed; a thread cannot be stopped, so a plain `def` in a thread runs on).
4. A `deduplicate` task that succeeded waits for its `succeeded` to be stored before it is
   settled (acked): a copy redelivered after the ack finds it and is skipped.

`Tracker.settled` records the outcome (retrying, succeeded, failed, revoked) after settling.
Revoked ids are known in memory: loaded at start, added by the revocation broadcast (a fanout
exchange each worker binds a queue of its own to), and read from the store every
`sync_interval` seconds in case a broadcast was missed (a reconnect). The same loop renews
claims and deletes expired records in small batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from amqtask import _codec, _wallclock
from amqtask._exceptions import StoreError
from amqtask._execution import (
    Failed,
    Outcome,
    Postponed,
    Refused,
    Rejected,
    Revoked,
    Skipped,
    Succeeded,
)
from amqtask._startup import Backoff
from amqtask.store._model import DEFAULT_KEEP_RESULT, ClaimVerdict, TaskState, Transition
from amqtask.store._recorder import CURRENT_CLAIM, Recorder, RunningClaim

if TYPE_CHECKING:
    from amqtask._codec import Envelope
    from amqtask._settle import Settled
    from amqtask.routing import Names
    from amqtask.store import Store

log = structlog.get_logger("amqtask.worker")

SYNC_INTERVAL = 1.0  # seconds between reads of new revocations from the store
SYNC_OVERLAP = 10.0  # seconds re-read each time: a revocation committed late is still seen
CLEANUP_INTERVAL = 60.0
CLEANUP_BATCH = 500
_STORE_BACKOFF = Backoff(first=0.2, cap=5.0)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class _Run:
    """A handler running here, for `terminate`."""

    terminable: bool
    task: asyncio.Task[Outcome] | None = None
    terminated: bool = False

    def terminate(self) -> bool:
        if not self.terminable or self.task is None or self.task.done():
            return False
        self.terminated = True
        self.task.cancel()
        return True


class Tracker:
    """Records a worker's tasks in the store and applies revocations and claims."""

    def __init__(
        self,
        store: Store,
        recorder: Recorder,
        names: Names,
        transport: Any,
        *,
        sync_interval: float = SYNC_INTERVAL,
    ) -> None:
        self.store, self.recorder = store, recorder
        self._names, self._transport = names, transport
        self.worker = worker_name()
        self._id = uuid.uuid4().hex[:12]
        self._runs = 0
        self._revoked: dict[str, bool] = {}  # task id -> terminate
        self._running: dict[str, _Run] = {}
        self._claims: dict[str, str] = {}  # owner -> task id, renewed while running
        self._since = 0.0  # the store's time of the last revocation read
        self._sync_interval = sync_interval
        self.busy_wait = max(300.0, 10 * store.claim_ttl)
        self._maintainer: asyncio.Task[None] | None = None
        self._subscription: Any = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the revoked ids (raises `StoreUnavailable`: the worker waits for its store at
        start, so that no revoked task runs), listen for revocations, start the upkeep loop."""
        await self._sync()
        subscribe = getattr(self._transport, "subscribe_fanout", None)
        if subscribe is not None:
            exchange = self._names.revoke_exchange
            self._subscription = await subscribe(
                exchange, f"{exchange}.{self._id}", self._broadcast
            )
        self._maintainer = asyncio.create_task(self._maintain(), name="amqtask-store-upkeep")

    async def stop(self) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        if self._subscription is not None:
            await self._subscription.cancel()

    # --- revocations ------------------------------------------------------------------------

    def revoked(self, task_id: str) -> bool:
        return task_id in self._revoked

    def _broadcast(self, body: bytes) -> None:
        try:
            data = orjson.loads(body)
            self._revoke(str(data["id"]), bool(data.get("terminate")))
        except Exception as exc:  # someone else's message on our exchange: not a revocation
            log.warning("revocation_unreadable", error=repr(exc))

    def _revoke(self, task_id: str, terminate: bool) -> None:
        self._revoked[task_id] = terminate or self._revoked.get(task_id, False)
        run = self._running.get(task_id)
        if terminate and run is not None and not run.terminated:
            if run.terminate():
                log.info("task_terminating", message_id=task_id)
            elif not run.terminable:
                log.warning(
                    "task_not_terminable",
                    message_id=task_id,
                    why="a plain def handler runs in a thread, which cannot be stopped",
                )

    async def _sync(self) -> None:
        rows, now = await self.store.revocations(max(self._since - SYNC_OVERLAP, 0.0))
        for task_id, terminate in rows:
            self._revoke(task_id, terminate)
        self._since = now

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        next_renewal = next_cleanup = loop.time()
        renew_every = self.store.claim_ttl / 3
        failing = False
        while True:
            await asyncio.sleep(min(self._sync_interval, renew_every))
            try:
                await self._sync()
                now = loop.time()
                if now >= next_renewal and self._claims:
                    await self.store.renew(list(self._claims))
                    next_renewal = now + renew_every
                if now >= next_cleanup:
                    next_cleanup = now + CLEANUP_INTERVAL
                    for _ in range(10):
                        if await self.store.cleanup(CLEANUP_BATCH) < CLEANUP_BATCH:
                            break
                if failing:
                    failing = False
                    log.info("store_upkeep_restored", store=self.store.url)
            except StoreError as exc:
                if not failing:
                    failing = True
                    log.warning("store_upkeep_failed", store=self.store.url, error=str(exc))
            except Exception as exc:  # a defect: keep the loop alive, say so
                log.exception("store_upkeep_crashed", error=repr(exc))

    # --- the pipeline step ------------------------------------------------------------------

    async def run(
        self,
        envelope: Envelope,
        execute: Callable[[], Coroutine[Any, Any, Outcome]],
        *,
        terminable: bool,
    ) -> Outcome:
        """The task's outcome: revoked, skipped, postponed, or what `execute()` yields."""
        task_id, contract = envelope.message_id, envelope.contract
        if task_id is None or contract is None:
            return await execute()  # no id to track it by
        if task_id in self._revoked:
            return Revoked()
        running = self._transition(envelope, TaskState.RUNNING)
        owner = None
        if contract.deduplicate:
            self._runs += 1
            owner = f"{self.worker}:{self._id}:{self._runs}"
            refused = await self._claim(envelope, running, owner)
            if refused is not None:
                return refused
            self._claims[owner] = task_id
        else:
            self.recorder.record(running)
        run = _Run(terminable)
        self._running[task_id] = run
        token = CURRENT_CLAIM.set(
            None if owner is None else RunningClaim(self.store, task_id, owner)
        )
        try:
            run.task = asyncio.create_task(execute())
            if self._revoked.get(task_id):  # revoked with terminate while it was being claimed
                run.terminate()
            try:
                outcome = await run.task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if run.terminated and not (current is not None and current.cancelling()):
                    outcome = Revoked(terminated=True)
                else:
                    raise  # the worker's shutdown, not a revocation
            if owner is not None and isinstance(outcome, Succeeded):
                await self._completed(envelope, outcome)
            return outcome
        finally:
            CURRENT_CLAIM.reset(token)
            if self._running.get(task_id) is run:
                del self._running[task_id]
            if owner is not None:
                self._claims.pop(owner, None)

    async def _claim(self, envelope: Envelope, running: Transition, owner: str) -> Outcome | None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.busy_wait
        failures, busy = 0, False
        while True:
            if running.id in self._revoked:
                return Revoked()
            try:
                claim = await self.store.claim(running, owner)
            except StoreError as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "task_waiting_for_store",
                        task=envelope.task,
                        message_id=running.id,
                        error=str(exc),
                    )
                await asyncio.sleep(_STORE_BACKOFF.delay(failures, 0.5))
                continue
            if claim.verdict is ClaimVerdict.RUN:
                return None
            if claim.verdict is ClaimVerdict.DONE:
                return Skipped("already succeeded")
            if claim.verdict is ClaimVerdict.COMMITTED:
                # Its run committed its effects and died before saying how it ended: done.
                self.recorder.record(self._transition(envelope, TaskState.SUCCEEDED))
                return Skipped("effects committed")
            if claim.verdict is ClaimVerdict.REVOKED:
                return Revoked()
            if loop.time() >= give_up:
                return Postponed(f"claimed by another run for over {self.busy_wait:g} s")
            if not busy:
                busy = True
                log.info("task_claimed_elsewhere", task=envelope.task, message_id=running.id)
            await asyncio.sleep(0.2)

    async def _completed(self, envelope: Envelope, outcome: Succeeded) -> None:
        """Store a deduplicated task's success before it is acked (waits out an outage)."""
        transition = self._finished(envelope, outcome, "succeeded", {})
        assert transition is not None
        while not await self.recorder.committed(transition):
            log.error("task_completion_dropped", message_id=transition.id)  # buffer overflow

    # --- after settling ---------------------------------------------------------------------

    def settled(self, envelope: Envelope, outcome: Outcome, settled: Settled) -> None:
        contract = envelope.contract
        if settled.outcome == "succeeded" and contract is not None and contract.deduplicate:
            return  # stored before the ack
        transition = self._finished(envelope, outcome, settled.outcome, settled.details)
        if transition is not None:
            self.recorder.record(transition)

    def _transition(self, envelope: Envelope, state: TaskState, **values: Any) -> Transition:
        contract = envelope.contract
        return Transition(
            id=envelope.message_id or "",
            task=contract.name if contract is not None else envelope.task,
            version=contract.version if contract is not None else None,
            state=state,
            attempt=envelope.attempt,
            at=_wallclock.now(),
            worker=self.worker,
            keep=contract.keep_result if contract is not None else DEFAULT_KEEP_RESULT,
            **values,
        )

    def _finished(
        self, envelope: Envelope, outcome: Outcome, settled: str, details: dict[str, Any]
    ) -> Transition | None:
        if envelope.message_id is None:
            return None
        match outcome:
            case Succeeded(result) if settled == "succeeded":
                return self._transition(
                    envelope, TaskState.SUCCEEDED, result=_result_json(envelope, result)
                )
            case Revoked():
                return self._transition(envelope, TaskState.REVOKED)
            case Failed() | Rejected() | Refused() | Succeeded() if settled in (
                "retried",
                "failed",
                "rejected",
            ):
                exc = _exception(outcome)
                state = TaskState.RETRYING if settled == "retried" else TaskState.FAILED
                return self._transition(
                    envelope,
                    state,
                    error_type=None if exc is None else _codec.type_name(exc),
                    error=_codec.safe_text(exc if exc is not None else details.get("error", "")),
                    reason=details.get("reason"),
                    traceback=None if exc is None else _codec.trimmed_traceback(exc),
                )
        return None  # released, expired, skipped: the record stays as it was


def _exception(outcome: Outcome) -> BaseException | None:
    match outcome:
        case Failed(exc):
            return exc
        case Rejected(_, signal):
            return signal
        case Refused(problem):
            return problem
    return None


def _result_json(envelope: Envelope, result: Any) -> str | None:
    assert envelope.contract is not None
    try:
        return _codec.result_json(envelope.contract, result).decode()
    except Exception:  # not the output model: settled as invalid_result for a call
        return None
