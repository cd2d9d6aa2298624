"""Unit tests of the event loop choice (`amqtask.run`, `worker --loop`)."""

from __future__ import annotations

import asyncio
import sys

import pytest

import amqtask
from amqtask._loops import loop_factory


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_run_runs_the_coroutine_on_the_loop_asked_for_and_returns_its_result(loop: str) -> None:
    assert amqtask.run(loop_module(), loop=loop) == loop


def test_run_on_an_unknown_loop_raises_value_error_and_runs_nothing() -> None:
    ran = []

    async def main() -> None:
        ran.append(1)

    with pytest.raises(ValueError, match="asyncio, uvloop"):
        amqtask.run(main(), loop="trio")
    assert ran == []


def test_uvloop_missing_is_an_error_that_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError

    with pytest.raises(amqtask.AmqtaskError, match=r"pip install 'amqtask\[uvloop\]'"):
        loop_factory("uvloop")
