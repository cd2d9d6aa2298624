"""The `amqtask purge` and `amqtask workers` commands, added to `amqtask._cli`'s group (which
imports this module at its end). Thin: they call `amqtask._operator`."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import click
import orjson

from amqtask import _control, _logging, _operator, _status
from amqtask._cli import _fail, _run, _task, cli, load_app


@cli.command()
@click.argument("app_path", metavar="APP")
@click.argument("task")
@click.option("--yes", is_flag=True, help="Confirm: the messages are deleted for good.")
def purge(app_path: str, task: str, yes: bool) -> None:
    """Delete every message waiting in TASK's work queue and in its due queue.

    Deliveries a worker holds (unacked) and delayed messages still in the delay levels are not
    touched; dead letters are (`amqtask dlq purge`). A queue shared by several tasks loses the
    messages of all of them: the command names them.

    \b
    Example:
      amqtask purge examples.app:app images.resize --yes
    """
    _logging.configure(logging.WARNING)
    if not yes:
        raise click.UsageError("purge deletes messages for good: pass --yes to confirm")
    app = load_app(app_path)
    contract = _task(app, task)

    async def work() -> dict[str, int]:
        return await _operator.purge(app, contract)

    purged = _run(app, work)
    sharing = sorted(c.name for c in app.contracts if c.queue == contract.queue)
    for queue, count in purged.items():
        click.echo(f"purged {count} message(s) from {queue}")
    if len(sharing) > 1:
        click.echo(f"queue {contract.queue!r} is shared by tasks {', '.join(sharing)}", err=True)


def _default_management_url(amqp_url: str) -> str:
    """The management API on the broker's host, port 15672 (its default), AMQP's credentials."""
    host = urlsplit(amqp_url).hostname or "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:15672"


@cli.command()
@click.argument("app_path", metavar="APP")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--management-url",
    envvar="AMQTASK_MANAGEMENT_URL",
    default=None,
    metavar="URL",
    help="The management API [env: AMQTASK_MANAGEMENT_URL; default: http://BROKER-HOST:15672 "
    "with the AMQP URL's user and password].",
)
def workers(app_path: str, as_json: bool, management_url: str | None) -> None:
    """Show which workers consume each of APP's work queues (and due queues).

    Per worker process: host, pid, concurrency, prefetch, pool, when it started and when its
    connection opened, as the management API lists consumers and connections (a worker names
    its connection after itself). Consumers of other programs are listed by connection name.
    The workers that answer over the control exchange within a second add the deliveries they
    hold (in flight) and their process pool's children (null in JSON for those that do not).
    Exits 1 when the management API cannot be reached.

    \b
    Example:
      amqtask workers examples.app:app
      amqtask workers examples.app:app --json --management-url http://guest:guest@127.0.0.1:15672
    """
    _logging.configure(logging.WARNING)
    app = load_app(app_path)
    try:
        management = _status.Management.from_urls(
            management_url or _default_management_url(app.url),
            app.url,
            timeout=app.connect_timeout,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--management-url") from None
    try:
        report = _operator.fetch_workers(app, management)
    except _status.ManagementUnavailable as exc:
        _fail(f"{exc} (`amqtask workers` needs the management API: --management-url)")
    if any(w["amqtask_worker"] for w in report["workers"]):

        async def inspect() -> tuple[list[dict[str, Any]] | None, str | None]:
            return await _control.try_inspect_workers(app)

        replies, refused = _run(app, inspect)
        _control.merge_into_workers(report, replies or [])
        if refused is not None:
            report["workers_error"] = refused
    if as_json:
        click.echo(orjson.dumps(report).decode())
    else:
        click.echo(_operator.render_workers(report))
        if report.get("workers_error"):
            click.echo(f"in flight and pools not inspected ({report['workers_error']})")
