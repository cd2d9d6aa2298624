"""The app's side of the task store: `send` records, `App.task`, `App.result`, `App.revoke`.

`send` records `queued` (or `scheduled`) after the broker's confirm, through the app's group
commit: it does not wait for the store, and a store that is down costs only that record (kept
in memory until the store is back). `App.task` first writes what this app still holds, so a
process reads its own sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from amqtask import _codec, _wallclock
from amqtask._codec import Outgoing
from amqtask._exceptions import (
    AmqtaskError,
    RemoteError,
    ResultTimeout,
    StoreUnavailable,
    TaskRevoked,
)
from amqtask.routing import DELAY_LEVELS
from amqtask.store._model import TaskInfo, TaskState, Transition
from amqtask.store._recorder import Recorder

if TYPE_CHECKING:
    from amqtask._contract import Contract
    from amqtask._transport import Transport
    from amqtask.routing import Names
    from amqtask.store import Store

log = structlog.get_logger("amqtask.store")

RECHECK = 5.0  # seconds between reads of a task waited for, should an announcement be missed
REVOKE_TIMEOUT = 10.0  # seconds the revocation broadcast may take to be confirmed


class TaskClient:
    """An app's store: what it records and what it asks."""

    def __init__(
        self,
        store: Store,
        contracts: Mapping[tuple[str, int], Contract[Any, Any]],
        names: Names,
        transport: Transport,
    ) -> None:
        self.store = store
        self.recorder = Recorder(store)
        self._contracts, self._names, self._transport = contracts, names, transport

    async def connect(self) -> None:
        """Open the store and check its tables. A store that cannot be reached is logged
        (`store_unavailable`) and does not stop the app: its records wait in memory. Raises
        `StoreMissing` when its tables are absent or of another version."""
        await self.store.open()
        try:
            await self.store.check()
        except StoreUnavailable as exc:
            log.warning("store_unavailable", store=self.store.url, error=str(exc))

    async def close(self) -> None:
        await self.recorder.close()
        await self.store.close()

    def sent(
        self, contract: Contract[Any, Any], message_id: str, exchange: str, routing_key: str
    ) -> None:
        """Record a send the broker confirmed (to `exchange` with `routing_key`)."""
        now = _wallclock.now()
        delay = None
        if exchange == self._names.delay_entry_exchange:
            # The inverse of `delay_routing_key`: the delay's bits, most significant first.
            delay = int("".join(routing_key.split(".", DELAY_LEVELS)[:DELAY_LEVELS]), 2)
        self.recorder.record(
            Transition(
                id=message_id,
                task=contract.name,
                version=contract.version,
                state=TaskState.QUEUED if delay is None else TaskState.SCHEDULED,
                attempt=0,
                at=now,
                due_at=None if delay is None else now + delay,
                keep=contract.keep_result,
            )
        )

    # --- asking -----------------------------------------------------------------------------

    async def task(self, task_id: str) -> TaskInfo | None:
        if self.recorder.pending:
            await self.recorder.flush(timeout=2.0)
        row = await self.store.get(task_id)
        return None if row is None else self.info(row)

    def info(self, row: Mapping[str, Any]) -> TaskInfo:
        """A row as a `TaskInfo`, its result typed by the contract when this app knows it."""
        info = TaskInfo.from_row(row)
        if info.result_json is None:
            return info
        contract = self._contracts.get((info.task or "", info.version or 0))
        try:
            if contract is not None and contract.output is not None:
                result = _codec._adapter(contract.output).validate_json(info.result_json)
            else:
                result = orjson.loads(info.result_json)
        except Exception:  # a result kept by another version of the contract
            result = orjson.loads(info.result_json)
        return replace(info, result=result)

    async def result(self, contract: Contract[Any, Any], task_id: str, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self.store.watch(task_id) as watch:
            while True:
                row = await self.store.get(task_id)
                if row is not None and TaskState(row["state"]).final:
                    return self._outcome(contract, task_id, self.info(row))
                remaining = deadline - loop.time()
                if remaining <= 0:
                    state = "unknown to the store" if row is None else f"{row['state']}"
                    raise ResultTimeout(
                        f"task {contract.name!r} {task_id} did not finish within {timeout:g} s "
                        f"(it is {state})",
                        task=contract.name,
                        correlation_id=task_id,
                    )
                await watch.wait(min(remaining, RECHECK))

    def _outcome(self, contract: Contract[Any, Any], task_id: str, info: TaskInfo) -> Any:
        if info.state is TaskState.SUCCEEDED:
            return info.result
        if info.state is TaskState.REVOKED:
            raise TaskRevoked(
                f"task {contract.name!r} {task_id} was revoked",
                task=contract.name,
                correlation_id=task_id,
            )
        raise RemoteError(
            task=contract.name,
            correlation_id=task_id,
            reason=info.reason or "failed",
            remote_type=info.error_type or "unknown",
            remote_message=info.error or "",
            remote_traceback=info.traceback or "",
        )

    async def revoke(self, task_id: str, *, terminate: bool) -> None:
        await self.store.revoke(task_id, terminate=terminate)
        message = Outgoing(
            body=orjson.dumps({"id": task_id, "terminate": terminate}),
            message_id=_codec.new_message_id(),
        )
        try:
            await self._transport.publish(
                self._names.revoke_exchange,
                "",
                message,
                task="revoke",
                timeout=REVOKE_TIMEOUT,
                mandatory=False,  # no worker running: nobody to tell now
            )
        except (AmqtaskError, ConnectionError) as exc:
            # Stored already: workers read it from the store within a second or so, and at
            # start. Only `terminate` of a task running now needs the broadcast.
            log.warning("revocation_broadcast_failed", message_id=task_id, error=repr(exc))

    async def tasks(
        self, *, state: str | None, task: str | None, since: float | None, limit: int
    ) -> list[TaskInfo]:
        if self.recorder.pending:
            await self.recorder.flush(timeout=2.0)
        rows = await self.store.listing(state=state, task=task, since=since, limit=limit)
        return [self.info(row) for row in rows]
