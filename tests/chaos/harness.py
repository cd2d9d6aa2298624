"""The chaos run: send, consume and break things at random, then count what every send became.

One run, all of it on a private RabbitMQ node (never the shared broker):

1. Start a `PrivateNode` and a `CuttableProxy` in front of it; declare the chaos app's topology.
2. Start `amqtask worker tests.chaos.app:app --processes 2 --metrics-port P` through the proxy.
3. For `duration` seconds, producer lanes in this process send confirmed tasks through the proxy
   (a fraction with `delay=` 1 to 3 s), while an injector runs a shuffled, bounded list of faults
   at random moments: broker kill -9 and restart on the same data dir, kill -9 of a worker child
   (a child of the supervisor's pid), and a cut of every TCP connection through the proxy.
4. Drain: wait (bounded) until every confirmed send was processed or dead-lettered, then read the
   in-flight gauge of every worker process from /metrics.
5. Stop the supervisor with SIGTERM and print one table, the faults' timeline and the evidence
   behind every failed invariant (worker log events, dead letters, lost ids, each with the fault
   that preceded it).

The invariants (`Result.failures`): nothing confirmed is lost, nothing is dead-lettered (the
handler only ever raises a retryable error, and only on a first attempt), no handler slot is
stuck after the drain, and the supervisor never exits on its own. Duplicates (at-least-once) and
unconfirmed sends (`PublishInterrupted`/`PublishTimeout`: outcome unknown) are reported only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection

import amqtask

from ..integration.private_node import QUORUM_REGISTRATION_SETTLE, PrivateNode
from ..integration.proxy import CuttableProxy, start_proxy
from .contract import Job, chaos_contract

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.chaos.app:app"
RECONNECT = "?reconnect_interval=1"  # the robust connection retries every 5 s by default
UNCONFIRMED = (amqtask.PublishInterrupted, amqtask.PublishTimeout)
FAULT_KINDS = ("broker_restart", "worker_kill", "tcp_cut")
# Worker log events that tell why an invariant failed; every warning or error is counted anyway.
NOTABLE = (
    "settle_failed",
    "retry_publish_failed",
    "dead_letter_publish_failed",
    "task_failed",
    "task_rejected",
    "worker_process_died",
    "worker_process_failed_to_start",
    "worker_abandoned_tasks",
    "supervisor_stopped",
)


@dataclass(frozen=True)
class Config:
    """What one run does; `short()` is the `make test` version, `long()` the `make chaos` one."""

    duration: float = 180.0  # seconds of sending and faults
    broker_restarts: int = 3
    worker_kills: int = 6
    tcp_cuts: int = 8
    seed: int = 0
    rate: float = 100.0  # sends per second, all lanes together, at most
    lanes: int = 4
    delayed_percent: int = 20  # sends with delay= 1 to 3 s
    fail_percent: int = 20  # tasks whose first attempt raises a retryable error
    handler_max_sleep: float = 0.1  # each handler sleeps up to this: kills and cuts hit some
    concurrency: int = 8  # per worker process
    processes: int = 2
    send_timeout: float = 10.0
    drain_timeout: float = 120.0
    settle_timeout: float = 15.0  # for the in-flight gauges to reach 0 after the drain
    workdir: Path | None = None  # record file, worker log, node log; a temporary one if None

    @classmethod
    def short(cls, seed: int) -> Config:
        return cls(
            duration=30, broker_restarts=1, worker_kills=2, tcp_cuts=3, seed=seed, drain_timeout=30
        )

    @classmethod
    def long(cls, seed: int, duration: float = 180.0) -> Config:
        return cls(
            duration=duration,
            broker_restarts=max(1, int(duration // 60)),
            worker_kills=max(1, int(duration // 30)),
            tcp_cuts=max(2, int(duration // 22)),
            seed=seed,
        )


# --- what happened ------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at: float  # seconds since the run's start
    took: float = 0.0
    detail: str = ""


@dataclass
class Sent:
    message_id: str
    at: float
    delay: int


@dataclass
class DeadLetter:
    n: int | None
    message_id: str | None
    reason: str
    error: str
    at: float | None  # when it was dead-lettered (x-death: whole seconds), since the run's start


@dataclass
class LogLine:
    at: float | None
    event: str
    level: str
    fields: dict[str, Any]


@dataclass
class Result:
    """Everything one run counted, and the evidence behind it."""

    config: Config
    namespace: str
    workdir: Path
    confirmed: dict[int, Sent] = field(default_factory=dict)
    unconfirmed: Counter[str] = field(default_factory=Counter)
    unconfirmed_ids: set[int] = field(default_factory=set)
    other_send_errors: Counter[str] = field(default_factory=Counter)
    processed: Counter[int] = field(default_factory=Counter)
    dead: list[DeadLetter] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    supervisor_exits: list[tuple[float, int | None, str]] = field(default_factory=list)
    supervisor_stop_code: int | None = None
    drain_time: float | None = None  # None: timed out
    in_flight: dict[int, float | None] = field(default_factory=dict)  # metrics port -> gauge
    left: dict[str, int] = field(default_factory=dict)  # queue group -> messages left
    log: list[LogLine] = field(default_factory=list)
    plain_log_lines: list[str] = field(default_factory=list)  # worker output that is not JSON
    started_wall: float = 0.0  # time.time() at the run's start

    # -- the counts ------------------------------------------------------------------------

    @property
    def dead_ids(self) -> set[int]:
        return {d.n for d in self.dead if d.n is not None}

    @property
    def lost(self) -> list[int]:
        return sorted(set(self.confirmed) - set(self.processed) - self.dead_ids)

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.processed.values())

    @property
    def stuck_slots(self) -> float | None:
        """The in-flight gauges summed; None if some worker process did not answer."""
        values = list(self.in_flight.values())
        if not values or any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None)

    def failures(self) -> list[str]:
        """The invariants that failed, one line each; empty when the run passed."""
        failed = []
        if self.lost:
            failed.append(f"lost: {len(self.lost)} confirmed sends never processed")
        if self.dead:
            failed.append(f"unexpectedly dead-lettered: {len(self.dead)}")
        stuck = self.stuck_slots
        if stuck is None:
            failed.append(f"slots stuck at the end: unknown (metrics: {self.in_flight})")
        elif stuck:
            failed.append(f"slots stuck at the end: {stuck:g}")
        if self.supervisor_exits:
            failed.append(f"supervisor exits: {len(self.supervisor_exits)}")
        return failed

    # -- the report ------------------------------------------------------------------------

    def table(self) -> str:
        c = self.config
        stuck = self.stuck_slots
        drain = "timed out" if self.drain_time is None else f"{self.drain_time:.1f} s"
        unconfirmed_processed = len(self.unconfirmed_ids & set(self.processed))
        rows: list[tuple[str, str, str]] = [
            ("confirmed sends", str(len(self.confirmed)), ""),
            ("processed (distinct ids)", str(len(set(self.processed) & set(self.confirmed))), ""),
            ("lost", str(len(self.lost)), "0"),
            ("duplicates", str(self.duplicates), ""),
            ("unexpectedly dead-lettered", str(len(self.dead)), "0"),
            ("slots stuck at the end", "unknown" if stuck is None else f"{stuck:g}", "0"),
            ("supervisor exits", str(len(self.supervisor_exits)), "0"),
            (f"drain time (bound {c.drain_timeout:g} s)", drain, ""),
            (
                "unconfirmed sends",
                f"{sum(self.unconfirmed.values())} ({_counts(self.unconfirmed)}); "
                f"{unconfirmed_processed} processed anyway",
                "",
            ),
        ]
        if self.other_send_errors:
            rows.append(("other send errors", _counts(self.other_send_errors), ""))
        failed = {line.split(":")[0] for line in self.failures()}
        width = max(len(name) for name, _, _ in rows)
        lines = [
            f"chaos run: namespace {self.namespace}, seed {c.seed}, {c.duration:g} s of faults, "
            f"{_counts(Counter(f.kind for f in self.faults))}",
            f"{'':{width}}  {'value':>10}  must be",
        ]
        for name, value, must in rows:
            verdict = ""
            if must:
                verdict = "FAIL" if name in failed else "ok"
            lines.append(f"{name:{width}}  {value:>10}  {must:>7}  {verdict}".rstrip())
        return "\n".join(lines)

    def evidence(self) -> str:
        lines = ["faults:"]
        for fault in self.faults:
            lines.append(
                f"  t={fault.at:6.1f}s  {fault.kind:<14} {fault.took:5.1f}s  {fault.detail}"
            )
        lines.append(
            "left on the broker after the drain: "
            + (", ".join(f"{k}={v}" for k, v in self.left.items()) or "unknown")
        )
        lines.append(f"in-flight gauges by metrics port: {self.in_flight}")
        if self.supervisor_stop_code is not None:
            lines.append(f"supervisor exit code on SIGTERM at the end: {self.supervisor_stop_code}")
        events = Counter(  # stdlib records (aio-pika's) have their whole message as the event
            line.event[:60] for line in self.log if line.level in ("warning", "error", "critical")
        )
        lines.append(f"worker log, warnings and errors: {_counts(events) or 'none'}")
        if self.plain_log_lines:
            common = Counter(self.plain_log_lines).most_common(4)
            lines.append(f"worker log lines that are not JSON: {len(self.plain_log_lines)}, most:")
            lines += [f"  {count} x {text[:150]}" for text, count in common]
        for at, code, before in self.supervisor_exits:
            lines.append(f"supervisor exited at t={at:.1f}s with {code} (after {before})")
            for line in self._log_near(at, ("worker_process_failed_to_start", "error"), 3):
                lines.append(f"  {line}")
        for event in ("settle_failed", "retry_publish_failed", "dead_letter_publish_failed"):
            hits = [line for line in self.log if line.event == event]
            if hits:
                lines.append(f"{event}: {len(hits)}, by preceding fault: {self._by_fault(hits)}")
                lines += [f"  {self._show(line)}" for line in hits[:3]]
        if self.dead:
            reasons = Counter(f"{d.reason}" for d in self.dead)
            lines.append(f"dead letters by reason: {_counts(reasons)}")
            after = Counter(self.preceding(self._dead_at(d)) for d in self.dead)
            lines.append(f"dead letters by preceding fault: {_counts(after)}")
            for letter in self.dead[:5]:
                when = "?" if letter.at is None else f"{letter.at:.1f}s"
                lines.append(
                    f"  n={letter.n} t={when} reason={letter.reason} error={letter.error[:140]!r}"
                    ", its worker log:"
                )
                lines += [f"    {self._show(line)}" for line in self._about(letter.message_id)]
        if self.lost:
            sent_after = Counter(self.preceding(self.confirmed[n].at) for n in self.lost)
            delayed = sum(1 for n in self.lost if self.confirmed[n].delay)
            lines.append(
                f"lost ids: {len(self.lost)} ({delayed} sent with a delay), confirmed after: "
                f"{_counts(sent_after)}"
            )
            for n in self.lost[:5]:
                sent = self.confirmed[n]
                about = self._about(sent.message_id)
                lines.append(
                    f"  n={n} confirmed t={sent.at:.1f}s delay={sent.delay}s, its worker log:"
                    + ("" if about else " nothing")
                )
                lines += [f"    {self._show(line)}" for line in about]
        return "\n".join(lines)

    def report(self) -> str:
        failures = self.failures()
        verdict = "PASSED" if not failures else "FAILED: " + "; ".join(failures)
        return f"{self.table()}\n{self.evidence()}\n{verdict}\nfiles: {self.workdir}"

    # -- helpers ---------------------------------------------------------------------------

    def preceding(self, at: float | None) -> str:
        """The last fault that started before `at`, as "kind@t", or "no fault"."""
        if at is None:
            return "unknown time"
        before = [f for f in self.faults if f.at <= at]
        if not before:
            return "no fault"
        return f"{before[-1].kind}@{before[-1].at:.0f}s"

    def _dead_at(self, letter: DeadLetter) -> float | None:
        """When a message was dead-lettered: its last worker log line before the broker's time,
        which has whole seconds only."""
        if letter.at is None:
            return None
        lines = [
            line.at
            for line in self._about(letter.message_id, count=100)
            if line.at is not None and line.at < letter.at + 1
        ]
        return lines[-1] if lines else letter.at

    def _about(self, message_id: str | None, count: int = 6) -> list[LogLine]:
        """The last worker log lines about one message."""
        return [line for line in self.log if line.fields.get("message_id") == message_id][-count:]

    def _by_fault(self, lines: list[LogLine]) -> str:
        return _counts(Counter(self.preceding(line.at) for line in lines))

    def _show(self, line: LogLine) -> str:
        at = "?" if line.at is None else f"{line.at:.1f}s"
        fields = {k: v for k, v in line.fields.items() if k not in ("timestamp", "level", "event")}
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"t={at} {line.event} ({self.preceding(line.at)}) {text[:200]}"

    def _log_near(self, at: float, events: tuple[str, ...], count: int) -> Iterator[str]:
        near = [
            line
            for line in self.log
            if line.at is not None
            and at - 30 <= line.at <= at + 1
            and (line.event in events or line.level in events)
        ]
        for line in near[-count:]:
            yield self._show(line)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in counter.most_common())


# --- the run ------------------------------------------------------------------------------------


class Run:
    """One chaos run; `await Run(config).execute()` returns its `Result`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.rng = random.Random(config.seed)  # the sends
        self.fault_rng = random.Random(config.seed + 1)  # the faults' order, moments and details
        self.namespace = f"chaos{uuid.uuid4().hex[:8]}"
        self.contract = chaos_contract(self.namespace)
        self.workdir = config.workdir or Path(f"/tmp/amqtask-chaos-{self.namespace}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "marks").mkdir(exist_ok=True)
        self.record = self.workdir / "record.txt"
        self.worker_log = self.workdir / "worker.log"
        self.result = Result(config, self.namespace, self.workdir)
        self.started = time.monotonic()
        self.metrics_port = _free_port_pair()
        self.node: PrivateNode | None = None
        self.proxy: CuttableProxy | None = None
        self.proxied_url = ""
        self.supervisor: asyncio.subprocess.Process | None = None
        self._log_file: IO[bytes] | None = None
        self._stopping = False
        self._record_offset = 0
        self._counter = itertools.count()
        self._restarting = asyncio.Lock()

    def now(self) -> float:
        return time.monotonic() - self.started

    async def execute(self) -> Result:
        self.result.started_wall = time.time()
        self.started = time.monotonic()
        node = self.node = PrivateNode()
        watcher: asyncio.Task[None] | None = None
        try:
            await asyncio.to_thread(node.start, 60)
            self.proxy, url = await start_proxy(node.url)
            self.proxied_url = url.split("?")[0] + RECONNECT
            await self.declarer(node.url).declare()
            # A quorum queue's registration must reach the disk before a kill -9 (see there).
            await asyncio.sleep(QUORUM_REGISTRATION_SETTLE)
            await self._start_supervisor()
            watcher = asyncio.create_task(self._watch_supervisor())
            await self._wait_workers_ready(60)
            await self._produce_under_faults()
            await self._drain()
            await self._read_in_flight()
            await self._count_left()
        finally:
            self._stopping = True
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await self._stop_supervisor()
            if self.proxy is not None:
                await self.proxy.close()
            with contextlib.suppress(OSError):
                shutil.copy(node.log_file, self.workdir / "node.log")
            await asyncio.to_thread(node.cleanup)
            if self._log_file is not None:
                self._log_file.close()
        self._read_records()
        self._read_worker_log()
        return self.result

    # -- the worker ------------------------------------------------------------------------

    async def _start_supervisor(self) -> None:
        if self._log_file is None:
            self._log_file = self.worker_log.open("ab")
        c = self.config
        env = {
            **os.environ,
            "CHAOS_UNIQUE": self.namespace,
            "CHAOS_BROKER_URL": self.proxied_url,
            "CHAOS_RECORD": str(self.record),
            "CHAOS_MARKS": str(self.workdir / "marks"),
            "CHAOS_FAIL_PERCENT": str(c.fail_percent),
            "CHAOS_MAX_SLEEP": str(c.handler_max_sleep),
        }
        self.supervisor = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "amqtask",
            "worker",
            APP,
            "--json-logs",
            "--processes",
            str(c.processes),
            "--concurrency",
            str(c.concurrency),
            "--metrics-port",
            str(self.metrics_port),
            "--shutdown-timeout",
            "10",
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
        )

    async def _watch_supervisor(self) -> None:
        """Count every exit of the supervisor the run did not ask for, and start a new one."""
        while not self._stopping:
            assert self.supervisor is not None
            code = await self.supervisor.wait()
            if self._stopping:
                return
            at = self.now()
            self.result.supervisor_exits.append((at, code, self.result.preceding(at)))
            await asyncio.sleep(2)  # the broker may be restarting: do not spin
            if not self._stopping:
                await self._start_supervisor()

    async def _stop_supervisor(self) -> None:
        proc = self.supervisor
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                self.result.supervisor_stop_code = await asyncio.wait_for(proc.wait(), 40)
            except TimeoutError:
                self.result.supervisor_stop_code = None
        for pid in [*_children(proc.pid), proc.pid]:  # whatever is left, by its own pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(proc.wait(), 10)

    async def _wait_workers_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ports = self._ports()
        while time.monotonic() < deadline:
            values = await asyncio.gather(
                *(asyncio.to_thread(_gauge, port, "amqtask_broker_connected") for port in ports)
            )
            if all(value == 1 for value in values):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the worker processes were not connected within {timeout} s")

    def _ports(self) -> list[int]:
        return [self.metrics_port + i for i in range(self.config.processes)]

    # -- sending and faults ----------------------------------------------------------------

    async def _produce_under_faults(self) -> None:
        assert self.proxied_url
        producer = amqtask.App(
            self.proxied_url, [self.contract], namespace=self.namespace, name="chaos-producer"
        )
        stop = asyncio.Event()
        async with producer:
            lanes = [
                asyncio.create_task(self._lane(producer, stop)) for _ in range(self.config.lanes)
            ]
            try:
                await self._inject_faults()
            finally:
                stop.set()
                await asyncio.gather(*lanes)

    async def _lane(self, producer: amqtask.App, stop: asyncio.Event) -> None:
        c = self.config
        pause = c.lanes / c.rate
        while not stop.is_set():
            n = next(self._counter)
            delay = self.rng.randint(1, 3) if self.rng.randrange(100) < c.delayed_percent else 0
            try:
                message_id = await asyncio.wait_for(
                    producer.send(
                        self.contract, Job(n=n), delay=delay or None, timeout=c.send_timeout
                    ),
                    c.send_timeout + 20,  # a safety net: a send that outlives its timeout is a bug
                )
            except UNCONFIRMED as exc:
                self.result.unconfirmed[type(exc).__name__] += 1
                self.result.unconfirmed_ids.add(n)
                await asyncio.sleep(0.1)
                continue
            except TimeoutError:
                self.result.other_send_errors["send outlived its timeout"] += 1
                self.result.unconfirmed_ids.add(n)
                continue
            except Exception as exc:  # counted and shown: not one the run expects
                self.result.other_send_errors[type(exc).__name__] += 1
                await asyncio.sleep(0.1)
                continue
            self.result.confirmed[n] = Sent(message_id, self.now(), delay)
            await asyncio.sleep(pause)

    def _schedule(self) -> list[tuple[float, str]]:
        c = self.config
        kinds = (
            ["broker_restart"] * c.broker_restarts
            + ["worker_kill"] * c.worker_kills
            + ["tcp_cut"] * c.tcp_cuts
        )
        start = self.now()
        first, last = 3.0, max(c.duration - 5.0, 4.0)
        times = sorted(self.fault_rng.uniform(first, last) for _ in kinds)
        self.fault_rng.shuffle(kinds)
        return [(start + at, kind) for at, kind in zip(times, kinds, strict=True)]

    async def _inject_faults(self) -> None:
        """Each fault at its moment, overlapping as they fall (a worker kill may land while the
        broker is down); only broker restarts wait for each other."""
        end = self.now() + self.config.duration
        await asyncio.gather(*(self._fault(at, kind) for at, kind in self._schedule()))
        await asyncio.sleep(max(0.0, end - self.now()))

    async def _fault(self, at: float, kind: str) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))
        fault = Fault(kind, self.now())
        self.result.faults.append(fault)
        fault.detail = await getattr(self, f"_{kind}")()
        fault.took = self.now() - fault.at

    async def _broker_restart(self) -> str:
        assert self.node is not None
        down = round(self.fault_rng.uniform(0.5, 3.0), 1)
        async with self._restarting:
            await asyncio.to_thread(self.node.kill)
            await asyncio.sleep(down)
            await asyncio.to_thread(self.node.start, 60)
        return f"down {down}s, up again after {self.node.last_start_duration:.1f}s of boot"

    async def _worker_kill(self) -> str:
        assert self.supervisor is not None
        children = _children(self.supervisor.pid)
        if not children:
            return "no worker child to kill"
        pid = self.fault_rng.choice(sorted(children))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return f"child pid {pid}"

    async def _tcp_cut(self) -> str:
        assert self.proxy is not None
        links = len(self.proxy._writers)
        self.proxy.cut()
        return f"{links // 2} connections"

    # -- counting --------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Wait until every confirmed send was processed or dead-lettered, up to the bound."""
        assert self.node is not None
        drain_started = time.monotonic()
        deadline = drain_started + self.config.drain_timeout
        connection = await aio_pika.connect(self.node.url, timeout=30)
        async with connection:
            while True:
                self._read_records()
                await self._take_dead_letters(connection)
                if not self.result.lost:
                    self.result.drain_time = time.monotonic() - drain_started
                    return
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.5)

    def _read_records(self) -> None:
        if not self.record.exists():
            return
        with self.record.open("rb") as file:
            file.seek(self._record_offset)
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._record_offset += len(complete)
        for line in complete.splitlines():
            self.result.processed[int(line.split()[0])] += 1

    async def _take_dead_letters(self, connection: AbstractConnection) -> None:
        async with connection.channel() as channel:
            queue = await channel.declare_queue(f"{self.contract.queue}.dead", passive=True)
            while (message := await queue.get(fail=False)) is not None:
                self.result.dead.append(self._dead_letter(message))
                await message.ack()

    def _dead_letter(self, message: aio_pika.abc.AbstractIncomingMessage) -> DeadLetter:
        headers: dict[str, Any] = dict(message.headers or {})
        deaths = headers.get("x-death")
        first: dict[str, Any] = deaths[0] if isinstance(deaths, list) and deaths else {}
        reason = _text(headers.get("amqtask-reason")) or (
            f"broker {_text(headers.get('x-first-death-reason')) or _text(first.get('reason'))}"
        )
        at: float | None = None
        failed_at = _text(headers.get("amqtask-failed-at"))
        when: dt.datetime | None = None
        if failed_at:
            with contextlib.suppress(ValueError):
                when = dt.datetime.fromisoformat(failed_at)
        elif isinstance(first.get("time"), dt.datetime):
            when = first["time"]
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
            at = when.timestamp() - self.result.started_wall
        n: int | None = None
        with contextlib.suppress(Exception):
            n = int(orjson.loads(message.body)["n"])
        return DeadLetter(n, message.message_id, reason, _text(headers.get("amqtask-error")), at)

    async def _read_in_flight(self) -> None:
        """The in-flight gauge of every worker process, once it reads 0 or the bound passed."""
        deadline = time.monotonic() + self.config.settle_timeout
        while True:
            ports = self._ports()
            values = await asyncio.gather(
                *(asyncio.to_thread(_gauge, port, "amqtask_tasks_in_flight") for port in ports)
            )
            self.result.in_flight = dict(zip(ports, values, strict=True))
            if self.result.stuck_slots == 0 or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)

    async def _count_left(self) -> None:
        assert self.node is not None
        left: Counter[str] = Counter()
        connection = await aio_pika.connect(self.node.url, timeout=30)
        async with connection:
            for queue in self.declarer(self.node.url).topology.queues:
                group = (
                    "delay levels"
                    if queue.name.startswith(f"{self.namespace}.delay.")
                    else "dead-letter queue"
                    if queue.name.endswith(".dead")
                    else "due queue"
                    if queue.name.endswith(".due")
                    else "work queue"
                )
                with contextlib.suppress(Exception):
                    async with connection.channel() as channel:
                        declared = await channel.declare_queue(queue.name, passive=True)
                        left[group] += declared.declaration_result.message_count or 0
        self.result.left = dict(left)

    def declarer(self, url: str) -> amqtask.App:
        """An app on the chaos contract, straight to the node: to declare, and to list queues."""
        return amqtask.App(url, [self.contract], namespace=self.namespace, name="chaos-harness")

    def _read_worker_log(self) -> None:
        if not self.worker_log.exists():
            return
        for raw in self.worker_log.read_bytes().splitlines():
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or "event" not in entry:
                text = raw.decode(errors="replace").strip()
                if text:
                    self.result.plain_log_lines.append(text)
                continue
            at = None
            with contextlib.suppress(Exception):
                stamp = dt.datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00"))
                at = stamp.timestamp() - self.result.started_wall
            self.result.log.append(
                LogLine(at, str(entry["event"]), str(entry.get("level", "")), entry)
            )


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _children(pid: int) -> set[int]:
    """Live child processes of `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[0] not in ("Z", "X") and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def _gauge(port: int, name: str) -> float | None:
    """One unlabelled gauge from a worker's /metrics; None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def _free_port_pair() -> int:
    """A port P with P and P + 1 free (the worker processes serve metrics on P + slot).

    Below the ephemeral range, like `PrivateNode`'s ports: a replacement child binds its port
    again, and an ephemeral port may meanwhile be taken by any outgoing connection.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20000, max(low - 2, 20001))
        if all(_bindable(p) for p in (port, port + 1)):
            return port
    raise RuntimeError("no two adjacent free ports for the worker metrics")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


async def run(config: Config) -> Result:
    """One chaos run with `config`; see the module docstring."""
    return await Run(config).execute()
