"""The app: contracts, handlers, a connection, and confirmed sends."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from pydantic import BaseModel

from amqtask import _codec, topology
from amqtask._contract import Contract, In, Out
from amqtask._exceptions import ContractError
from amqtask._transport import AioPikaTransport, Transport
from amqtask.routing import DEFAULT_NAMESPACE, Names

HandlerFunc = Callable[[Any], Awaitable[Any]] | Callable[[Any], Any]
F = TypeVar("F", bound=HandlerFunc)


@dataclass(frozen=True, slots=True)
class Handler:
    """A contract's handler and how to run it."""

    contract: Contract[Any, Any]
    func: HandlerFunc
    is_async: bool


class App:
    """Contracts, their handlers, and one broker connection.

    Producers and workers build the same app from the same contracts; only workers register
    handlers. Use it as an async context manager to connect and close.
    """

    def __init__(
        self,
        url: str,
        contracts: Iterable[Contract[Any, Any]],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        publish_timeout: float | None = 30.0,
        name: str = "amqtask",
        transport: Transport | None = None,
    ) -> None:
        """`publish_timeout` bounds how long `send` waits for a confirm (None: no bound).

        Raises `ContractError` when two contracts share a name and version, or a queue with
        different settings.
        """
        self.url = url
        self.names = Names(namespace)
        self.publish_timeout = publish_timeout
        self._contracts: dict[tuple[str, int], Contract[Any, Any]] = {}
        for contract in contracts:
            if contract.key in self._contracts and self._contracts[contract.key] != contract:
                raise ContractError(f"task {contract.name!r} v{contract.version} is defined twice")
            self._contracts[contract.key] = contract
        self.topology = topology.derive(self._contracts.values(), self.names)
        self.handlers: dict[tuple[str, int], Handler] = {}
        self.transport: Transport = transport or AioPikaTransport(url, name=name)

    @property
    def contracts(self) -> tuple[Contract[Any, Any], ...]:
        return tuple(self._contracts.values())

    def contract(self, name: str, version: int | None = None) -> Contract[Any, Any]:
        """Look a contract up by task name (the highest version unless one is given)."""
        found = [c for c in self._contracts.values() if c.name == name]
        if version is not None:
            found = [c for c in found if c.version == version]
        if not found:
            known = ", ".join(sorted({c.name for c in self._contracts.values()}))
            raise ContractError(f"no task {name!r} in this app (known: {known or 'none'})")
        return max(found, key=lambda c: c.version)

    def _own(self, contract: Contract[Any, Any]) -> Contract[Any, Any]:
        if self._contracts.get(contract.key) != contract:
            raise ContractError(
                f"task {contract.name!r} v{contract.version} is not among this app's contracts; "
                "pass it to App(contracts=[...])"
            )
        return contract

    def handler(self, contract: Contract[In, Out]) -> Callable[[F], F]:
        """Register the function that runs `contract`'s tasks (worker side only).

        An `async def` runs on the event loop; a plain `def` runs in a worker thread.
        """
        self._own(contract)

        def register(func: F) -> F:
            if contract.key in self.handlers:
                raise ContractError(f"task {contract.name!r} already has a handler")
            self.handlers[contract.key] = Handler(contract, func, inspect.iscoroutinefunction(func))
            return func

        return register

    @property
    def handled(self) -> Mapping[tuple[str, int], Contract[Any, Any]]:
        return {key: handler.contract for key, handler in self.handlers.items()}

    # --- connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        await self.transport.connect()

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- producing --------------------------------------------------------------------------

    async def send(
        self,
        contract: Contract[In, Any],
        payload: In | Mapping[str, Any],
        *,
        timeout: float | None = None,
    ) -> str:
        """Validate, publish persistent and mandatory, and wait for the broker's confirm.

        Returns the message id (stable across redeliveries: use it for idempotency).
        Raises pydantic's `ValidationError` (nothing published), `Unroutable`, `PublishNacked`,
        or `PublishTimeout` after `timeout` (default: the app's `publish_timeout`).
        """
        self._own(contract)
        message = _codec.encode_task(contract, cast(BaseModel | Mapping[str, Any], payload))
        await self.transport.publish(
            self.names.task_exchange,
            contract.routing_key,
            message,
            task=contract.name,
            timeout=self.publish_timeout if timeout is None else timeout,
        )
        return message.message_id

    # --- topology ---------------------------------------------------------------------------

    async def plan(self) -> topology.Plan:
        """Compare the contracts' topology with the broker. Changes nothing."""
        return await self.transport.plan(self.topology)

    async def declare(self) -> topology.Plan:
        """Create what is missing; return the plan as it stood before.

        Raises `TopologyConflict` (changing nothing) where the broker holds something different.
        """
        plan = await self.plan()
        await self.transport.apply(plan)
        return plan
