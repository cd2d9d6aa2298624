"""The `amqtask` command. Thin: it loads an app and calls the same APIs a program would.

Exit codes: 0 ok, 1 a failure the user can fix (conflict, missing topology, broker unreachable,
a call that failed or timed out), 2 usage error (including a payload that does not fit the task).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import sysconfig
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import click
import orjson
import structlog
from pydantic import BaseModel, ValidationError

from amqtask import (
    _asyncapi,
    _cluster,
    _codec,
    _control,
    _dead_letters,
    _evolution,
    _logging,
    _loops,
    _metrics,
    _reload,
    _startup,
    _status,
    _supervisor,
    _wallclock,
)
from amqtask._app import App
from amqtask._contract import Contract
from amqtask._exceptions import (
    AmqtaskError,
    ContractError,
    RemoteError,
    StoreError,
    StoreMissing,
    TopologyConflict,
)
from amqtask._metrics import MetricsServer, SchedulerMetrics, WorkerMetrics
from amqtask._scheduler import Scheduler
from amqtask._transport import broker_closed, connect_error
from amqtask._urls import safe_urls as _safe_urls
from amqtask._urls import vhost_of
from amqtask._worker import Worker, WorkerSettings
from amqtask.routing import delay_seconds
from amqtask.store import _report as _store_report
from amqtask.store import parse_duration

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
    except ModuleNotFoundError as exc:
        if exc.name is not None and f"{module_name}.".startswith(f"{exc.name}."):
            raise click.BadParameter(
                f"cannot import {module_name!r}: {exc}", param_hint="APP"
            ) from None
        _fail(f"importing {module_name!r} failed: {_one_line(exc)}")
    except Exception as exc:  # the module itself raised: a failure to fix there, not a usage error
        _fail(f"importing {module_name!r} failed: {_one_line(exc)}")
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise click.BadParameter(
            f"{target!r} is {type(app).__name__}, not an amqtask.App", param_hint="APP"
        )
    context = click.get_current_context(silent=True)
    urls = context.meta.get(_URLS) if context is not None else None
    if urls:
        try:
            app.use_urls(urls)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--url") from None
    return app


# --- --url: every command that loads an APP takes it ------------------------------------------

_URLS = "amqtask.urls"  # where `--url` leaves its values, in the context's shared `meta`


def _remember_urls(
    context: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    context.meta[_URLS] = value
    return value


def _url_option() -> click.Option:
    return click.Option(
        ["--url"],
        multiple=True,
        expose_value=False,  # read by `load_app`, not passed to the command
        callback=_remember_urls,
        envvar="AMQTASK_URL",
        show_envvar=True,
        metavar="URL",
        help="Broker URL, instead of the app's. Repeat it (or separate URLs with , or ;) for "
        "the nodes of a cluster.",
    )


class _Commands(click.Group):
    """A command group whose commands that take an APP also take `--url` (and `AMQTASK_URL`),
    so one app module runs against dev, staging and a cluster. Its subgroups do the same."""

    group_class = type

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        takes_app = any(param.name == "app_path" for param in cmd.params)
        if takes_app and not any(param.name == "url" for param in cmd.params):
            cmd.params.append(_url_option())
        super().add_command(cmd, name)


# Frames of these directories are not where a user looks for the line that raised.
_LIBRARY_PATHS = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")})


def _one_line(exc: BaseException) -> str:
    """`exc` as `Type: message (file:line)`, on one line; the place is the innermost frame
    outside the standard library and installed packages."""
    text = " ".join(str(exc).split())
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not frame.filename.startswith(_LIBRARY_PATHS) and not frame.filename.startswith("<"):
            where = f" ({frame.filename}:{frame.lineno})"
            break
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


def _fail(message: str) -> NoReturn:
    """Report a failure the user can fix on one line of stderr, and exit 1.

    A worker that logs JSON reports it as a `worker_failed` event instead, so that every line
    it writes stays JSON.
    """
    context = click.get_current_context(silent=True)
    if _logging.renders_json() and context is not None and context.command.name == "worker":
        structlog.get_logger("amqtask.worker").error("worker_failed", error=message)
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _run(app: App, work: Callable[[], Awaitable[T]], *, loop: str = "asyncio") -> T:
    """Run `work` (on the event `loop` named) and turn the errors a user can fix into one line
    and exit code 1."""
    try:
        return _loops.run(work(), loop=loop)  # type: ignore[arg-type]
    except RemoteError as exc:
        if not exc.remote_traceback:
            _fail(str(exc))
        click.echo(f"error: {exc}", err=True)
        click.echo(f"remote traceback:\n{exc.remote_traceback.rstrip()}", err=True)
        sys.exit(1)
    except AmqtaskError as exc:
        _fail(str(exc))
    except (ConnectionError, OSError) as exc:
        # Raised by aio-pika where amqtask did not type it: the broker closed the connection
        # (so it was reachable), or else described like a failed connect.
        urls = _safe_urls(app.urls)
        _fail(broker_closed(exc) or str(connect_error(exc, urls, app.connect_timeout)))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="amqtask")
def cli() -> None:
    """amqtask: typed, durable task queues and RPC on RabbitMQ.

    APP is an import path to an amqtask.App, such as examples.app:app.
    Exit codes: 0 ok, 1 a failure you can fix (see the message), 2 usage.
    """


# --- a cluster's management API (declare, rebalance) ------------------------------------------

_MANAGEMENT_URL = click.option(
    "--management-url",
    envvar="AMQTASK_MANAGEMENT_URL",
    default=None,
    metavar="URL",
    help="The management API, e.g. http://guest:guest@node1:15672 (several separated by , or ; "
    "are tried in turn) [env: AMQTASK_MANAGEMENT_URL].",
)


def _management(url: str, app: App) -> _status.Management:
    try:
        return _status.Management.from_urls(url, app.url, timeout=app.connect_timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--management-url") from None


async def _placement(
    app: App, management: _status.Management | None
) -> tuple[dict[str, Any] | None, str]:
    """Where APP's quorum queues' leaders and replicas are (JSON and text), if it can be seen."""
    if management is None:
        return None, f"? {_cluster.NO_MANAGEMENT}"
    try:
        report = await _cluster.read_placement(management, vhost_of(app.url), app.topology)
    except _status.ManagementUnavailable as exc:
        return None, f"warning: {exc}; leaders and members not shown"
    return report, _cluster.render_placement(report)


@cli.command()
@click.argument("app_path", metavar="APP")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_MANAGEMENT_URL
def declare(app_path: str, dry_run: bool, as_json: bool, management_url: str | None) -> None:
    """Create the exchanges, queues and bindings APP's contracts need.

    Prints the plan (each entity: missing, up-to-date or conflict), then creates what is missing
    and removes bindings an earlier amqtask declared that must go (shown as removed).
    Idempotent. A conflict (an entity that exists with another type or arguments) changes
    nothing and exits 1, naming the entity, the argument and both values. An app with a task
    store (`App(store=...)`) also gets its tables created or migrated (with --dry-run: checked).

    With --management-url, shows each quorum queue's leader and members online, leaders per
    node, and warns about a queue with a member down, fewer replicas than wanted, or no quorum.

    \b
    Example:
      amqtask declare examples.app:app --dry-run
      amqtask declare examples.app:app --json
      amqtask declare examples.app:app --management-url http://guest:guest@node1:15672
    """
    app = load_app(app_path)
    management = None if management_url is None else _management(management_url, app)

    async def work() -> int:
        plan = await app.plan()
        applied = False
        if not dry_run and not plan.conflicts:
            await app.transport.apply(plan)
            applied = True
        store = None if app.store is None else await _declare_store(app, migrate=applied)
        cluster, placement = await _placement(app, management)
        if as_json:
            extra: dict[str, Any] = {} if store is None else {"store": store}
            extra["cluster"] = cluster
            click.echo(orjson.dumps({**plan.to_dict(), "applied": applied, **extra}).decode())
        else:
            click.echo(plan.render())
            if applied:
                created = len(plan.missing)
                click.echo(f"applied: created {created}" if created else "nothing to create")
                if plan.to_remove:
                    click.echo(f"removed {len(plan.to_remove)} retired binding(s) where present")
            if store is not None:
                click.echo(f"store {store['url']}: {store['state']}")
            click.echo(placement)
        if plan.conflicts:
            click.echo(f"error: {TopologyConflict(plan.conflicts)}", err=True)
            return 1
        return 0

    sys.exit(_run(app, work))


async def _declare_store(app: App, *, migrate: bool) -> dict[str, Any]:
    """Create or migrate the app's store tables (or, not `migrate`, only look at them)."""
    store = app.store
    assert store is not None
    try:
        if migrate:
            versions = await app.migrate_store()
            state = f"migrated to version {versions[-1]}" if versions else "up-to-date"
            return {"url": store.url, "state": state, "applied": versions}
        try:
            await store.check()
            state = "up-to-date"
        except StoreMissing as exc:
            state = f"to migrate ({exc})"
        return {"url": store.url, "state": state, "applied": []}
    finally:
        await store.close()


