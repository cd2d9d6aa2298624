"""The speed rows: the worker against a careful raw aio-pika consumer, and calls against raw
direct reply-to and aio-pika's own RPC helper, each with the CPU they cost per message.

Worker: one process on a quorum queue (also on uvloop), two processes, one process on a classic
queue, and one process on a saturated machine (a busy loop per core beside it). The raw consumer
acks one by one (`bench.raw consume`). This 2-core machine shares its cores with the broker, so
two processes cannot show scaling here: the client CPU per message says what a core buys.

Calls: durable calls (quorum queue, persistent, confirmed) against raw aio-pika doing the same;
transient calls (`calls="transient"`) against raw aio-pika sending transient requests to a
classic queue (confirmed before it waits for the reply, as `Exchange.publish` on a channel with
confirms does), and against aio-pika's `patterns.RPC` (transient requests, a reply queue of its
own). The peer frameworks (Celery, Dramatiq, FastStream, Taskiq) are measured in the same run by
the `peers` scenario, `bench.versus`, from a venv of their own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq.exceptions
from aio_pika.patterns import RPC

import amqtask
from bench import _scenarios as s

if TYPE_CHECKING:
    from bench.__main__ import Bench

PEER = "aio-pika patterns.RPC"


# --- worker ---------------------------------------------------------------------------------


@contextlib.contextmanager
def saturated(hogs: int) -> Iterator[None]:
    """`hogs` processes spinning at 100% CPU for the duration: a machine with no core free."""
    spin = [sys.executable, "-c", "while True: pass"]
    processes = [subprocess.Popen(spin) for _ in range(hogs)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


async def worker(bench: Bench) -> None:
    from bench.__main__ import Row

    args, env, apps = bench.args, bench.env, bench.apps
    count, prefetch, level = args.consume, args.prefetch, args.worker_log_level
    cores = os.cpu_count() or 1

    def amq(app: str, *options: str, processes: int = 1) -> list[str]:
        return s.amqtask_worker(app, prefetch, processes, level, *options)

    def raw(queue: str) -> list[str]:
        return s.raw_consumer("consume", queue, prefetch)

    quorum, classic = apps.job, apps.job_classic
    cases: dict[str, tuple[Any, dict[str, list[list[str]]], int]] = {
        "quorum, 1 process": (
            quorum,
            {
                "amqtask": [amq("tasks")],
                "raw": [raw(quorum.queue)],
                "uvloop": [amq("tasks", "--loop", "uvloop")],
                "info logs": [s.amqtask_worker("tasks", prefetch, 1, "info")],
            },
            0,
        ),
        "classic, 1 process": (
            classic,
            {"amqtask": [amq("tasks_classic")], "raw": [raw(classic.queue)]},
            0,
        ),
        "quorum, 1 process, saturated": (
            quorum,
            {"amqtask": [amq("tasks")], "raw": [raw(quorum.queue)]},
            cores,
        ),
        "quorum, 2 processes": (
            quorum,
            {"amqtask": [amq("tasks", processes=2)], "raw": [raw(quorum.queue)] * 2},
            0,
        ),
    }
    rates: dict[str, dict[str, list[float]]] = {}
    usage: dict[tuple[str, str], list[s.Usage]] = {}
    for case, (contract, commands, hogs) in cases.items():

        async def one(
            side: str,
            case: str = case,
            contract: Any = contract,
            commands: Any = commands,
            hogs: int = hogs,
        ) -> float:
            n = count // 2 if hogs else count  # a saturated machine drains slowly
            await env.purge(contract.queue)
            await s.preload(env, bench.raw, n, contract)
            with saturated(hogs):
                rate, used = await s.consume_rate(env, commands[side], n, contract.queue)
            usage.setdefault((case, side), []).append(used)
            return rate

        rates[case] = await bench.compare(
            f"worker, {case}", one, tuple(commands), args.worker_repeat
        )

    def cpu(case: str, side: str) -> list[float]:
        return [u.consumers_us for u in usage[(case, side)]]

    def note(case: str) -> str:
        parts = []
        for side in rates[case]:
            runs = usage[(case, side)]
            brokers = [u.broker_us for u in runs if u.broker_us is not None]
            broker = f", broker {s.median(brokers):.0f} us/msg" if brokers else ""
            busy = s.median([u.machine_busy for u in runs])
            parts.append(f"{side} {s.median(cpu(case, side)):.0f} us/msg{broker}, {busy:.0%} busy")
        return "; ".join(parts)

    bench.usage = {f"{side}, {case}": runs for (case, side), runs in usage.items()}
    targets = {
        "quorum, 1 process": ((">=", 1.1), ("<=", 0.9)),
        "classic, 1 process": ((">=", 1.0), ("<=", 1.0)),
        "quorum, 1 process, saturated": ((">=", 1.0), None),
        "quorum, 2 processes": (None, None),
    }
    for case, (rate_target, cpu_target) in targets.items():
        runs = rates[case]
        label = "raw aio-pika" if "2 processes" not in case else "raw aio-pika, 2 processes"
        bench.rows.append(
            Row(
                f"worker, {case}",
                "msgs/s",
                runs["amqtask"],
                runs["raw"],
                baseline_label=label,
                target=rate_target,
                note=f"CPU per message: {note(case)}",
            )
        )
        bench.rows.append(
            Row(
                f"worker CPU, {case}",
                "us/msg",
                cpu(case, "amqtask"),
                cpu(case, "raw"),
                baseline_label=label,
                target=cpu_target,
            )
        )
    one, two = "quorum, 1 process", "quorum, 2 processes"
    bench.rows.append(
        Row(
            "worker, --loop uvloop vs asyncio, quorum, 1 process",
            "msgs/s",
            rates[one]["uvloop"],
            rates[one]["amqtask"],
            baseline_label="amqtask on asyncio",
            note=(
                f"CPU: uvloop {s.median(cpu(one, 'uvloop')):.0f} us/msg, asyncio "
                f"{s.median(cpu(one, 'amqtask')):.0f} us/msg "
                f"({s.median(cpu(one, 'uvloop')) / s.median(cpu(one, 'amqtask')):.2f}x)"
            ),
        )
    )
    if level != "info":
        bench.rows.append(
            Row(
                "worker, --log-level info vs " + level + ", quorum, 1 process",
                "msgs/s",
                rates[one]["info logs"],
                rates[one]["amqtask"],
                baseline_label=f"amqtask at {level}",
                note=(
                    f"a task_succeeded line per task: {s.median(cpu(one, 'info logs')):.0f} "
                    f"us/msg against {s.median(cpu(one, 'amqtask')):.0f}"
                ),
            )
        )
    scaled = s.median(rates[two]["raw"]) / s.median(rates[one]["raw"])
    bench.rows.append(
        Row(
            "worker, 2 processes vs 1",
            "msgs/s",
            rates[two]["amqtask"],
            rates[one]["amqtask"],
            baseline_label="amqtask 1 process",
            note=(
                f"raw aio-pika scales {scaled:.2f}x in the same run; the cores are shared with "
                "the broker, so compare CPU per message: amqtask "
                f"{s.median(cpu(two, 'amqtask')):.0f} us at 2 processes, "
                f"{s.median(cpu(one, 'amqtask')):.0f} us at 1"
            ),
        )
    )


# --- calls ----------------------------------------------------------------------------------


class PatternCaller:
    """aio-pika's `patterns.RPC`: a reply queue of its own, transient requests (its default)."""

    def __init__(self, rpc: RPC, method: str) -> None:
        self.rpc, self.method = rpc, method

    @classmethod
    async def open(cls, connection: aio_pika.abc.AbstractConnection, method: str) -> PatternCaller:
        return cls(await RPC.create(await connection.channel()), method)

    async def call(self, n: int) -> Any:
        return await self.rpc.call(self.method, kwargs=s.payload(n))


