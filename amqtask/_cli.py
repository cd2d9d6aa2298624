"""The `amqtask` command. Thin: it loads an app and calls the same APIs a program would.

Exit codes: 0 ok, 1 a failure the user can fix (conflict, missing topology, broker unreachable),
2 usage error.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click
import orjson

from amqtask import _logging
from amqtask._app import App
from amqtask._exceptions import AmqtaskError, TopologyConflict
from amqtask._worker import Worker, WorkerSettings

T = TypeVar("T")


def load_app(target: str) -> App:
    """Import `module.path:attribute` (from the current directory too) and return the App."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"expected MODULE:ATTRIBUTE, got {target!r}", param_hint="APP")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="APP") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise click.BadParameter(
            f"{target!r} is {type(app).__name__}, not an amqtask.App", param_hint="APP"
        )
    return app


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _run(app: App, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` and turn the errors a user can fix into a message and exit code 1."""
    try:
        return asyncio.run(work())  # type: ignore[arg-type]
    except AmqtaskError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except (ConnectionError, OSError) as exc:
        click.echo(f"error: cannot reach the broker at {_safe_url(app.url)}: {exc}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="amqtask")
def cli() -> None:
    """amqtask: typed, durable task queues and RPC on RabbitMQ.

    APP is an import path to an amqtask.App, such as examples.app:app.
    Exit codes: 0 ok, 1 a failure you can fix (see the message), 2 usage.
    """


@cli.command()
@click.argument("app_path", metavar="APP")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def declare(app_path: str, dry_run: bool, as_json: bool) -> None:
    """Create the exchanges, queues and bindings APP's contracts need.

    Prints the plan (each entity: missing, up-to-date or conflict), then creates what is missing.
    Idempotent. A conflict (an entity that exists with another type or arguments) changes
    nothing and exits 1, naming the entity, the argument and both values.

    \b
    Example:
      amqtask declare examples.app:app --dry-run
      amqtask declare examples.app:app --json
    """
    app = load_app(app_path)

    async def work() -> int:
        plan = await app.plan()
        applied = False
        if not dry_run and not plan.conflicts:
            await app.transport.apply(plan)
            applied = True
        if as_json:
            click.echo(orjson.dumps({**plan.to_dict(), "applied": applied}).decode())
        else:
            click.echo(plan.render())
            if applied:
                created = len(plan.missing)
                click.echo(f"applied: created {created}" if created else "nothing to create")
        if plan.conflicts:
            click.echo(f"error: {TopologyConflict(plan.conflicts)}", err=True)
            return 1
        return 0

    sys.exit(_run(app, work))


@cli.command()
@click.argument("app_path", metavar="APP")
@click.option(
    "--concurrency",
    "-c",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    help="Handlers running at once.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(1),
    default=None,
    help="Unacked deliveries held per queue [default: the concurrency].",
)
@click.option(
    "--shutdown-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds running handlers get to finish on SIGTERM/SIGINT.",
)
@click.option(
    "--json-logs/--console-logs",
    default=None,
    help="Log format [default: JSON unless stderr is a terminal].",
)
def worker(
    app_path: str,
    concurrency: int,
    prefetch: int | None,
    shutdown_timeout: float,
    json_logs: bool | None,
) -> None:
    """Consume and run the tasks APP has handlers for.

    Acks a message only after its handler returned; a message that cannot be decoded or
    validated, or whose handler raised, goes to the dead-letter queue with the reason in its
    headers. SIGTERM or SIGINT stops consuming and lets running handlers finish.

    \b
    Example:
      amqtask worker examples.app:app --concurrency 20
    """
    _logging.configure(json=json_logs)
    app = load_app(app_path)
    settings = WorkerSettings(concurrency, prefetch, shutdown_timeout)

    async def work() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await Worker(app, settings).run(stop)

    _run(app, work)


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="amqtask")