@cli.command()
@click.argument("app_path", metavar="APP")
@click.option(
    "--concurrency",
    "-c",
    default=None,
    type=click.IntRange(1),
    help="Handlers running at once; with --pool process, the child processes "
    "[default: 10; with --pool process, the CPU count].",
)
@click.option(
    "--prefetch",
    type=click.IntRange(1),
    default=None,
    help="Unacked deliveries held per queue [default: the concurrency; with --pool process, 4 "
    "per child].",
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
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics and /health on this port (process i of --processes: +i).",
)
@click.option(
    "--metrics-host",
    default=_metrics.DEFAULT_HOST,
    show_default=True,
    help="Address the metrics server binds: 0.0.0.0 is every IPv4 interface, 127.0.0.1 this "
    "machine only, :: every interface over IPv6.",
)
@click.option(
    "--processes",
    "-p",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Worker processes under one supervisor, each with these settings.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Lowest level logged; warning drops the task_succeeded line of every task.",
)
@click.option(
    "--start-timeout",
    default=_startup.DEFAULT_START_TIMEOUT,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds to wait at start for a broker that is down or restarting (logging "
    "broker_unavailable per attempt) before exiting 1.",
)
@click.option(
    "--pool",
    type=click.Choice(["thread", "process"]),
    default="thread",
    show_default=True,
    help="thread: async def on the event loop, def in threads. process: every handler in a "
    "child process started in advance; a crash or a hard time limit ends only that child.",
)
@click.option(
    "--loop",
    type=click.Choice(list(_loops.LOOPS)),
    default="asyncio",
    show_default=True,
    help="The event loop: asyncio's, or uvloop's (less CPU per task; the amqtask[uvloop] extra).",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Seconds a task may run before it is cancelled (async def) or its child killed "
    "(--pool process), for contracts without their own time_limit. Refused for a plain def "
    "in a thread.",
)
@click.option(
    "--soft-time-limit",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Seconds after which amqtask.SoftTimeLimitExceeded is raised inside the handler, for "
    "contracts without their own soft_time_limit.",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(1),
    default=None,
    help="Replace a child process after this many tasks [default: never].",
)
@click.option(
    "--max-memory-per-child",
    type=click.FloatRange(0, min_open=True),
    default=None,
    metavar="MIB",
    help="Replace a child process whose resident memory after a task is above this many MiB "
    "[default: never].",
)
@click.option(
    "--scheduler",
    "with_scheduler",
    is_flag=True,
    help="Also run a replica of APP's scheduler in this process (in each of --processes): "
    "the broker makes one replica in the namespace active.",
)
@click.option(
    "--reload",
    is_flag=True,
    help="Development: run the worker in a child process and restart it when a .py file under "
    "the current directory changes (needs watchfiles: pip install 'amqtask[reload]').",
)
@click.option(
    "--log-config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A logging configuration file: JSON or YAML (dictConfig), else INI (fileConfig). It "
    "replaces --log-level and --json-logs: amqtask's events reach its handlers as records.",
)
def worker(
    app_path: str,
    concurrency: int | None,
    prefetch: int | None,
    shutdown_timeout: float,
    json_logs: bool | None,
    metrics_port: int | None,
    metrics_host: str,
    processes: int,
    log_level: str,
    start_timeout: float,
    pool: str,
    loop: str,
    time_limit: float | None,
    soft_time_limit: float | None,
    max_tasks_per_child: int | None,
    max_memory_per_child: float | None,
    with_scheduler: bool,
    reload: bool,
    log_config: str | None,
) -> None:
    """Consume and run the tasks APP has handlers for.

    Acks a message only after its handler returned; a message that cannot be decoded or
    validated, or whose handler raised, goes to the dead-letter queue with the reason in its
    headers. SIGTERM or SIGINT stops consuming and lets running handlers finish.

    At start, a broker that refuses or does not answer (down, restarting) is waited for, with
    backoff, for up to --start-timeout seconds; wrong credentials, an unknown vhost or missing
    topology fail at once. Exit code 1 when it cannot start.

    With --processes N, a supervisor runs N worker processes and forwards SIGTERM/SIGINT to all
    of them. It exits 1 only if a process fails its first start. After that it never gives up:
    a process that dies is replaced, and a replacement that fails to start is retried with
    backoff (up to 30 s between tries) for as long as it takes, while the others keep working.

    With --pool process, handlers run in --concurrency child processes fed by this process,
    which keeps the connection and the acks: a child that crashes fails only its task (reason
    crashed), one past --time-limit is killed (reason time_limit), and children are replaced
    after --max-tasks-per-child tasks or above --max-memory-per-child MiB.

    With --scheduler, the process also runs a scheduler replica, as `amqtask scheduler` does.

    With --reload (development), a watcher runs the worker in a child process and restarts it,
    gracefully, when a .py file under the current directory changes.

    \b
    Example:
      amqtask worker examples.app:app --concurrency 20
      amqtask worker examples.app:app --processes 4 --metrics-port 9100
      amqtask worker examples.app:app --pool process --time-limit 300 --max-memory-per-child 500
    """
    if log_config is not None:
        try:
            _logging.configure_file(log_config)
        except _logging.LogConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--log-config") from None
    else:
        _logging.configure(getattr(logging, log_level.upper()), json=json_logs)
    if reload:
        child = [sys.executable, "-m", "amqtask", "worker", app_path]
        child += _worker_options(skip=("reload",))
        try:
            _reload.run(child, directory=os.getcwd(), shutdown_timeout=shutdown_timeout)
        except _reload.ReloadUnavailable as exc:
            raise click.UsageError(str(exc)) from None
        sys.exit(0)
    app = load_app(app_path)
    if concurrency is None:
        concurrency = (os.cpu_count() or 1) if pool == "process" else 10
    try:
        settings = WorkerSettings(
            concurrency,
            prefetch,
            shutdown_timeout,
            pool=pool,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        _loops.loop_factory(loop)  # uvloop missing: one line now, not one per process
    except AmqtaskError as exc:
        _fail(str(exc))
    if with_scheduler and not app.schedules:
        raise click.UsageError(f"--scheduler: {app_path!r} has no schedules")
    if processes > 1:
        child = [sys.executable, "-m", "amqtask", "worker", app_path]
        child += _worker_options(skip=("processes", "reload"))
        supervisor = _supervisor.Supervisor(child, processes, shutdown_timeout)
        code = asyncio.run(supervisor.run())
        if supervisor.failure is not None:
            click.echo(f"error: {supervisor.failure} (its error is above); stopped all", err=True)
        sys.exit(code)

    async def work() -> int:
        """Serve until SIGTERM/SIGINT; return how many handlers shutdown gave up on."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        metrics = server = None
        if metrics_port is not None:
            metrics = WorkerMetrics(app)
            port = metrics_port + _supervisor.slot()
            try:
                server = MetricsServer(metrics, port, host=metrics_host)
            except OSError as exc:
                raise AmqtaskError(
                    f"cannot serve metrics on {metrics_host} port {port}: {exc}"
                ) from exc
            server.start()

        replica = None
        if with_scheduler:
            on = None if metrics is None else SchedulerMetrics(app, metrics.registry)
            replica = Scheduler(app, metrics=on)

        attempts: list[Worker] = []

        async def start() -> Worker:
            started = Worker(app, settings, metrics=metrics)  # a failed start is not reusable
            attempts.append(started)
            await started.start()
            if replica is not None:
                try:
                    await replica.start()
                except BaseException:
                    await started.stop()
                    raise
            return started

        try:
            running = await _startup.start_when_reachable(
                start, url=_safe_urls(app.urls), timeout=start_timeout, stop=stop
            )
        except BaseException:
            if server is not None:
                server.stop()
            raise
        if running is None:  # stopped while waiting for the broker, or while starting
            if server is not None:
                server.stop()
            # A start cut off after consuming began stopped gracefully: its abandoned handlers
            # (threads) must not hold the exit.
            return attempts[-1].abandoned if attempts else 0
        _supervisor.notify_ready()  # when run by `--processes`: this child consumes now
        try:
            await stop.wait()
        finally:
            if replica is not None:
                await replica.stop()  # first: another replica takes over while this one drains
            await running.stop()
            if server is not None:
                server.stop()
        return running.abandoned

    abandoned = _run(app, work, loop=loop)
    if abandoned:
        # A plain-def handler's thread cannot be cancelled, and the interpreter would wait for it
        # at exit, past --shutdown-timeout. Its message is unacked and will be redelivered.
        sys.stderr.flush()
        os._exit(0)


def _worker_options(skip: tuple[str, ...]) -> list[str]:
    """This `worker` command's options, as given or defaulted, but those in `skip`, for a child
    (`processes` for a supervisor's, `reload` for the reloader's)."""
    context = click.get_current_context()
    options: list[str] = []
    for param in context.command.params:
        value = context.params.get(param.name or "")
        if not isinstance(param, click.Option) or param.name in skip or value is None:
            continue
        if param.is_flag:
            names = param.opts if value else param.secondary_opts
            if names:  # `--json-logs` or `--console-logs`; a plain flag that is off adds nothing
                options.append(max(names, key=len))
        else:
            name = max(param.opts, key=len)
            for item in value if isinstance(value, tuple) else (value,):
                options += [name, str(item)]
    for url in context.meta.get(_URLS, ()):  # `--url` is not among the command's params
        options += ["--url", url]
    return options


def _task(app: App, task: str) -> Contract[Any, Any]:
    """TASK's contract; an unknown task is a usage error."""
    try:
        return app.contract(task)
    except ContractError as exc:
        raise click.BadParameter(str(exc), param_hint="TASK") from None


def _task_payload(app: App, task: str, payload: str) -> tuple[Contract[Any, Any], BaseModel]:
    """TASK's contract and PAYLOAD validated against its input model (usage errors otherwise)."""
    contract = _task(app, task)
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="PAYLOAD") from None
    try:
        model: BaseModel = _codec.validate_input(contract, data)
    except ValidationError as exc:
        raise click.BadParameter(
            f"does not fit {contract.input.__name__}: {exc}", param_hint="PAYLOAD"
        ) from None
    return contract, model


_TIMEOUT = click.FloatRange(min=0, min_open=True)


@cli.command()
@click.argument("app_path", metavar="APP")
@click.argument("task")
@click.argument("payload", default="{}")
@click.option(
    "--timeout",
    type=_TIMEOUT,
    default=None,
    help="Seconds to wait for the reply [default: the app's call_timeout].",
)
def call(app_path: str, task: str, payload: str, timeout: float | None) -> None:
    """Run TASK on a worker with the JSON PAYLOAD and print its result as JSON.

    Waits for a worker to reply (a task without a result model prints null). Exits 1 with the
    remote error (type, message and traceback) when the handler raised or the worker refused the
    request, and when no reply came within the timeout: the request then expires unprocessed.

    \b
    Example:
      amqtask call examples.app:app images.resize '{"path": "a.png", "width": 64}' --timeout 5
    """
    _logging.configure(logging.WARNING)
    app = load_app(app_path)
    contract, model = _task_payload(app, task, payload)

    async def work() -> bytes:
        async with app:
            result = await app.call(contract, model, timeout=timeout)
        return _codec.result_json(contract, result)

    click.echo(_run(app, work).decode())


@cli.command()
@click.argument("app_path", metavar="APP")
@click.argument("task")
@click.argument("payload", default="{}")
@click.option(
    "--timeout",
    type=_TIMEOUT,
    default=None,
    help="Seconds to wait for the broker's confirm [default: the app's publish_timeout].",
)
@click.option(
    "--delay",
    type=_TIMEOUT,
    default=None,
    help="Seconds the task waits on the broker before it reaches its queue (rounded up).",
)
def send(
    app_path: str, task: str, payload: str, timeout: float | None, delay: float | None
) -> None:
    """Send TASK with the JSON PAYLOAD, fire and forget, and print its message id.

    Returns once the broker confirmed it stored the message. Exits 1 when it is unroutable (run
    `amqtask declare`), refused, or not confirmed in time.

    \b
    Example:
      amqtask send examples.app:app users.notify '{"user": "ada", "text": "hello"}'
      amqtask send examples.app:app users.notify '{"user": "ada", "text": "later"}' --delay 60
    """
    _logging.configure(logging.WARNING)
    app = load_app(app_path)
    contract, model = _task_payload(app, task, payload)
    if delay is not None:
        try:
            delay_seconds(delay)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--delay") from None

    async def work() -> str:
        async with app:
            return await app.send(contract, model, timeout=timeout, delay=delay)

    click.echo(_run(app, work))


@cli.group()
def dlq() -> None:
    """Inspect, replay or purge a task's dead-letter queue.

    \b
    Examples:
      amqtask dlq list examples.app:app users.notify
      amqtask dlq replay examples.app:app users.notify --id 3f2a...
      amqtask dlq purge examples.app:app users.notify --yes
    """


def _printable(text: str) -> str:
    """`text` on one line, control characters escaped: a dead letter's headers and body come
    from whoever published it, and must not move the cursor or clear an operator's terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


@dlq.command("list")
@click.argument("app_path", metavar="APP")
@click.argument("task")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dlq_list(app_path: str, task: str, limit: int, as_json: bool) -> None:
    """Show the count and, per message: id, reason of its last death, attempts, first failure,
    error, body size and the first 1 KiB of its body. Removes nothing.

    Messages are read and printed one at a time, so large dead letters list in bounded memory.
    """
    app = load_app(app_path)
    contract = _task(app, task)
    queue = f"{contract.queue}.dead"

    async def work() -> None:
        async with _dead_letters.browse_dead_letters(app, contract, limit=limit) as (count, each):
            if as_json:
                # One JSON document, written a message at a time.
                head = orjson.dumps({"queue": queue, "count": count}).decode()
                click.echo(head[:-1] + ',"messages":[', nl=False)
                first = True
                async for letter in each:
                    text = orjson.dumps(letter.to_dict()).decode()
                    click.echo(("" if first else ",") + text, nl=False)
                    first = False
                click.echo("]}")
                return
            click.echo(f"{count} dead letter(s) in {queue}")
            async for letter in each:
                attempts = letter.attempts if letter.attempts is not None else "-"
                more = "..." if letter.body_truncated else ""
                body = letter.body_preview.decode("utf-8", "replace")
                error = letter.error or ""
                click.echo(
                    _printable(
                        f"{letter.message_id}  {letter.task or '?'}  reason={letter.reason}  "
                        f"attempts={attempts}  first_failed={letter.first_failed_at or '-'}"
                    )
                    + "".join(f"\n    {_printable(line)}" for line in error.splitlines())
                    + f"\n    body ({letter.body_size} bytes): {_printable(body)}{more}"
                )

    _run(app, work)


@dlq.command("replay")
@click.argument("app_path", metavar="APP")
@click.argument("task")
@click.option("--id", "ids", multiple=True, help="Replay only this message id (repeatable).")
def dlq_replay(app_path: str, task: str, ids: tuple[str, ...]) -> None:
    """Move dead letters back to the work queue, each confirmed before it is removed."""
    app = load_app(app_path)
    contract = _task(app, task)

    async def work() -> int:
        return await _dead_letters.replay(app, contract, ids=set(ids) if ids else None)

    replayed = _run(app, work)
    click.echo(f"replayed {replayed} message(s) to {contract.queue}")
    if ids and replayed < len(set(ids)):
        click.echo(f"error: {len(set(ids)) - replayed} of the given ids were not found", err=True)
        sys.exit(1)


@dlq.command("purge")
@click.argument("app_path", metavar="APP")
@click.argument("task")
@click.option("--yes", is_flag=True, help="Confirm: the messages are deleted for good.")
def dlq_purge(app_path: str, task: str, yes: bool) -> None:
    """Delete every message in the task's dead-letter queue."""
    if not yes:
        raise click.UsageError("purge deletes messages for good: pass --yes to confirm")
    app = load_app(app_path)
    contract = _task(app, task)

    async def work() -> int:
        return await _dead_letters.purge(app, contract)

    click.echo(f"purged {_run(app, work)} message(s) from {contract.queue}.dead")


@cli.group(cls=click.Group)  # no broker: no --url
def contracts() -> None:
    """Export the contracts, check a change against a saved export, or write an AsyncAPI document.

    None of these needs a broker.

    \b
    Examples:
      amqtask contracts export examples.app:app -o contracts.json
      amqtask contracts check examples.app:app --against contracts.json
      amqtask contracts asyncapi examples.app:app -o asyncapi.json
    """


_OUTPUT = click.option(
    "-o",
    "--output",
    type=click.File("wb"),
    default="-",
    help="Write to this file [default: stdout].",
)


@contracts.command("export")
@click.argument("app_path", metavar="APP")
@_OUTPUT
def contracts_export(app_path: str, output: Any) -> None:
    """Write APP's contracts as JSON: name, version, queue, queue type, routing key, retry policy,
    and the JSON Schemas of input and output; and APP's schedules (task, expression, time zone,
    misfire policy, payload).

    Stable for diffs: sorted keys, 2-space indent, tasks ordered by name and version. Commit it,
    and `contracts check` later changes against it.

    \b
    Example:
      amqtask contracts export examples.app:app -o contracts.json
    """
    app = load_app(app_path)
    document = _evolution.export(
        app.contracts, namespace=app.names.namespace, schedules=app.schedules
    )
    output.write(_evolution.dumps(document))


@contracts.command("check")
@click.argument("app_path", metavar="APP")
@click.option(
    "--against",
    required=True,
    type=click.File("rb"),
    help="A saved `amqtask contracts export`.",
)
@click.option(
    "--order",
    type=click.Choice([order.value for order in _evolution.DeployOrder]),
    default=_evolution.DeployOrder.ANY.value,
    show_default=True,
    help="Deployment order to gate on: any (both directions must hold), workers-first (old "
    "producers meet new workers) or producers-first (new producers meet old workers).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
def contracts_check(app_path: str, against: Any, order: str, as_json: bool) -> None:
    """Compare APP's contracts with a saved export; exit 1 on a breaking change.

    Each change (field added, removed or retyped, enum narrowed or widened, constraint tightened
    or relaxed, task added or removed, queue or routing changed, ...) is judged twice: for a
    producer on the old contracts sending to a worker on the new ones, and for a new producer
    sending to an old worker. For a task's result the caller is the reader. A rename is a removal
    plus an addition. Schedules added, removed or changed are listed too, and never break.
    Exit codes: 0 nothing breaks, 1 something breaks, 2 unreadable export.

    \b
    Example:
      amqtask contracts check examples.app:app --against contracts.json
      amqtask contracts check examples.app:app --against contracts.json --order workers-first
    """
    app = load_app(app_path)
    deploy = _evolution.DeployOrder(order)
    try:
        saved = _evolution.loads(against.read())
        changes = _evolution.check(
            saved,
            _evolution.export(
                app.contracts, namespace=app.names.namespace, schedules=app.schedules
            ),
        )
    except _evolution.ExportError as exc:
        raise click.BadParameter(f"{against.name}: {exc}", param_hint="--against") from None
    if as_json:
        click.echo(orjson.dumps(_evolution.report(changes, deploy)).decode())
    else:
        click.echo(_evolution.render(changes, deploy))
    sys.exit(1 if any(change.breaks(deploy) for change in changes) else 0)


@contracts.command("asyncapi")
@click.argument("app_path", metavar="APP")
@_OUTPUT
@click.option("--title", default=None, help="info.title [default: amqtask tasks (NAMESPACE)].")
@click.option("--api-version", default="1.0.0", show_default=True, help="info.version.")
def contracts_asyncapi(app_path: str, output: Any, title: str | None, api_version: str) -> None:
    """Write an AsyncAPI 3.0.0 document (JSON) of APP's contracts.

    A channel per task (its routing key on the task exchange) and per work queue, with AMQP
    bindings; send and receive operations, with replies for tasks that return a result; messages
    with their headers and payload schemas in components.

    \b
    Example:
      amqtask contracts asyncapi examples.app:app -o asyncapi.json
    """
    app = load_app(app_path)
    document = _asyncapi.document(app, title=title, version=api_version)
    output.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")


@cli.command()
@click.argument("app_path", metavar="APP")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a line per sample).")
@click.option(
    "--watch",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Refresh every SECONDS, with in/out rates from successive samples.",
)
@click.option("--count", type=click.IntRange(1), default=None, hidden=True)  # bounds --watch
@click.option(
    "--management-url",
    envvar="AMQTASK_MANAGEMENT_URL",
    default=None,
    metavar="URL",
    help="The management API, e.g. http://guest:guest@127.0.0.1:15672, for unacked counts and "
    "rates [env: AMQTASK_MANAGEMENT_URL; default: AMQP only].",
)
@click.option(
    "--no-inspect",
    is_flag=True,
    help="Do not ask the running workers how they are (the Workers section).",
)
@click.option(
    "--inspect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the workers' answers.",
)
def status(
    app_path: str,
    as_json: bool,
    watch: float | None,
    count: int | None,
    management_url: str | None,
    no_inspect: bool,
    inspect_timeout: float,
) -> None:
    """Show, per task: ready and unacked messages, consumers, dead letters; and delayed messages.
    With a task store, also how many tasks it holds in each state, per task.

    Over AMQP alone (passive declares) unacked counts and in/out rates are unknown and shown as
    '?' (null in JSON); --management-url adds them, and falls back to AMQP with a warning when
    the API cannot be reached. A missing queue is shown as missing.

    Workers: each running worker is asked over the control exchange (waiting --inspect-timeout
    for answers) for its queues, the deliveries it holds now, and its process pool's children
    (alive of size, busy, recycled, crashed, killed on time limit); "workers" in JSON, null
    with --no-inspect or when the broker refused the request (the reason in "workers_error").

    \b
    Example:
      amqtask status examples.app:app
      amqtask status examples.app:app --watch 5 --management-url http://guest:guest@127.0.0.1:15672
    """
    _logging.configure(logging.WARNING)
    app = load_app(app_path)
    management = None
    if management_url:
        try:
            management = _status.Management.from_urls(
                management_url, app.url, timeout=app.connect_timeout
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--management-url") from None

    async def work() -> None:
        previous: _status.Sample | None = None
        samples = 0
        async with _status.Sampler(app, management) as sampler:
            while True:
                sample = await sampler.sample()
                data = _status.report(app.contracts, app.names, sample, previous)
                if app.store is not None:
                    data["store"] = await _store_counts(app)
                data["workers"], not_inspected = (
                    (None, None)
                    if no_inspect
                    else await _control.try_inspect_workers(app, timeout=inspect_timeout)
                )
                if not_inspected is not None:  # the user may not publish to the control exchange
                    data["workers_error"] = not_inspected
                if as_json:
                    click.echo(orjson.dumps(data).decode())
                    for warning in data["warnings"]:
                        click.echo(f"warning: {warning}", err=True)
                else:
                    if watch is not None and sys.stdout.isatty():
                        click.clear()
                    click.echo(_status.render(data))
                    if "store" in data:
                        click.echo(_store_report.render_counts(**data["store"]))
                    if data["workers"] is not None or not_inspected is not None:
                        click.echo(
                            _control.render_workers(
                                data["workers"], inspect_timeout, reason=not_inspected
                            )
                        )
                samples += 1
                if watch is None or (count is not None and samples >= count):
                    return
                if not as_json:
                    click.echo()
                previous = sample
                await asyncio.sleep(watch)

    async def work_then_close() -> None:
        try:
            await work()
        finally:
            if app.store is not None:
                await app.store.close()

    try:
        _run(app, work_then_close)
    except KeyboardInterrupt:
        sys.exit(0 if watch is not None else 130)  # Ctrl-C is how a watch ends


async def _store_counts(app: App) -> dict[str, Any]:
    """The store's counts per task and state for `status` (an error line where it is down)."""
    store = app.store
    assert store is not None
    try:
        rows = await store.counts()
    except StoreError as exc:
        return {"url": store.url, "counts": {}, "error": str(exc)}
    return {"url": store.url, "counts": _store_report.state_counts(rows), "error": None}


# --- the task store -------------------------------------------------------------------------


def _with_store(app: App, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` on APP's store (usage error 2 without one), closing the app afterwards."""
    if app.store is None:
        raise click.UsageError("this app has no task store: give it App(store=...)")

    async def run() -> T:
        try:
            return await work()
        finally:
            await app.close()

    return _run(app, run)


@cli.command("task")
@click.argument("app_path", metavar="APP")
@click.argument("task_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def task_command(app_path: str, task_id: str, as_json: bool) -> None:
    """Show what APP's task store knows of task ID (the id `send` printed): state, attempts,
    times, worker, error (type, message, reason, traceback) and result.

    Needs no broker. Exit 1 when the store does not know the id (never sent with this store,
    or its record expired after the contract's keep_result) or cannot be reached.

    \b
    Example:
      amqtask task examples.app:app 3f2a9c...
    """
    _logging.configure(logging.WARNING)
    app = load_app(app_path)
    info = _with_store(app, lambda: app.task(task_id))
    if info is None:
        _fail(f"the task store knows no task {task_id!r}")
    click.echo(
        orjson.dumps(info.to_dict()).decode() if as_json else _store_report.render_task(info)
    )


@cli.command("tasks")
@click.argument("app_path", metavar="APP")
@click.option(
    "--state", type=click.Choice(_store_report.STATES), default=None, help="Only this state."
)
@click.option("--task", "task_name", default=None, metavar="NAME", help="Only this task name.")
@click.option(
    "--since",
    default=None,
    metavar="DURATION",
    help="Only tasks changed within this long (30s, 15m, 1h, 2d, 1w).",
)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list).")
def tasks_command(
    app_path: str,
    state: str | None,
    task_name: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List tasks in APP's task store, most recently changed first.

    Needs no broker.

    \b
    Example:
      amqtask tasks examples.app:app --state failed --since 1h
      amqtask tasks examples.app:app --task images.resize --json
    """
    _logging.configure(logging.WARNING)
    changed_since = None
    if since is not None:
        try:
            changed_since = _wallclock.utc_now() - parse_duration(since)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
    app = load_app(app_path)
    infos = _with_store(
        app, lambda: app.tasks(state=state, task=task_name, since=changed_since, limit=limit)
    )
    if as_json:
        click.echo(_store_report.tasks_json(infos).decode())
    else:
        click.echo(_store_report.render_tasks(infos))


@cli.command()
@click.argument("app_path", metavar="APP")
@click.argument("task_id", metavar="ID")
@click.option(
    "--terminate",
    is_flag=True,
    help="Also stop it if it runs now: an async def is cancelled, a process-pool child killed "
    "(a plain def in a thread runs on).",
)
def revoke(app_path: str, task_id: str, terminate: bool) -> None:
    """Revoke task ID: no worker will run it (acked without running, also after a restart, also
    when it comes due after a delay or a retry). The revocation is stored in APP's task store,
    then broadcast to the running workers.

    \b
    Example:
      amqtask revoke examples.app:app 3f2a9c...
      amqtask revoke examples.app:app 3f2a9c... --terminate
    """
    _logging.configure(logging.WARNING)
    app = load_app(app_path)

    async def work() -> Any:
        await app.connect()
        await app.revoke(task_id, terminate=terminate)
        return await app.task(task_id)

    info = _with_store(app, work)
    state = "?" if info is None else info.state.value
    click.echo(f"revoked {task_id} (now {state}{', terminate sent' if terminate else ''})")


@cli.command()
@click.argument("app_path", metavar="APP")
@_MANAGEMENT_URL
@click.option("--json", "as_json", is_flag=True, help="Print the placement as JSON.")
def rebalance(app_path: str, management_url: str | None, as_json: bool) -> None:
    """Spread quorum queue leaders evenly over the cluster's nodes; show APP's.

    A node that comes back after a failure leads fewer queues than before: the queues it led
    elected leaders elsewhere meanwhile, and the others carry its load. This asks the management
    API to
    rebalance (every queue of the cluster, as `rabbitmq-queues rebalance all` does), waits up
    to 15 s for APP's queues' leaders to spread, and prints where they are. Needs
    --management-url (or AMQTASK_MANAGEMENT_URL).

    \b
    Example:
      amqtask rebalance examples.app:app --management-url http://guest:guest@node1:15672
    """
    app = load_app(app_path)
    if management_url is None:
        raise click.UsageError("rebalance needs the management API: pass --management-url")
    management = _management(management_url, app)

    async def work() -> dict[str, Any]:
        return await _cluster.rebalance(management, vhost_of(app.url), app.topology)

    try:
        report = _run(app, work)
    except _status.ManagementUnavailable as exc:
        _fail(str(exc))
    if as_json:
        click.echo(orjson.dumps(report).decode())
    else:
        click.echo(_cluster.render_placement(report))


# --- the dashboard ------------------------------------------------------------------------------


@cli.command()
@click.argument("app_path", metavar="APP")
@click.option(
    "--port",
    default=8077,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on; 0 takes a free one (the URL printed says which).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; any but loopback needs --auth.",
)
@click.option(
    "--auth",
    envvar="AMQTASK_DASHBOARD_AUTH",
    default=None,
    metavar="USER:PASSWORD",
    help="HTTP basic auth for every page and request [env: AMQTASK_DASHBOARD_AUTH, which keeps "
    "it out of the process list].",
)
@click.option("--read-only", is_flag=True, help="Refuse every write action (replay, purge, ...).")
@click.option(
    "--management-url",
    envvar="AMQTASK_MANAGEMENT_URL",
    default=None,
    metavar="URL",
    help="The management API, e.g. http://guest:guest@127.0.0.1:15672, for unacked counts, "
    "rates, the cluster and workers [env: AMQTASK_MANAGEMENT_URL; default: AMQP only].",
)
def dashboard(
    app_path: str,
    port: int,
    host: str,
    auth: str | None,
    read_only: bool,
    management_url: str | None,
) -> None:
    """Serve a web dashboard of APP: queues with live rates, dead letters (replay, purge),
    schedules (pause, resume), workers, tasks of the store (revoke) and contracts.

    Binds 127.0.0.1 unless told otherwise; any other address needs --auth. Write actions ask to
    confirm in the page; --read-only refuses them. No broker password reaches the page. Needs
    the dashboard extra: pip install 'amqtask[dashboard]'.

    \b
    Example:
      amqtask dashboard examples.app:app
      AMQTASK_DASHBOARD_AUTH=admin:s3cret amqtask dashboard examples.app:app --host 0.0.0.0
    """
    _logging.configure(logging.WARNING)
    try:
        from amqtask import dashboard as _dashboard
    except ImportError as exc:
        if getattr(exc, "name", None) != "aiohttp":
            raise
        _fail("the dashboard needs aiohttp: pip install 'amqtask[dashboard]'")
    from amqtask.dashboard._server import is_loopback

    if auth is None and not is_loopback(host):
        raise click.UsageError(
            f"--host {host} is reachable from other machines: pass --auth USER:PASSWORD "
            "(or set AMQTASK_DASHBOARD_AUTH)"
        )
    if auth is not None and (":" not in auth or auth.startswith(":") or auth.endswith(":")):
        raise click.BadParameter("expected USER:PASSWORD", param_hint="--auth")
    app = load_app(app_path)
    if management_url is not None:
        try:
            _status.Management.from_urls(management_url, app.url)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--management-url") from None

    def listening(url: str) -> None:  # once bound: the port taken when --port 0
        click.echo(f"amqtask dashboard on {url} (Ctrl-C to stop)", err=True)

    async def work() -> None:
        try:
            await _dashboard.serve(
                app,
                host=host,
                port=port,
                management_url=management_url,
                read_only=read_only,
                auth=auth,
                app_path=app_path,
                on_listening=listening,
            )
        except _dashboard.ListenError as exc:  # a usage error: not the broker's
            raise click.UsageError(str(exc)) from None
        finally:
            await app.close()

    _run(app, work)  # SIGINT and SIGTERM end `serve`: no KeyboardInterrupt


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="amqtask")


# `amqtask scheduler` and `amqtask schedules`, `amqtask purge` and `amqtask workers`: modules of
# their own, which add them to `cli`.
from amqtask import _cli_ops, _cli_schedules  # noqa: E402, F401
