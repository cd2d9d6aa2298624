"""`amqtask worker --json-logs`: every line the process writes is one JSON object, from amqtask,
from aio-pika and aiormq (reconnect messages), and from the handlers' own `logging` calls, at
their levels; amqtask reports a lost and a restored connection itself. The connection is cut
through a proxy; the shared broker is never touched."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any
from urllib.parse import urlsplit

from .apps.logging_app import build
from .conftest import AppFactory, app_env, start_worker, wait_for
from .proxy import start_proxy

APP = "tests.integration.apps.logging_app:app"


class Output:
    """Every line a process writes to stdout and stderr, parsed as JSON where it is JSON."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.events: list[dict[str, Any]] = []
        self.other: list[str] = []
        assert process.stdout is not None
        assert process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(s)) for s in (process.stdout, process.stderr)
        ]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode().rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.events.append(event)
            else:
                self.other.append(line)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event") == name]

    def has(self, name: str) -> bool:
        return bool(self.named(name))

    async def finished(self) -> None:
        await asyncio.gather(*self._readers)

    def __str__(self) -> str:
        return "\n".join([*map(str, self.events), *self.other])


async def test_with_json_logs_every_line_of_a_worker_is_json_handlers_and_reconnects_included(
    make_app: AppFactory, broker_url: str, unique: str
) -> None:
    app = make_app(list(build(unique, broker_url).contracts))
    await app.declare()
    chatty, troubled = app.contract(f"{unique}.chatty"), app.contract(f"{unique}.troubled")
    proxy, proxied_url = await start_proxy(broker_url)
    process = await start_worker(
        APP,
        "--log-level",
        "info",
        "--shutdown-timeout",
        "5",
        env=app_env(proxied_url, unique),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output = Output(process)
    try:
        await wait_for(lambda: output.has("worker_started"), timeout=30)
        async with app:
            await app.send(chatty, {"n": 1})
            await app.send(troubled, {"n": 2})
        await wait_for(lambda: output.has("handler_warning n=1"), timeout=30)
        await wait_for(lambda: output.has("handler_recovered n=2"), timeout=30)

        proxy.cut()
        await wait_for(lambda: output.has("connection_restored"), timeout=60)
        async with app:
            await app.send(chatty, {"n": 3})
        await wait_for(lambda: output.has("handler_warning n=3"), timeout=30)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        await output.finished()
        await proxy.close()

    assert process.returncode == 0, output
    assert output.other == [], output  # not one line of plain text
    # A task whose ack the cut lost runs again: look at each record's first occurrence.
    info = output.named("handler_info n=1")[0]
    assert (info["level"], info["logger"]) == ("info", "root")
    warning = output.named("handler_warning n=1")[0]
    assert (warning["level"], warning["logger"], warning["n"]) == ("warning", "logging_app", 1)
    recovered = output.named("handler_recovered n=2")[0]
    assert recovered["level"] == "error"
    assert "ValueError: handled inside the handler: 2" in recovered["exception"]
    [lost] = output.named("connection_lost")
    assert lost["level"] == "warning"
    assert lost["error"]
    assert lost["url"] == proxied_url.replace(f":{urlsplit(proxied_url).password}@", ":***@")
    [restored] = output.named("connection_restored")
    assert restored["down_s"] >= 0
    libraries = [e for e in output.events if e.get("logger", "").startswith(("aio_pika", "aiormq"))]
    assert libraries, output  # aio-pika's own reconnect messages, as JSON
    password = urlsplit(broker_url).password
    if password:
        assert f":{password}@" not in str(output)
