"""Which event loop runs amqtask: asyncio's own, or uvloop's (the `uvloop` extra).

uvloop runs the same asyncio code on libuv, with its sockets, timers and callbacks in C: less
CPU per message for the connection's reads and writes and for the loop's own bookkeeping, the
parts of a no-op task amqtask cannot trim (see the benchmark). `amqtask worker --loop uvloop`
runs a worker on it; `amqtask.run(main(), loop="uvloop")` runs a producer's `main` on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from amqtask._exceptions import AmqtaskError

T = TypeVar("T")

LOOPS = ("asyncio", "uvloop")


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes a new event loop of kind `loop` (None: asyncio's default).

    Raises `ValueError` for an unknown kind, `AmqtaskError` when uvloop is not installed.
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise AmqtaskError(
            "the uvloop event loop is not installed: pip install 'amqtask[uvloop]'"
        ) from None
    new_event_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_event_loop


def run(main: Coroutine[Any, Any, T], *, loop: str = "asyncio") -> T:
    """Run `main` to its end on a new event loop of kind `loop`, "asyncio" or "uvloop", and
    return its result: `asyncio.run`, on the loop chosen.

    Raises what `main` raises; `ValueError` for an unknown loop and `AmqtaskError` when uvloop
    is not installed (then `main` is closed without running).
    """
    try:
        factory = loop_factory(loop)
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
