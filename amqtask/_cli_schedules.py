"""The `amqtask scheduler` and `amqtask schedules` commands, added to `amqtask._cli`'s group
(which imports this module at its end).

Thin, like the rest of the CLI: they load the app and call `Scheduler` and
`amqtask._schedule_admin`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click
import orjson

from amqtask import _logging, _metrics, _schedule_admin, _startup, _wallclock
from amqtask._app import App
from amqtask._cli import _run, cli, load_app
from amqtask._exceptions import AmqtaskError
from amqtask._metrics import MetricsServer, SchedulerMetrics
from amqtask._scheduler import DEFAULT_HEARTBEAT, Scheduler
from amqtask._urls import safe_url


def _scheduled_app(app_path: str) -> App:
    app = load_app(app_path)
    if not app.schedules:
        raise click.BadParameter(
            f"{app_path!r} has no schedules: pass App(..., schedules=[amqtask.schedule(...)])",
            param_hint="APP",
        )
    return app


@click.command()
@click.argument("app_path", metavar="APP")
@click.option(
    "--json-logs/--console-logs",
    default=None,
    help="Log format [default: JSON unless stderr is a terminal].",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Lowest level logged; warning drops the tick_fired line of every tick.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics (ticks fired and missed, whether active) and /health.",
)
@click.option(
    "--metrics-host",
    default=_metrics.DEFAULT_HOST,
    show_default=True,
    help="Address the metrics server binds.",
)
@click.option(
    "--start-timeout",
    default=_startup.DEFAULT_START_TIMEOUT,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds to wait at start for a broker that is down or restarting before exiting 1.",
)
@click.option(
    "--heartbeat",
    default=DEFAULT_HEARTBEAT,
    show_default=True,
    type=click.IntRange(1),
    help="AMQP heartbeat in seconds: the broker replaces an active scheduler it has not heard "
    "from for about two of them (a lost host, a network cut).",
)
def scheduler(
    app_path: str,
    json_logs: bool | None,
    log_level: str,
    metrics_port: int | None,
    metrics_host: str,
    start_timeout: float,
    heartbeat: int,
) -> None:
    """Run a scheduler replica for APP's schedules until SIGTERM/SIGINT.

    Run as many as you like, on any hosts: the broker makes exactly one active (logged as
    scheduler_active); the others wait (scheduler_standby) and one takes over within seconds
    when the active one goes, kill -9 included. Each tick is published like `amqtask send`,
    with a message id derived from the schedule and its due time. Needs `amqtask declare`
    first (exit 1 otherwise).

    \b
    Example:
      amqtask scheduler examples.app:app
      amqtask scheduler examples.app:app --metrics-port 9200 --json-logs
    """
    _logging.configure(getattr(logging, log_level.upper()), json=json_logs)
    app = _scheduled_app(app_path)

    async def work() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        metrics = SchedulerMetrics(app) if metrics_port is not None else None
        server = None
        if metrics is not None and metrics_port is not None:
            try:
                server = MetricsServer(metrics, metrics_port, host=metrics_host)
            except OSError as exc:
                raise AmqtaskError(
                    f"cannot serve metrics on {metrics_host} port {metrics_port}: {exc}"
                ) from exc
            server.start()

        async def start() -> Scheduler:
            replica = Scheduler(app, metrics=metrics, heartbeat=heartbeat)
            await replica.start()
            return replica

        try:
            running = await _startup.start_when_reachable(
                start, url=safe_url(app.url), timeout=start_timeout, stop=stop
            )
            if running is not None:
                try:
                    await stop.wait()
                finally:
                    await running.stop()
        finally:
            if server is not None:
                server.stop()

    _run(app, work)


@click.command()
@click.argument("app_path", metavar="APP")
@click.argument("action", required=False, type=click.Choice(["pause", "resume"]))
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the listing).")
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    default=_schedule_admin.DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for the active scheduler's answer.",
)
def schedules(
    app_path: str, action: str | None, name: str | None, as_json: bool, timeout: float
) -> None:
    """List APP's schedules; or pause or resume schedule NAME.

    For each schedule: its expression and time zone, the next due time, the last tick fired and
    its message id, and whether it is paused; and which scheduler is active (host, pid). The
    active scheduler answers; with none running, the state is read from the broker. Exit code 1
    when a scheduler holds the lease but does not answer.

    A pause is stored on the broker: the active scheduler applies it at once, and it outlives
    restarts and deploys. Ticks that fall due while a schedule is paused are not fired, not
    even after the resume; it fires again from its next due time.

    \b
    Example:
      amqtask schedules examples.app:app
      amqtask schedules examples.app:app --json
      amqtask schedules examples.app:app pause nightly-report
      amqtask schedules examples.app:app resume nightly-report
    """
    _logging.configure(logging.WARNING)
    if action is not None and name is None:
        raise click.UsageError(f"{action} needs the NAME of a schedule")
    if action is None and name is not None:
        raise click.UsageError(f"got {name!r}: expected pause NAME or resume NAME")
    app = _scheduled_app(app_path)
    if action is not None:
        assert name is not None
        _set_paused(app, name, action == "pause")
        return

    async def work() -> _schedule_admin.Listing:
        return await _schedule_admin.read_state(app, timeout=timeout)

    listing = _run(app, work)
    data = _schedule_admin.report(app, listing, round(_wallclock.now() * 1000))
    click.echo(orjson.dumps(data).decode() if as_json else _schedule_admin.render(data))
    if listing.source == _schedule_admin.Source.UNKNOWN:
        sys.exit(1)


def _set_paused(app: App, name: str, paused: bool) -> None:
    if name not in {item.name for item in app.schedules}:
        known = ", ".join(sorted(item.name for item in app.schedules))
        raise click.BadParameter(f"no schedule {name!r} (known: {known})", param_hint="NAME")

    async def work() -> None:
        await _schedule_admin.set_paused(app, name, paused)

    _run(app, work)
    click.echo(f"{'paused' if paused else 'resumed'} {name} (stored on the broker)")


cli.add_command(scheduler)
cli.add_command(schedules)