@contextlib.asynccontextmanager
async def caller(bench: Bench, side: str) -> AsyncIterator[Callable[[int], Awaitable[Any]]]:
    """A fresh connection of `side` for one run, calling with numbered payloads."""
    apps, url = bench.apps, bench.args.url
    if side in ("amqtask", "transient"):
        contract = apps.echo if side == "amqtask" else apps.echo_transient
        app = amqtask.App(url, [contract], namespace=apps.NAMESPACE, name="bench")
        async with app:
            yield lambda n: app.call(contract, s.payload(n))
        return
    connection = await aio_pika.connect_robust(url)
    try:
        if side == PEER:
            yield (await PatternCaller.open(connection, apps.PATTERN_METHOD)).call
        else:
            contract = apps.raw_echo if side == "raw" else apps.raw_echo_classic
            exchange = apps.raw.names.task_exchange
            persistent = side == "raw"
            yield (
                await s.RawCaller.open(
                    connection, exchange, contract.routing_key, persistent=persistent
                )
            ).call
    finally:
        await connection.close()


def _cpu_of(pids: list[int]) -> float:
    return sum(s.cpu_seconds(pid) for pid in pids)


async def calls(bench: Bench) -> None:
    from bench.__main__ import Row

    args, env, apps = bench.args, bench.env, bench.apps
    in_flight = args.in_flight
    responders = {
        "amqtask": s.amqtask_worker("rpc", in_flight, 1, args.worker_log_level),
        "raw": s.raw_consumer("respond", apps.raw_echo.queue, in_flight),
        "raw transient": s.raw_consumer("respond", apps.raw_echo_classic.queue, in_flight),
        PEER: s.raw_consumer("rpc-pattern", apps.PATTERN_METHOD, in_flight),
    }
    queues = [
        apps.echo.queue,
        f"{apps.echo_transient.queue}.calls",
        apps.raw_echo.queue,
        apps.raw_echo_classic.queue,
        apps.PATTERN_METHOD,
    ]
    sides = ("amqtask", "raw", "transient", "raw transient", PEER)
    serves = {side: responders.get(side, responders["amqtask"]) for side in sides}
    async with s.consumers(env, list(responders.values())) as running:
        pid = {
            side: running.processes[list(responders.values()).index(command)].pid
            for side, command in serves.items()
        }

        async def ready() -> bool:
            for queue in queues:
                try:
                    if (await env.queue_state(queue))[1] < 1:
                        return False
                except aiormq.exceptions.AMQPChannelError:  # not declared yet (patterns.RPC)
                    env.channel = await env.connection.channel()  # a 404 closed the old one
                    return False
            return True

        await s.wait_until(ready, running)
        p50: dict[str, list[float]] = {side: [] for side in sides}
        p99: dict[str, list[float]] = {side: [] for side in sides}
        cpu: dict[str, list[tuple[float, float, float]]] = {side: [] for side in sides}
        broker = s.broker_pid(env.url)

        async def sequential(side: str) -> float:
            async with caller(bench, side) as call:
                await s.latencies(100, call)  # warm-up
                times = await s.latencies(args.calls, call)
            p50[side].append(s.percentile(times, 50) * 1000)
            p99[side].append(s.percentile(times, 99) * 1000)
            return p50[side][-1]

        await bench.compare("call latency p50 (ms)", sequential, sides)

        async def pipelined(side: str) -> float:
            async with caller(bench, side) as call:
                await s.sends(200, in_flight, call)  # warm-up
                before = (s.own_cpu(), _cpu_of([pid[side]]), _cpu_of([broker] if broker else []))
                rate = await s.sends(args.pipelined_calls, in_flight, call)
                after = (s.own_cpu(), _cpu_of([pid[side]]), _cpu_of([broker] if broker else []))
            used = [
                (b - a) / args.pipelined_calls * 1e6 for a, b in zip(before, after, strict=True)
            ]
            cpu[side].append((used[0], used[1], used[2]))
            return rate

        rates = await bench.compare(f"calls/s, {in_flight} in flight", pipelined, sides)
        running.check_alive()

    def cpu_note(*shown: str) -> str:
        def one(side: str) -> str:
            caller_us, responder_us, broker_us = (
                s.median([run[i] for run in cpu[side]]) for i in range(3)
            )
            broker_part = f", broker {broker_us:.0f}" if broker else ""
            return (
                f"{side} caller {caller_us:.0f}, responder {responder_us:.0f}{broker_part} us/call"
            )

        return "CPU per call: " + "; ".join(one(side) for side in shown)

    def row(name: str, unit: str, data: dict[str, list[float]], a: str, b: str, **kw: Any) -> None:
        label = kw.pop("baseline_label", "raw aio-pika" if b == "raw" else b)
        bench.rows.append(Row(name, unit, data[a], data[b], baseline_label=label, **kw))

    row("call latency p50, durable", "ms", p50, "amqtask", "raw", target=("<=", 1.2))
    row("call latency p99, durable", "ms", p99, "amqtask", "raw")
    row(
        f"calls, {in_flight} in flight, durable",
        "calls/s",
        rates,
        "amqtask",
        "raw",
        target=(">=", 0.85),
        note=cpu_note("amqtask", "raw"),
    )
    raw_transient = "raw aio-pika, transient to a classic queue"
    row(
        "call latency p50, transient",
        "ms",
        p50,
        "transient",
        "raw transient",
        baseline_label=raw_transient,
        target=("<=", 1.2),
    )
    row("call latency p99, transient", "ms", p99, "transient", "raw transient")
    row(
        f"calls, {in_flight} in flight, transient",
        "calls/s",
        rates,
        "transient",
        "raw transient",
        baseline_label=raw_transient,
        target=(">=", 0.9),
        note=cpu_note("transient", "raw transient", PEER),
    )
    row("call latency p50, transient vs the peer", "ms", p50, "transient", PEER, target=("<=", 1.0))
    row(
        f"calls, {in_flight} in flight, transient vs the peer",
        "calls/s",
        rates,
        "transient",
        PEER,
        target=(">=", 1.5),
    )
    # The client side's CPU per call (caller and responder together): on a machine shared with
    # other jobs calls/s swings with their load, what a call costs much less.
    client = {side: [caller + responder for caller, responder, _ in cpu[side]] for side in sides}
    row(
        f"client CPU, {in_flight} in flight, transient vs the peer",
        "us/call",
        client,
        "transient",
        PEER,
    )
    row(
        "call latency p50, transient vs durable",
        "ms",
        p50,
        "transient",
        "amqtask",
        baseline_label="amqtask durable",
    )
