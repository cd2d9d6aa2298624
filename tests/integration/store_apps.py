"""`apps/store_app.py` imported in the test's own process too, on the test's names."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType

from tests.integration import apps
from tests.integration.conftest import delete_topology

APP = "tests.integration.apps.store_app"


@asynccontextmanager
async def store_app(unique: str, broker_url: str, store_url: str) -> AsyncIterator[ModuleType]:
    """The worker's app module with the same contracts as the worker's (it reads its names from
    the environment), declared; closed and its topology deleted on exit."""
    names = {"TEST_UNIQUE": unique, "TEST_BROKER_URL": broker_url, "TEST_STORE_URL": store_url}
    os.environ.update(names)
    _forget()
    module = importlib.import_module(APP)
    try:
        await module.app.declare()
        yield module
    finally:
        await module.app.close()
        await delete_topology(broker_url, module.app.topology)
        for name in names:
            os.environ.pop(name, None)
        _forget()


def _forget() -> None:
    """A fresh import next time, with the next test's names."""
    sys.modules.pop(APP, None)
    if hasattr(apps, "store_app"):
        delattr(apps, "store_app")
