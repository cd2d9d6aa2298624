"""Typed usage of `App.call`, checked by mypy (`mypy --strict tests/typing`), never run."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

from pydantic import BaseModel

import amqtask


class Resize(BaseModel):
    path: str
    width: int


class Resized(BaseModel):
    path: str
    size: int


resize = amqtask.contract("images.resize", Resize, returns=Resized)
notify = amqtask.contract("users.notify", Resize)
app = amqtask.App("amqp://guest:guest@localhost/", [resize, notify], call_timeout=10.0)


async def usage() -> None:
    async with app:
        out = await app.call(resize, Resize(path="a.png", width=64), timeout=5.0)
        assert_type(out, Resized)
        from_dict = await app.call(resize, {"path": "a.png", "width": 64})
        assert_type(from_dict, Resized)
        # A contract without `returns` is a Contract[Resize, None]: the call returns None.
        pending: Coroutine[Any, Any, None] = app.call(notify, Resize(path="a.png", width=1))
        await pending
        try:
            await app.call(resize, Resize(path="b.png", width=1))
        except amqtask.InvalidReply as exc:
            assert_type(exc.remote_message, str)
        except amqtask.RemoteError as exc:
            assert_type(exc.remote_type, str)
        except (amqtask.CallTimeout, amqtask.ConnectionLost) as exc:
            assert_type(exc.correlation_id, str)
