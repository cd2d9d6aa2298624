"""The measurements: each runs one side (amqtask or raw aio-pika) once and returns its figure.

Both sides talk to the same broker, the same kind of queue (quorum, with the same arguments:
amqtask declares the topology once for both) and send the same payload. The raw side is what a
careful aio-pika user would write: a robust connection, a channel with publisher confirms,
persistent and mandatory publishes, manual acks; it skips what amqtask adds on purpose
(validation, a message id and task headers, typed replies, dead-lettering, logging).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)

from amqtask import _codec
from bench import _timeline

ROOT = Path(__file__).resolve().parents[1]
REPLY_TO = "amq.rabbitmq.reply-to"


async def lanes(count: int, concurrency: int, one: Callable[[int], Awaitable[Any]]) -> None:
    """Run `one(0..count-1)` with at most `concurrency` in flight (asyncio.gather of lanes)."""
    numbers = iter(range(count))

    async def lane() -> None:
        for n in numbers:
            await one(n)

    await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))


@dataclass
class Env:
    """What every measurement needs: the broker, the bench's names, a plain connection."""

    url: str
    namespace: str
    apps: Any  # the bench.app module, imported once BENCH_NAMESPACE is set
    connection: AbstractConnection
    channel: AbstractChannel

    @property
    def process_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AMQTASK_URL": self.url,
            "BENCH_NAMESPACE": self.namespace,
            "PYTHONPATH": str(ROOT),
        }

    async def queue_state(self, name: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue, by passive declare."""
        result = (await self.channel.declare_queue(name, passive=True)).declaration_result
        return result.message_count or 0, result.consumer_count or 0

    async def purge(self, name: str) -> None:
        await (await self.channel.get_queue(name, ensure=False)).purge()


# --- producing --------------------------------------------------------------------------------


class RawProducer:
    """aio-pika publishing: persistent, mandatory, one confirm awaited per publish."""

    def __init__(self, exchange: AbstractExchange, routing_key: str) -> None:
        self.exchange, self.routing_key = exchange, routing_key

    @classmethod
    async def open(cls, connection: AbstractConnection, exchange: str, key: str) -> RawProducer:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(await channel.get_exchange(exchange, ensure=False), key)

    async def send(self, n: int) -> None:
        body = orjson.dumps(payload(n))
        message = aio_pika.Message(
            body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self.exchange.publish(message, self.routing_key, mandatory=True)


class SameMessageProducer(RawProducer):
    """aio-pika publishing the very message amqtask sends: validated by the contract's pydantic
    model, serialized with orjson, with amqtask's task headers and message id. It tells apart the
    cost of that message from the cost of amqtask's code around it."""

    def __init__(self, exchange: AbstractExchange, routing_key: str, contract: Any) -> None:
        super().__init__(exchange, routing_key)
        self.contract = contract

    async def send(self, n: int) -> None:
        encoded = _codec.encode_task(self.contract, payload(n))
        message = aio_pika.Message(
            encoded.body,
            headers=encoded.headers,
            content_type=encoded.content_type,
            message_id=encoded.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self.exchange.publish(message, self.routing_key, mandatory=True)


def payload(n: int) -> dict[str, Any]:
    return {"n": n, "user": "ada", "text": "hello from the benchmark"}


async def preload(
    env: Env, raw_connection: AbstractConnection, count: int, contract: Any = None
) -> None:
    """Fill the job queue (or `contract`'s) with `count` amqtask task messages (fast: raw, 500
    in flight)."""
    names = env.apps.tasks.names
    contract = contract or env.apps.job
    channel = await raw_connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(names.task_exchange, ensure=False)

    async def one(n: int) -> None:
        message = _codec.encode_task(contract, payload(n))
        await exchange.publish(
            aio_pika.Message(
                message.body,
                headers=message.headers,
                content_type=message.content_type,
                message_id=message.message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            contract.routing_key,
        )

    await lanes(count, 500, one)
    await channel.close()


async def sends(count: int, concurrency: int, send: Callable[[int], Awaitable[Any]]) -> float:
    """Messages per second of `count` confirmed sends, `concurrency` in flight."""
    started = time.perf_counter()
    if concurrency == 1:
        for n in range(count):
            await send(n)
    else:
        await lanes(count, concurrency, send)
    return count / (time.perf_counter() - started)


# --- consumer processes -----------------------------------------------------------------------


def amqtask_worker(
    app: str, concurrency: int, processes: int, log_level: str, *options: str
) -> list[str]:
    command = [sys.executable, "-m", "amqtask", "worker", f"bench.app:{app}", "--json-logs"]
    command += ["--concurrency", str(concurrency), "--log-level", log_level, *options]
    return command + (["--processes", str(processes)] if processes > 1 else [])


def raw_consumer(mode: str, queue: str, prefetch: int) -> list[str]:
    return [sys.executable, "-m", "bench.raw", mode, queue, "--prefetch", str(prefetch)]


@dataclass
class Running:
    processes: list[asyncio.subprocess.Process]
    logs: list[Path]
    timelines: list[Counter[int]] = field(default_factory=list)  # filled once they exited

    def check_alive(self) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.returncode is not None:
                raise RuntimeError(
                    f"consumer process exited with {process.returncode}:\n"
                    + log.read_text()[-3000:]
                )


@contextlib.asynccontextmanager
async def consumers(env: Env, commands: list[list[str]]) -> AsyncIterator[Running]:
    """Start consumer processes; SIGTERM and wait for them (their timelines are then written)."""
    with tempfile.TemporaryDirectory(prefix="amqtask-bench-") as tmp:
        stats = Path(tmp) / "stats"
        stats.mkdir()
        processes, logs = [], []
        for i, command in enumerate(commands):
            log = Path(tmp) / f"consumer-{i}.log"
            with log.open("wb") as out:
                processes.append(
                    await asyncio.create_subprocess_exec(
                        *command,
                        cwd=ROOT,
                        env={**env.process_env, "BENCH_STATS_DIR": str(stats)},
                        stdout=out,
                        stderr=out,
                    )
                )
            logs.append(log)
        running = Running(processes, logs)
        try:
            yield running
        finally:
            for process in processes:
                if process.returncode is None:
                    process.terminate()
            for process, log in zip(processes, logs, strict=True):
                try:
                    code = await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    code = await process.wait()
                if code != 0:
                    print(
                        f"warning: consumer exited {code}: {log.read_text()[-2000:]}",
                        file=sys.stderr,
                    )
            running.timelines = _timeline.load(stats)


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], running: Running, timeout: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        running.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark waited too long for its consumers")
        await asyncio.sleep(0.02)


@dataclass
class Usage:
    """CPU used while a queue drained, per message: by the consumer processes and by the broker
    (when it runs on this machine), in microseconds; and how busy the whole machine was (0-1)."""

    consumers_us: float
    broker_us: float | None
    machine_busy: float


def own_cpu() -> float:
    """CPU seconds of this process (the benchmark, where the producers and callers run)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _process_tree(pid: int) -> list[int]:
    """`pid` and its children (a `--processes` supervisor's workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def broker_pid(url: str) -> int | None:
    """The local RabbitMQ (beam.smp) process that listens on `url`'s AMQP port, if the broker
    runs on this machine. Found by its listening socket, not its age: tests start private nodes
    of their own (on other ports), and one may be older than the broker measured."""
    port = urlsplit(url).port or (5671 if url.startswith("amqps") else 5672)
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() != "beam.smp":
                continue
            fds = comm.parent / "fd"
            for fd in fds.iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(comm.parent.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return None


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on `port` (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; the inode is field 9.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found


@dataclass
class _Snapshot:
    consumers: float
    broker: float
    machine: tuple[int, int]

    @classmethod
    def take(cls, running: Running, broker: int | None) -> _Snapshot:
        pids = [p for process in running.processes for p in _process_tree(process.pid)]
        return cls(
            consumers=sum(map(cpu_seconds, pids)),
            broker=cpu_seconds(broker) if broker else 0.0,
            machine=_machine_jiffies(),
        )


async def drain(env: Env, queue: str, running: Running, count: int) -> Usage:
    """Wait until the queue is empty and its deliveries in flight are done; return the CPU used
    from the first delivery taken to the last."""
    broker = broker_pid(env.url)
    first: _Snapshot | None = None
    deadline = time.monotonic() + 120
    while True:
        running.check_alive()
        ready, _ = await env.queue_state(queue)
        if first is None and ready < count:
            first = _Snapshot.take(running, broker)
        if ready == 0:
            last = _Snapshot.take(running, broker)
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"queue {queue} did not drain within 120 s")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # the last prefetch window (at most `prefetch` messages) is acked
    assert first is not None
    busy, total = (b - a for a, b in zip(first.machine, last.machine, strict=True))
    return Usage(
        consumers_us=(last.consumers - first.consumers) / count * 1e6,
        broker_us=(last.broker - first.broker) / count * 1e6 if broker else None,
        machine_busy=busy / total if total else 0.0,
    )


async def consume_rate(
    env: Env, commands: list[list[str]], count: int, queue: str | None = None
) -> tuple[float, Usage]:
    """Messages per second the consumer processes (and their children) drain a preloaded queue
    (the job queue unless told) of `count` at."""
    queue = queue or env.apps.job.queue
    async with consumers(env, commands) as running:
        usage = await drain(env, queue, running, count)
    rate, total = _timeline.throughput(running.timelines)
    if total != count:
        print(f"warning: {total} of {count} messages processed", file=sys.stderr)
    return rate, usage


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of a process (VmHWM in /proc/PID/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for process {pid}")


async def worker_peak_rss(env: Env, command: list[str], count: int) -> float:
    """Peak RSS (MiB) of one worker process draining a preloaded queue of `count`."""
    async with consumers(env, [command]) as running:
        await drain(env, env.apps.job.queue, running, count)
        return vm_hwm_kib(running.processes[0].pid) / 1024


# --- RPC --------------------------------------------------------------------------------------


class RawCaller:
    """aio-pika RPC over direct reply-to: confirmed, mandatory requests, a future per call;
    persistent requests, or transient ones (`persistent=False`)."""

    def __init__(
        self, channel: AbstractChannel, exchange: AbstractExchange, key: str, persistent: bool
    ) -> None:
        self.channel, self.exchange, self.key = channel, exchange, key
        self.pending: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self.mode = (
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        )

    @classmethod
    async def open(
        cls, connection: AbstractConnection, exchange: str, key: str, *, persistent: bool = True
    ) -> RawCaller:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        caller = cls(channel, await channel.get_exchange(exchange, ensure=False), key, persistent)
        replies = await channel.get_queue(REPLY_TO, ensure=False)
        await replies.consume(caller.on_reply, no_ack=True)
        return caller

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self.pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)

    async def call(self, n: int) -> Any:
        correlation_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = future
        message = aio_pika.Message(
            orjson.dumps(payload(n)),
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=REPLY_TO,
            expiration=30,
            delivery_mode=self.mode,
        )
        await self.exchange.publish(message, self.key, mandatory=True)
        return orjson.loads((await asyncio.wait_for(future, 30)).body)


async def latencies(count: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    """Seconds each of `count` sequential calls took."""
    result = []
    for n in range(count):
        started = time.perf_counter()
        await call(n)
        result.append(time.perf_counter() - started)
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved(repeat: int, sides: tuple[str, ...]) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Repetition number and the order of the sides in it (alternating, to cancel drift)."""
    for rep in range(repeat):
        yield rep, (sides if rep % 2 == 0 else sides[::-1])
