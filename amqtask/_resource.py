"""What `async with` does for a thing closed by an async `close()`: enter gives the thing, exit
closes it (anyio's `AsyncResource`)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncResource:
    """An async context manager that gives itself and awaits `close()` on the way out, however
    the block ends. A subclass writes `close()`; one that does more on entering (connecting)
    overrides `__aenter__`."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
