"""`python -m bench`: amqtask against raw aio-pika and peer frameworks, side by side, on one
broker, in one run.

Each measurement runs all sides in turn (alternating which goes first) `--repeat` times and
reports the median with min-max, and amqtask's median as a ratio to its raw twin's (or the best
peer's: Celery, Dramatiq, FastStream, Taskiq, run from a venv of their own, see `bench.versus`).
Targets are reported, not asserted. The broker is AMQTASK_URL (default amqp://guest:guest@127.0.0.1:5672/);
everything is created under a fresh namespace and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import operator
import os
import platform
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson

import amqtask
from bench import _scenarios as s
from bench import schedules as bench_schedules
from bench import versus

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
SCENARIOS = ("send", "pipelined", "worker", "rpc", "peers", "rss", "pool", "store", "schedules")


@dataclass
class Row:
    """One line of the table: amqtask's runs against a baseline's (its raw twin, usually)."""

    name: str
    unit: str
    amqtask: list[float]
    baseline: list[float]
    baseline_label: str = "raw aio-pika"
    target: tuple[str, float] | None = None  # (">=" or "<=", ratio)
    note: str = ""
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = s.median(self.amqtask) / s.median(self.baseline)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op = operator.ge if self.target[0] == ">=" else operator.le
        return bool(op(round(self.ratio, 2), self.target[1]))

    def to_dict(self) -> dict[str, Any]:
        def summary(runs: list[float]) -> dict[str, Any]:
            return {"median": s.median(runs), "min": min(runs), "max": max(runs), "runs": runs}

        return {
            **{k: v for k, v in asdict(self).items() if k not in ("amqtask", "baseline")},
            "amqtask": summary(self.amqtask),
            "baseline": summary(self.baseline),
            "met": self.met,
        }


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _cell(runs: list[float]) -> str:
    return f"{_num(s.median(runs))} ({_num(min(runs))}-{_num(max(runs))})"


def render(rows: list[Row]) -> str:
    lines = [
        "| measurement | amqtask: median (min-max) | baseline: median (min-max) | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        target = "-"
        if row.target is not None:
            mark = "met" if row.met else "MISSED"
            target = f"{row.target[0]} {row.target[1]:.2f}x {mark}"
        baseline = _cell(row.baseline)
        if row.baseline_label != "raw aio-pika":
            baseline = f"{row.baseline_label}: {baseline}"
        lines.append(
            f"| {row.name} ({row.unit}) | {_cell(row.amqtask)} | {baseline} "
            f"| {row.ratio:.2f}x | {target} |"
        )
    return "\n".join(lines)


class Bench:
    def __init__(self, args: argparse.Namespace, env: s.Env, raw: aio_pika.abc.AbstractConnection):
        self.args, self.env, self.raw = args, env, raw
        self.apps = env.apps
        self.rows: list[Row] = []
        self.usage: dict[str, list[s.Usage]] = {}
        self.same_message: dict[str, list[float]] = {}  # raw twin sending amqtask's message
        self.peer_env = versus.Peers(enabled=args.peers)
        self.not_run: list[str] = []  # "<side>: not run: <reason>", printed under the table

    def log(self, text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    async def compare(
        self,
        name: str,
        one: Callable[[str], Awaitable[float]],
        sides: tuple[str, ...] = ("amqtask", "raw"),
        repeat: int | None = None,
    ) -> dict[str, list[float]]:
        """Run `one(side)` for each side, interleaved, `--repeat` times."""
        runs: dict[str, list[float]] = {side: [] for side in sides}
        for rep, order in s.interleaved(repeat or self.args.repeat, sides):
            for side in order:
                runs[side].append(await one(side))
            last = ", ".join(f"{side} {values[-1]:,.4g}" for side, values in runs.items())
            self.log(f"{name} #{rep + 1}: {last}")
        return runs

    async def pair(
        self, name: str, one: Callable[[str], Awaitable[float]], repeat: int | None = None
    ) -> tuple[list[float], list[float]]:
        """Run `one("amqtask")` and `one("raw")` interleaved, `--repeat` times."""
        runs = await self.compare(name, one, repeat=repeat)
        return runs["amqtask"], runs["raw"]

    # --- 1 and 2: confirmed sends -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def client(self, side: str) -> AsyncIterator[Callable[[int], Awaitable[Any]]]:
        """A fresh connection of `side` for one run: sends numbered payloads (for calls, see
        `bench.speed.caller`).

        Fresh each run, so where the broker happens to schedule a connection's processes
        (which sticks for the connection's life) does not favour one side for the whole run.
        """
        apps = self.apps
        contract = apps.job
        if side == "amqtask":
            app = amqtask.App(self.args.url, [contract], namespace=apps.NAMESPACE, name="bench")
            async with app:
                yield lambda n: app.send(contract, s.payload(n))
            return
        connection = await aio_pika.connect_robust(self.args.url)
        try:
            exchange, key = apps.tasks.names.task_exchange, contract.routing_key
            producer = await s.RawProducer.open(connection, exchange, key)
            if side == "same":
                producer = s.SameMessageProducer(producer.exchange, key, contract)
            yield producer.send
        finally:
            await connection.close()

    async def send(self, pipelined: bool) -> None:
        queue = self.apps.job.queue
        count = self.args.pipelined if pipelined else self.args.sends
        concurrency = self.args.concurrency if pipelined else 1

        broker = s.broker_pid(self.env.url)
        used: dict[str, list[tuple[float, float]]] = {}  # side: (client, broker) us per send

        async def one(side: str) -> float:
            async with self.client(side) as send:
                await s.sends(200, concurrency, send)  # warm-up: channel, caches
                await self.env.purge(queue)
                before = (s.own_cpu(), s.cpu_seconds(broker) if broker else 0.0)
                rate = await s.sends(count, concurrency, send)
                after = (s.own_cpu(), s.cpu_seconds(broker) if broker else 0.0)
            await self.env.purge(queue)
            client, server = ((b - a) / count * 1e6 for a, b in zip(before, after, strict=True))
            used.setdefault(side, []).append((client, server))
            return rate

        name = f"send, {concurrency} in flight" if pipelined else "send, one awaited at a time"
        runs = await self.compare(name, one, ("amqtask", "raw", "same"))
        same = s.median(runs["same"])
        note = (
            f"raw aio-pika sending amqtask's message (validated, orjson, task headers, message "
            f"id): {_num(same)} msgs/s; amqtask is {s.median(runs['amqtask']) / same:.2f}x that"
        )
        target = (">=", 0.8 if pipelined else 0.95)
        self.rows.append(
            Row(name, "msgs/s", runs["amqtask"], runs["raw"], target=target, note=note)
        )
        self.same_message[name] = runs["same"]
        client = {side: [run[0] for run in runs_] for side, runs_ in used.items()}
        brokers = {side: s.median([run[1] for run in runs_]) for side, runs_ in used.items()}
        self.rows.append(
            Row(
                f"{name}, client CPU per send",
                "us/msg",
                client["amqtask"],
                client["raw"],
                note=(
                    "the sending process's CPU; the broker's: "
                    f"amqtask {brokers['amqtask']:.0f}, raw {brokers['raw']:.0f} us/msg"
                    if broker
                    else "the sending process's CPU; the broker's process was not found"
                ),
            )
        )

    # --- 3 and 4: the worker and calls (`bench.speed`) ----------------------------------------

    async def worker(self) -> None:
        """The worker against raw aio-pika: quorum, classic, two processes, saturated, uvloop."""
        from bench import speed

        await speed.worker(self)

    async def rpc(self) -> None:
        """Durable and transient calls against raw aio-pika and aio-pika's `patterns.RPC`."""
        from bench import speed

        await speed.calls(self)

    async def peers(self) -> None:
        """amqtask against Celery, Dramatiq, FastStream and Taskiq (`bench.versus`)."""
        if not self.args.peers:
            self.not_run.append("peer frameworks: not run: --no-peers")
            return
        await versus.measure(self)

    # --- 5: worker memory ---------------------------------------------------------------------

    async def rss(self) -> None:
        small, large = self.args.rss_small, self.args.rss_large
        command = s.amqtask_worker("tasks", self.args.prefetch, 1, self.args.worker_log_level)
        peaks: dict[int, list[float]] = {small: [], large: []}
        for rep in range(self.args.rss_repeat):
            for count in (small, large):
                await self.env.purge(self.apps.job.queue)
                await s.preload(self.env, self.raw, count)
                peaks[count].append(await s.worker_peak_rss(self.env, command, count))
            self.log(
                f"worker peak RSS #{rep + 1}: {small:,}: {peaks[small][-1]:.1f} MiB, "
                f"{large:,}: {peaks[large][-1]:.1f} MiB"
            )
        self.rows.append(
            Row(
                f"worker peak RSS, {large:,} queued",
                "MiB",
                peaks[large],
                peaks[small],
                baseline_label=f"{small:,} queued",
                target=("<=", 1.1),
                note=f"prefetch {self.args.prefetch}; VmHWM of the worker process",
            )
        )

    # --- 6: where handlers run: the event loop, threads, child processes -----------------------

    async def pool(self) -> None:
        """No-op and 5 ms CPU tasks drained by one worker whose handlers run on the event loop
        (`async def`), in threads (`def`) or in a process pool of 1 and 2 children per core,
        beside Celery's prefork pool with as many children (`--peers`): the same tasks on the
        same broker, acks after the task, the same prefetch in all (`bench.peers.celery_peer`).
        Goal: the process pool at least 1.5x Celery prefork on no-op tasks.
        """
        apps, cores, prefetch = self.apps, os.cpu_count() or 1, self.args.prefetch
        log_level = self.args.worker_log_level
        process = ("--pool", "process", "--prefetch", str(prefetch))
        children = {"process 1/core": cores, "process 2/core": 2 * cores}

        def commands(asynchronous: str, plain: str) -> dict[str, list[str]]:
            return {
                "async": s.amqtask_worker(asynchronous, prefetch, 1, log_level),
                "thread": s.amqtask_worker(plain, prefetch, 1, log_level),
                **{
                    side: s.amqtask_worker(plain, n, 1, log_level, *process)
                    for side, n in children.items()
                },
            }

        one_child = {"process 1 child": s.amqtask_worker("burn", 1, 1, log_level, *process)}
        workloads = {
            "no-op": (apps.job, self.args.pool_noop, commands("tasks", "plain")),
            "5 ms CPU": (
                apps.cpu_job,
                self.args.pool_cpu,
                {**commands("burn_async", "burn"), **one_child},
            ),
        }
        results: dict[str, dict[str, list[float]]] = {}
        usage: dict[tuple[str, str], list[s.Usage]] = {}
        # Celery's prefork pool with the process pool's children counts (`bench.versus`).
        celery = {f"Celery prefork {n}": n for n in children.values()}
        sides_failed = versus.Sides(self)
        self.peer_env.ensure()
        if not self.peer_env.runs(versus.CELERY):
            celery = {}
        for workload, (contract, count, by_side) in workloads.items():

            async def one(
                side: str,
                workload: str = workload,
                contract: Any = contract,
                count: int = count,
                by_side: Any = by_side,
            ) -> float:
                if side in celery:
                    kind = "cpu" if workload == "5 ms CPU" else "noop"
                    rate, used = await versus.drain(
                        self,
                        versus.CELERY,
                        count,
                        workload=kind,
                        children=celery[side],
                        purpose=kind,
                    )
                else:
                    await self.env.purge(contract.queue)
                    await s.preload(self.env, self.raw, count, contract)
                    rate, used = await s.consume_rate(
                        self.env, [by_side[side]], count, contract.queue
                    )
                usage.setdefault((workload, side), []).append(used)
                return rate

            try:
                results[workload] = await self.compare(
                    f"pool, {workload} tasks",
                    sides_failed.guard(one),
                    (*by_side, *celery),
                    self.args.worker_repeat,
                )
            finally:
                await versus.delete_entities(self)

        def per_task(workload: str, side: str) -> str:
            runs = usage[(workload, side)]
            cpu = s.median([u.consumers_us for u in runs])
            wall = 1e6 / s.median(results[workload][side])
            return f"{side} {wall:,.0f} us wall, {cpu:,.0f} us CPU per task"

        for side, reason in {**self.peer_env.failed, **sides_failed.failed}.items():
            if side.startswith("Celery"):
                self.not_run.append(f"{side} (pool): not run: {reason}")
        for workload, runs in results.items():
            sides = [per_task(workload, side) for side in runs if side not in sides_failed.failed]
            for side in ("async", *children):
                self.rows.append(
                    Row(
                        f"{workload} tasks, {side} vs thread pool",
                        "tasks/s",
                        runs[side],
                        runs["thread"],
                        baseline_label="thread pool",
                        note="; ".join(sides) if side == "async" else "",
                    )
                )
            for side, n in children.items():
                prefork, noop = f"Celery prefork {n}", workload == "no-op"
                if prefork not in celery or prefork in sides_failed.failed:
                    continue
                self.rows.append(
                    Row(
                        f"{workload} tasks, {side} ({n} children) vs Celery prefork",
                        "tasks/s",
                        runs[side],
                        runs[prefork],
                        baseline_label=f"Celery prefork, {n} children",
                        target=(">=", 1.5) if noop else None,
                        note="goal: the process pool 1.5x Celery prefork on no-op tasks"
                        if noop and n == cores
                        else "",
                    )
                )
        # Scaling: N children against one, where ideal is min(N, cores)x. It needs the cores
        # free: the worker process, the broker and anything else on the machine share them.
        cpu = results["5 ms CPU"]
        for side, n in children.items():
            busy = min(n, cores)
            machine = s.median([u.machine_busy for u in usage[("5 ms CPU", side)]])
            self.rows.append(
                Row(
                    f"5 ms CPU tasks, {side} ({n} children) vs 1 child",
                    "tasks/s",
                    cpu[side],
                    cpu["process 1 child"],
                    baseline_label="1 child",
                    target=(">=", round(0.9 * busy, 2)),
                    note=(
                        f"ideal {busy}x; the machine was {machine:.0%} busy; one child did "
                        f"{s.median(cpu['process 1 child']):,.0f}/s of an ideal "
                        f"{1 / apps.CPU_SECONDS:.0f}/s"
                    ),
                )
            )

    # --- 7: the task store ------------------------------------------------------------------

    async def store(self) -> None:
        """Worker throughput with each task store against none; `App.result` latency."""
        from bench import store

        await store.measure(self)

    # --- periodic tasks: 10,000 schedules (`bench.schedules`) -----------------------------------

    async def schedules(self) -> None:
        """The active scheduler against raw aio-pika publishing the same ticks, on a clock that
        skips idle time: due times, spread (due -> confirmed) and CPU per minute."""
        count = self.args.schedules
        app = bench_schedules.build(
            self.args.url, f"{self.env.namespace}-sched", count, "aligned", datetime.now(UTC)
        )
        await app.declare()
        try:
            for layout, minutes, warmup in (("aligned", 2, 60.0), ("staggered", 1, 10.0)):
                spreads: dict[str, list[list[float]]] = {"amqtask": [], "raw": []}

                async def one(
                    side: str,
                    layout: str = layout,
                    minutes: int = minutes,
                    warmup: float = warmup,
                    spreads: dict[str, list[list[float]]] = spreads,
                ) -> float:
                    for queue in (app.names.scheduler_queue, app.contracts[0].queue):
                        await self.env.purge(queue)
                    result = await bench_schedules.measure(
                        app, side, layout, count, minutes, warmup
                    )
                    spreads[side].append(result["spread_ms"])
                    return float(result["cpu_s_per_minute"])

                label = "due at once" if layout == "aligned" else "spread over a minute"
                name = f"{count:,} schedules {label}"
                repeat = self.args.schedules_repeat
                cpu = await self.compare(f"{name}, CPU s/min", one, repeat=repeat)
                for q in (50, 99):
                    ours = [s.percentile(runs, q) for runs in spreads["amqtask"]]
                    raw = [s.percentile(runs, q) for runs in spreads["raw"]]
                    goal = "goal p99 <= 100 ms: " + ("met" if s.median(ours) <= 100 else "MISSED")
                    note = goal if q == 99 else ""
                    self.rows.append(
                        Row(f"{name}, due to confirmed p{q}", "ms", ours, raw, note=note)
                    )
                self.rows.append(
                    Row(f"{name}, active scheduler CPU", "s/min", cpu["amqtask"], cpu["raw"])
                )
        finally:
            async with self.env.connection.channel() as channel:
                for queue in app.topology.queues:
                    await channel.queue_delete(queue.name)
                for exchange in app.topology.exchanges:
                    await channel.exchange_delete(exchange.name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--url", default=os.environ.get("AMQTASK_URL", DEFAULT_URL), help="broker URL")
    add("--repeat", type=int, default=5, help="repetitions of each measurement")
    add("--worker-repeat", type=int, default=3, help="repetitions of the worker runs")
    add("--sends", type=int, default=1000, help="sends awaited one at a time")
    add("--pipelined", type=int, default=10_000, help="sends with --concurrency in flight")
    add("--concurrency", type=int, default=100, help="sends in flight")
    add("--consume", type=int, default=10_000, help="queued tasks a worker drains")
    add("--prefetch", type=int, default=50, help="worker concurrency and prefetch (both sides)")
    add(
        "--worker-log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the amqtask workers' --log-level (info logs a line per task, which the raw "
        "consumer does not; the worker scenario also measures info)",
    )
    add("--calls", type=int, default=500, help="sequential calls (latency)")
    add("--pipelined-calls", type=int, default=3_000, help="calls with --in-flight in flight")
    add("--in-flight", type=int, default=100, help="calls in flight")
    add("--rss-small", type=int, default=1_000, help="queued tasks, small memory run")
    add("--rss-large", type=int, default=100_000, help="queued tasks, large memory run")
    add("--rss-repeat", type=int, default=1, help="repetitions of the memory runs")
    add("--pool-noop", type=int, default=5_000, help="queued no-op tasks per pool run")
    add("--pool-cpu", type=int, default=1_000, help="queued 5 ms CPU tasks per pool run")
    add("--schedules", type=int, default=10_000, help="schedules in the schedules scenario")
    add("--schedules-repeat", type=int, default=1, help="repetitions of the schedules runs")
    add(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure Celery, Dramatiq, FastStream and Taskiq too (the `peers` scenario and "
        "Celery prefork in `pool`), from a venv of their own, .bench-peers/, built on first use",
    )
    add("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="what to run")
    add("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if min(args.repeat, args.worker_repeat, args.rss_repeat) < 1:
        parser.error("repetitions must be at least 1")
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    os.environ["BENCH_NAMESPACE"], os.environ["AMQTASK_URL"] = namespace, args.url
    apps = importlib.import_module("bench.app")
    declared = (apps.tasks, apps.tasks_classic, apps.rpc, apps.raw, apps.burn)
    topologies = [app.topology for app in declared]
    for app in declared:
        await app.declare()
    connection = await aio_pika.connect(args.url)
    raw = await aio_pika.connect_robust(  # preloads queues
        args.url, client_properties={"connection_name": "bench-preload"}
    )
    try:
        env = s.Env(args.url, namespace, apps, connection, await connection.channel())
        bench = Bench(args, env, raw)
        for scenario in args.only:
            print(f"{scenario}:", file=sys.stderr, flush=True)
            if scenario in ("send", "pipelined"):
                await bench.send(pipelined=scenario == "pipelined")
            else:
                await getattr(bench, scenario)()
        server = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = server.get("version", b"?")
        return {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "aio_pika": aio_pika.__version__,
                "rabbitmq": version.decode() if isinstance(version, bytes) else str(version),
            },
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": bench.rows,
            "cpu": {name: [asdict(u) for u in runs] for name, runs in bench.usage.items()},
            "raw_with_amqtask_message": bench.same_message,
            "not_run": bench.not_run,
        }
    finally:
        await raw.close()
        for topology in topologies:
            for queue in topology.queues:
                async with connection.channel() as channel:
                    await channel.queue_delete(queue.name)
            for exchange in topology.exchanges:
                async with connection.channel() as channel:
                    await channel.exchange_delete(exchange.name)
        await connection.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    rows: list[Row] = result["rows"]
    machine = result["machine"]
    print(
        f"\namqtask vs raw aio-pika {machine['aio_pika']}, RabbitMQ {machine['rabbitmq']}, "
        f"Python {machine['python']}, {machine['cpus']} CPUs; median (min-max) of "
        f"{args.repeat} interleaved runs ({args.worker_repeat} for the worker, "
        f"{args.rss_repeat} for memory); ratio = amqtask / baseline\n"
    )
    print(render(rows))
    for row in rows:
        if row.note:
            print(f"- {row.name}: {row.note}")
    for line in result["not_run"]:
        print(f"- {line}")
    if args.json is not None:
        data = {**result, "rows": [row.to_dict() for row in rows]}
        args.json.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()
