"""amqtask against peer frameworks, on the same broker in the same run: Celery, Dramatiq,
FastStream and Taskiq (with taskiq-aio-pika).

The peers never enter amqtask's venv: `python -m bench` builds `.bench-peers/` (a venv beside
the checkout, git-ignored) on first use from `bench/peers/requirements.txt`, one pinned line per
peer, and reuses it after. Each peer runs as a subprocess of that venv's Python, from its script
in `bench/peers/`, driven the way the raw aio-pika twin is: its own producer fills a queue of its
own, then its worker drains it and the completion timelines give the rate (from the first
delivery taken to the last, as for amqtask), with the CPU of the worker process and its children
read from `/proc`. Each peer's queues and exchanges are named under the bench namespace and
deleted afterwards. A peer that cannot be installed or run is reported as "not run" with the
reason, never left out silently.

Rows, each amqtask against the best peer of the run (`peers` scenario): no-op tasks processed by
one process and confirmed sends with 100 in flight (on quorum queues; Dramatiq, whose queues are
classic, against amqtask on a classic queue), call latency p50 and calls with 100 in flight
(aio-pika's `patterns.RPC` and FastStream's `request`; Celery's `rpc://` result backend is not
measured, Dramatiq and Taskiq have no request/response over AMQP). Goal: ahead of the best peer in
every row, by 1.5x in every throughput row. The `pool` scenario adds Celery's prefork pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiormq.exceptions
import orjson

import amqtask
from bench import _scenarios as s
from bench import speed

if TYPE_CHECKING:
    from bench.__main__ import Bench

VENV = s.ROOT / ".bench-peers"
REQUIREMENTS = s.ROOT / "bench" / "peers" / "requirements.txt"
TIMEOUT = 300.0  # seconds a producer or caller subprocess may take


@dataclass(frozen=True)
class Peer:
    """A framework measured against amqtask: its script and the entities it creates."""

    name: str  # as shown in the table
    project: str  # its first requirement's project name (the line of requirements.txt)
    module: str  # bench.peers.<module>
    queue_suffixes: tuple[str, ...] = ("",)  # queues it declares: f"{queue}{suffix}"
    exchange: bool = False  # an exchange named like its queue
    queue_type: str = "quorum"  # of its task queue: amqtask is compared on the same kind

    def queue(self, namespace: str, purpose: str = "tasks") -> str:
        return f"{namespace}.peer.{self.module.removesuffix('_peer')}.{purpose}"


CELERY = Peer("Celery", "celery", "celery_peer", exchange=True)
# Dramatiq declares its queues itself, classic ones (its arguments are fixed).
DRAMATIQ = Peer("Dramatiq", "dramatiq", "dramatiq_peer", ("", ".DQ", ".XQ"), queue_type="classic")
FASTSTREAM = Peer("FastStream", "faststream", "faststream_peer")
TASKIQ = Peer("Taskiq", "taskiq", "taskiq_peer", ("", ".dead"), exchange=True)
PEERS = (CELERY, DRAMATIQ, FASTSTREAM, TASKIQ)
RPC_PATTERN = speed.PEER  # "aio-pika patterns.RPC"


class PeerFailed(RuntimeError):
    """A peer could not be installed or did not run to the end; the message says why."""


def _project(line: str) -> str:
    return line.split()[0].split("[")[0].split("=")[0].strip().lower()


@dataclass
class Peers:
    """The peers' venv and what happened to each peer: installed, or not run and why."""

    enabled: bool
    failed: dict[str, str] = field(default_factory=dict)  # peer name -> reason
    ready: bool = False

    @property
    def python(self) -> Path:
        return VENV / "bin" / "python"

    def ensure(self) -> None:
        """Build the venv once and install each peer's pinned line that is not installed yet (a
        stamp per line); a line that fails marks its peer not run."""
        if self.ready or not self.enabled:
            if not self.enabled:
                for peer in PEERS:
                    self.failed.setdefault(peer.name, "--no-peers")
            return
        self.ready = True
        if not self.python.exists():
            print(f"building {VENV} for the peer frameworks (once)", file=sys.stderr, flush=True)
            done = subprocess.run(
                [sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True
            )
            if done.returncode != 0:
                for peer in PEERS:
                    self.failed[peer.name] = f"python -m venv failed: {_last_line(done.stderr)}"
                return
        lines = [
            line.strip()
            for line in REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        for peer in PEERS:
            line = next((ln for ln in lines if _project(ln) == peer.project), None)
            if line is None:
                self.failed[peer.name] = f"no line for {peer.project} in {REQUIREMENTS.name}"
                continue
            stamp = VENV / f"installed-{hashlib.sha256(line.encode()).hexdigest()[:16]}"
            if stamp.exists():
                continue
            print(f"installing {line} into {VENV.name}/", file=sys.stderr, flush=True)
            pip = [str(self.python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            done = subprocess.run(
                [*pip, *line.split()],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                self.failed[peer.name] = f"pip install {line} failed: {_last_line(done.stderr)}"
            else:
                stamp.write_text(line + "\n")

    def runs(self, peer: Peer) -> bool:
        return peer.name not in self.failed

    def command(self, peer: Peer, mode: str, queue: str, **options: Any) -> list[str]:
        command = [str(self.python), "-m", f"bench.peers.{peer.module}", mode, queue]
        for key, value in options.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        return command


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


async def figures(env: s.Env, command: list[str]) -> dict[str, float]:
    """Run a peer's `produce` or `call` to the end; the JSON figures it printed last."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=s.ROOT,
        env=env.process_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise PeerFailed(f"{' '.join(command[2:5])} took over {TIMEOUT:.0f} s") from None
    if process.returncode != 0:
        raise PeerFailed(
            f"{' '.join(command[2:5])} exited {process.returncode}: {_last_line(err.decode())}"
        )
    lines = out.decode().strip().splitlines()
    if not lines:
        raise PeerFailed(f"{' '.join(command[2:5])} printed no figures")
    result: dict[str, float] = orjson.loads(lines[-1])
    return result


async def _purge_if_there(env: s.Env, queue: str) -> None:
    try:
        await env.purge(queue)
    except aiormq.exceptions.AMQPChannelError:  # not declared yet: a 404 closed the channel
        env.channel = await env.connection.channel()


async def _ready_at_least(env: s.Env, queue: str, count: int) -> None:
    """Wait (briefly) until a filled quorum queue reports all `count` messages ready."""
    for _ in range(250):
        if (await env.queue_state(queue))[0] >= count:
            return
        await asyncio.sleep(0.02)
    raise PeerFailed(f"{queue} did not report {count} messages ready after the sends")


async def drain(
    bench: Bench,
    peer: Peer,
    count: int,
    *,
    workload: str = "noop",
    children: int = 0,
    purpose: str = "tasks",
) -> tuple[float, s.Usage]:
    """Fill the peer's queue with `count` tasks by its own producer, then time its worker
    draining it (`children`: Celery's prefork pool size; 0 runs one process)."""
    env, peers = bench.env, bench.peer_env
    queue = peer.queue(env.namespace, purpose)
    await _purge_if_there(env, queue)
    options = {"workload": workload}
    await figures(env, peers.command(peer, "produce", queue, count=count, in_flight=100, **options))
    await _ready_at_least(env, queue, count)
    worker = peers.command(peer, "work", queue, prefetch=bench.args.prefetch, **options)
    if children:
        worker += ["--children", str(children)]
    try:
        return await s.consume_rate(env, [worker], count, queue)
    except (RuntimeError, TimeoutError) as error:
        raise PeerFailed(f"worker: {_last_line(str(error))}") from error


async def delete_entities(
    bench: Bench, purposes: tuple[str, ...] = ("tasks", "noop", "cpu", "rpc")
) -> None:
    """Delete every queue and exchange the peers may have created under this run's namespace."""
    connection, namespace = bench.env.connection, bench.env.namespace
    for peer in PEERS:
        for purpose in purposes:
            queue = peer.queue(namespace, purpose)
            names = [("queue", f"{queue}{suffix}") for suffix in peer.queue_suffixes]
            names += [("exchange", queue)] if peer.exchange else []
            for kind, name in names:
                async with connection.channel() as channel:
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)


# --- the peers scenario -----------------------------------------------------------------------


@dataclass
class Sides:
    """Each side's runs in one comparison; a peer that fails is dropped with its reason."""

    bench: Bench
    failed: dict[str, str] = field(default_factory=dict)

    def guard(self, one: Callable[[str], Awaitable[float]]) -> Callable[[str], Awaitable[float]]:
        async def guarded(side: str) -> float:
            if side in self.failed:
                return math.nan
            try:
                return await one(side)
            except PeerFailed as error:
                self.failed[side] = str(error)
                self.bench.log(f"{side}: not run: {error}")
                return math.nan

        return guarded


def _best(runs: dict[str, list[float]], peers: list[str], higher: bool) -> str | None:
    measured = [p for p in peers if runs.get(p) and not any(math.isnan(v) for v in runs[p])]
    if not measured:
        return None
    key = lambda p: s.median(runs[p])  # noqa: E731
    return max(measured, key=key) if higher else min(measured, key=key)


def _others(runs: dict[str, list[float]], peers: list[str], unit: str) -> str:
    shown = []
    for peer in peers:
        values = runs.get(peer, [])
        if values and not any(math.isnan(v) for v in values):
            median = s.median(values)
            shown.append(f"{peer} {median:,.0f}" if median >= 100 else f"{peer} {median:.3g}")
    return f"{', '.join(shown)} {unit}" if shown else ""


async def measure(bench: Bench) -> None:
    """The `peers` scenario: amqtask against every peer that runs, row by row."""
    from bench.__main__ import Row

    args, env, apps, peers = bench.args, bench.env, bench.apps, bench.peer_env
    peers.ensure()
    running = [peer for peer in PEERS if peers.runs(peer)]
    by_name = {peer.name: peer for peer in running}
    sides = Sides(bench, failed={})
    rows: list[tuple[str, str, dict[str, list[float]], str, list[str], bool, str]] = []

    def add(
        name: str,
        unit: str,
        runs: dict[str, list[float]],
        compared: list[str],
        higher: bool,
        note: str = "",
        ours: str = "amqtask",
    ) -> None:
        rows.append((name, unit, runs, ours, compared, higher, note))

    # Tasks go to quorum queues, except Dramatiq's (classic): those rows are split by queue
    # kind, amqtask on a classic queue (`bench.app:tasks_classic`) against the classic peers.
    quorum = [peer.name for peer in running if peer.queue_type == "quorum"]
    classic = [peer.name for peer in running if peer.queue_type == "classic"]
    ours = ("amqtask", "amqtask classic") if classic else ("amqtask",)

    def add_by_queue(name: str, unit: str, runs: dict[str, list[float]], note: str) -> None:
        add(f"{name}, quorum queues", unit, runs, quorum, True, note)
        if classic:
            add(f"{name}, classic queues", unit, runs, classic, True, ours="amqtask classic")

    try:
        # 1. No-op tasks processed by one process.
        usage: dict[str, list[s.Usage]] = {}

        async def processed(side: str) -> float:
            if side in ours:
                app, contract = (
                    ("tasks", apps.job)
                    if side == "amqtask"
                    else (
                        "tasks_classic",
                        apps.job_classic,
                    )
                )
                await env.purge(contract.queue)
                await s.preload(env, bench.raw, args.consume, contract)
                command = s.amqtask_worker(app, args.prefetch, 1, args.worker_log_level)
                rate, used = await s.consume_rate(env, [command], args.consume, contract.queue)
            else:
                rate, used = await drain(bench, by_name[side], args.consume)
            usage.setdefault(side, []).append(used)
            return rate

        names = [peer.name for peer in running]
        runs = await bench.compare(
            "no-op tasks processed, 1 process",
            sides.guard(processed),
            (*ours, *names),
            args.worker_repeat,
        )
        cpu = "; ".join(
            f"{side} {s.median([u.consumers_us for u in used]):.0f}"
            for side, used in usage.items()
            if side not in sides.failed
        )
        add_by_queue(
            "no-op tasks processed, 1 process",
            "tasks/s",
            runs,
            f"CPU per task (us, the worker process): {cpu}",
        )

        # 2. Confirmed sends, 100 in flight.
        in_flight = args.concurrency

        async def sent(side: str) -> float:
            if side in ours:
                contract = apps.job if side == "amqtask" else apps.job_classic
                app = amqtask.App(args.url, [contract], namespace=apps.NAMESPACE, name="bench")
                async with app:
                    send = lambda n: app.send(contract, s.payload(n))  # noqa: E731
                    await s.sends(200, in_flight, send)  # warm-up
                    rate = await s.sends(args.pipelined, in_flight, send)
                await env.purge(contract.queue)
                return rate
            peer = by_name[side]
            queue = peer.queue(env.namespace)
            command = peers.command(
                peer, "produce", queue, count=args.pipelined, in_flight=in_flight, warmup=200
            )
            result = await figures(env, command)
            await _purge_if_there(env, queue)
            return result["rate"]

        runs = await bench.compare(
            f"confirmed sends, {in_flight} in flight", sides.guard(sent), (*ours, *names)
        )
        add_by_queue(
            f"confirmed sends, {in_flight} in flight",
            "msgs/s",
            runs,
            "Celery and Dramatiq send from blocking calls: one thread per send in flight",
        )

        # 3. Calls: amqtask's transient calls, aio-pika's patterns.RPC, FastStream's request.
        await calls(bench, sides, add)
    finally:
        await delete_entities(bench)

    for name, unit, runs, side, compared, higher, note in rows:
        best = _best(runs, compared, higher)
        if best is None or any(math.isnan(v) for v in runs[side]):
            bench.not_run.append(f"{name}: no peer measured")
            continue
        throughput = unit != "ms"
        target = (">=", 1.5) if throughput else ("<=", 1.0)
        others = _others(runs, [p for p in compared if p != best], unit)
        text = "; ".join(part for part in (f"others: {others}" if others else "", note) if part)
        bench.rows.append(
            Row(
                f"{name} vs the best peer",
                unit,
                runs[side],
                runs[best],
                baseline_label=best,
                target=target,
                note=text,
            )
        )
    for side, reason in {**peers.failed, **sides.failed}.items():
        bench.not_run.append(f"{side}: not run: {reason}")
    bench.not_run.append(
        "Celery calls (rpc:// result backend): not run: `.get()` blocks a thread per call"
    )


async def calls(
    bench: Bench,
    sides: Sides,
    add: Callable[..., None],
) -> None:
    """Sequential calls (p50) and calls with `--in-flight` in flight, each side with its own
    responder process running throughout."""
    args, env, apps, peers = bench.args, bench.env, bench.apps, bench.peer_env
    in_flight = args.in_flight
    responders = {
        "amqtask": s.amqtask_worker("rpc", in_flight, 1, args.worker_log_level),
        RPC_PATTERN: s.raw_consumer("rpc-pattern", apps.PATTERN_METHOD, in_flight),
    }
    queues = [f"{apps.echo_transient.queue}.calls", apps.PATTERN_METHOD]
    compared = [RPC_PATTERN]
    rpc_queue = FASTSTREAM.queue(env.namespace, "rpc")
    if peers.runs(FASTSTREAM):
        responders[FASTSTREAM.name] = peers.command(
            FASTSTREAM, "respond", rpc_queue, prefetch=in_flight
        )
        queues.append(rpc_queue)
        compared.append(FASTSTREAM.name)

    async with s.consumers(env, list(responders.values())) as running:

        async def ready() -> bool:
            for queue in queues:
                try:
                    if (await env.queue_state(queue))[1] < 1:
                        return False
                except aiormq.exceptions.AMQPChannelError:  # not declared yet
                    env.channel = await env.connection.channel()
                    return False
            return True

        await s.wait_until(ready, running)

        @contextlib.asynccontextmanager
        async def caller(side: str) -> AsyncIterator[Callable[[int], Awaitable[Any]]]:
            async with speed.caller(bench, "transient" if side == "amqtask" else side) as call:
                yield call

        async def fast(count: int, flight: int) -> dict[str, float]:
            command = peers.command(
                FASTSTREAM, "call", rpc_queue, count=count, in_flight=flight, warmup=100
            )
            return await figures(env, command)

        async def p50(side: str) -> float:
            if side == FASTSTREAM.name:
                return (await fast(args.calls, 1))["p50"]
            async with caller(side) as call:
                await s.latencies(100, call)  # warm-up
                times = await s.latencies(args.calls, call)
            return s.percentile(times, 50) * 1000

        async def pipelined(side: str) -> float:
            if side == FASTSTREAM.name:
                return (await fast(args.pipelined_calls, in_flight))["rate"]
            async with caller(side) as call:
                await s.sends(200, in_flight, call)  # warm-up
                return await s.sends(args.pipelined_calls, in_flight, call)

        order = ("amqtask", *compared)
        latency = await bench.compare("call p50 (ms)", sides.guard(p50), order)
        rates = await bench.compare(
            f"calls/s, {in_flight} in flight", sides.guard(pipelined), order
        )
        running.check_alive()
    kind = "amqtask's transient calls (classic call queue, transient requests, as the peers')"
    add("call p50", "ms", latency, compared, False, kind)
    add(f"calls, {in_flight} in flight", "calls/s", rates, compared, True)
