"""The wire format, as another language sees it: a Node.js client (amqplib) written from the
README's "Wire format" section sends tasks, a delayed task and calls to an amqtask worker; the
official AsyncAPI parser reads the document amqtask writes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

import amqtask
from amqtask._asyncapi import document

from . import nodejs
from .conftest import AppFactory, running, wait_for


class Notify(BaseModel):
    user: str
    text: str


class Resize(BaseModel):
    path: str
    width: int


class Resized(BaseModel):
    path: str
    size: int


@pytest.fixture(scope="module")
def node_modules() -> Path:
    try:
        return nodejs.node_modules()
    except nodejs.NodeMissing as exc:
        pytest.fail(f"the wire-format tests need Node.js packages: {exc}", pytrace=False)


async def node(modules: Path, *args: str, **env: str) -> list[dict[str, Any]]:
    """Run the Node.js client to its end; its JSON lines."""
    process = await asyncio.create_subprocess_exec(
        nodejs.node(),
        str(nodejs.CLIENT),
        *args,
        env={**os.environ, "NODE_PATH": str(modules), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, f"the Node.js client failed:\n{stderr.decode()}"
    return [json.loads(line) for line in stdout.decode().splitlines()]


async def test_a_nodejs_client_sends_tasks_and_makes_calls_from_the_documented_format(
    make_app: AppFactory, broker_url: str, unique: str, node_modules: Path
) -> None:
    notify = amqtask.contract(f"{unique}.notify", Notify)
    resize = amqtask.contract(f"{unique}.resize", Resize, returns=Resized)
    fail = amqtask.contract(f"{unique}.fail", Resize, returns=Resized)
    app = make_app([notify, resize, fail])
    notified: list[tuple[Notify, float]] = []

    @app.handler(notify)
    async def on_notify(task: Notify) -> None:
        notified.append((task, time.time()))

    @app.handler(resize)
    async def on_resize(task: Resize) -> Resized:
        return Resized(path=task.path, size=task.width * 2)

    @app.handler(fail)
    async def on_fail(task: Resize) -> Resized:
        raise ValueError(f"cannot read {task.path}")

    await app.declare()
    async with running(app):
        lines = await node(
            node_modules,
            "tasks",
            AMQP_URL=broker_url,
            NAMESPACE=app.names.namespace,
            NOTIFY=notify.name,
            RESIZE=resize.name,
            FAIL=fail.name,
        )
        await wait_for(lambda: len(notified) == 2, timeout=30)

    sent, delayed, result, failed, invalid, returned = lines
    assert sent["sent"]
    assert [task for task, _ in notified] == [
        Notify(user="ada", text="hello"),
        Notify(user="ada", text="later"),
    ]
    assert notified[1][1] >= delayed["before"] / 1000 + 0.9  # after its delay of 1 s
    assert result == {
        "task": resize.name,
        "result": {"path": "a.png", "size": 128},
        "contentType": "application/json",
        "correlated": True,
    }
    assert failed == {
        "task": fail.name,
        "error": {
            "reason": "handler_error",
            "message": "cannot read b.png",
            "type": "builtins.ValueError",
            "traceback": True,
        },
        "correlated": True,
    }
    assert invalid["error"]["reason"] == "invalid_payload"
    assert "width" in invalid["error"]["message"]
    assert returned == {"returned": []}  # every publish was routed


async def test_the_official_asyncapi_parser_accepts_the_document(
    tmp_path: Path, node_modules: Path
) -> None:
    notify = amqtask.contract("users.notify", Notify, queue="notifications")
    resize = amqtask.contract("images.resize", Resize, returns=Resized, queue="images")
    resize_v2 = amqtask.contract("images.resize", Resize, returns=Resized, version=2)
    nightly = amqtask.schedule("nightly", notify, Notify(user="ops", text="report"), cron="@daily")
    app = amqtask.App(
        "amqp://u:p@broker:5672/shop", [notify, resize, resize_v2], schedules=[nightly]
    )
    path = tmp_path / "asyncapi.json"
    path.write_bytes(orjson.dumps(document(app)))

    (report,) = await node(node_modules, "asyncapi", str(path))

    assert report == {"valid": True, "problems": []}
