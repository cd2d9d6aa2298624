"""`amqtask dashboard`: a web UI of an app's queues, dead letters, schedules, workers, tasks and
contracts, served by aiohttp (the `dashboard` extra: `pip install amqtask[dashboard]`).

aiohttp runs on the same asyncio loop as aio-pika, so the server reads the broker with the same
functions the CLI uses, with no thread or second loop in between.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

from aiohttp import web

from amqtask._app import App
from amqtask._status import Management
from amqtask.dashboard._data import INTERVAL, DashboardData
from amqtask.dashboard._server import DATA, SETTINGS, Settings, is_loopback, routes, safety

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ListenError", "create_dashboard", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8077


class ListenError(Exception):
    """The server cannot listen on the host and port asked (taken, not an address of this
    machine, not allowed)."""


def create_dashboard(
    app: App,
    *,
    management_url: str | None = None,
    read_only: bool = False,
    auth: str | None = None,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    app_path: str | None = None,
    interval: float = INTERVAL,
) -> web.Application:
    """The dashboard of `app` as an aiohttp application.

    `host` and `port` are where it will be bound (requests naming another host are refused;
    `port=None` accepts any port). `auth` ("user:password") requires HTTP basic auth on every
    request; `read_only` refuses every write action. The status sampler starts with the
    application and stops with it. Raises `ValueError` for a malformed `auth` or
    `management_url`, and for a host that is not loopback without `auth`.
    """
    if auth is None and not is_loopback(host):
        raise ValueError(f"binding {host!r} (not loopback) needs auth: pass --auth USER:PASSWORD")
    settings = Settings(host=host, port=port, auth=auth, read_only=read_only)
    management = (
        None
        if management_url is None
        else Management.from_urls(management_url, app.url, timeout=app.connect_timeout)
    )
    data = DashboardData(app, management=management, app_path=app_path, interval=interval)
    application = web.Application(middlewares=[safety])
    application[DATA] = data
    application[SETTINGS] = settings
    routes(application)

    async def lifecycle(_application: web.Application) -> AsyncIterator[None]:
        data.start()
        yield
        await data.stop()

    application.cleanup_ctx.append(lifecycle)
    return application


async def serve(
    app: App,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    management_url: str | None = None,
    read_only: bool = False,
    auth: str | None = None,
    app_path: str | None = None,
    ready: asyncio.Event | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve the dashboard of `app` on `host:port` until cancelled, SIGINT or SIGTERM.

    `on_listening` is called with the dashboard's URL once the port is bound (`port=0` takes a
    free one, which the URL and the Host guard then use). Raises `ListenError` if the server
    cannot listen there."""
    application = create_dashboard(
        app,
        management_url=management_url,
        read_only=read_only,
        auth=auth,
        host=host,
        port=port,
        app_path=app_path,
    )
    runner = web.AppRunner(application, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None
        bound = _bound_port(runner, port)
        application[SETTINGS].port = bound  # port 0: the Host guard checks the one taken
        if on_listening is not None:
            name = f"[{host}]" if ":" in host else host
            on_listening(f"http://{name}:{bound}/")
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
        await runner.cleanup()


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int):
            return address[1]
    return asked
