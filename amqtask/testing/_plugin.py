"""The pytest plugin (entry point `amqtask`): fixtures that run your app in memory.

Define an `amqtask_app` fixture returning your `App` (or a list of apps: a worker's and a
producer's); a test then asks for `amqtask_testapp` (the entered `TestApp`) and, if it needs
it, `amqtask_clock` (its `VirtualClock`). Works with pytest-asyncio (auto or strict mode) and
with anyio's plugin (backend "asyncio").

Nothing of amqtask is imported until a fixture is used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from amqtask.testing import TestApp, VirtualClock


@pytest.fixture
def amqtask_app() -> Any:
    """Your app (or a list of apps) for `amqtask_testapp`: override this fixture."""
    pytest.fail(
        "define an `amqtask_app` fixture returning your amqtask.App (or a list of apps) "
        "to use `amqtask_testapp`",
        pytrace=False,
    )


async def _testapp(amqtask_app: Any) -> AsyncIterator[TestApp]:
    """The apps of `amqtask_app` running on an in-memory broker, their workers started."""
    from amqtask.testing import TestApp

    apps = amqtask_app if isinstance(amqtask_app, list | tuple) else [amqtask_app]
    async with TestApp(*apps) as testapp:
        yield testapp


try:  # marked for pytest-asyncio, which runs only marked async fixtures in its strict mode
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - anyio's plugin alone
    _async_fixture = pytest.fixture  # type: ignore[assignment]  # the same call, unmarked

amqtask_testapp = _async_fixture(_testapp, name="amqtask_testapp")


@pytest.fixture
def amqtask_clock(amqtask_testapp: TestApp) -> VirtualClock:
    """The virtual clock of `amqtask_testapp` (`now()`, `utcnow()`, `advance(...)`)."""
    return amqtask_testapp.clock


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: Any, request: pytest.FixtureRequest) -> Any:
    """In an anyio test, hand `amqtask_testapp` to anyio's runner: unmarked, pytest-asyncio
    (in strict mode) leaves it alone."""
    if fixturedef.func is not _testapp or "anyio_backend" not in request.fixturenames:
        return (yield)

    async def unmarked(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for value in _testapp(*args, **kwargs):
            yield value

    fixturedef.func = unmarked
    try:
        return (yield)
    finally:
        fixturedef.func = _testapp
