"""Faults: a killed worker, a killed broker, a cut connection, a poison message, a memory alarm.

Each test prints what it counted (sent, confirmed, processed, duplicates, dead-lettered) and
asserts the one promise that matters: nothing whose `send` returned is lost. Broker kills and
alarms happen on a private node (`PrivateNode`); the shared broker is only ever reached through a
proxy whose connections we cut, never stopped.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aio_pika
import pytest
import structlog
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask._transport import AioPikaTransport

from .conftest import (
    AppFactory,
    app_env,
    dead_letters,
    depth_is,
    queue_depth,
    records,
    running,
    start_worker,
    wait_for,
)
from .private_node import _CTL, _RABBITMQ_BIN, QUORUM_REGISTRATION_SETTLE, PrivateNode
from .proxy import start_proxy

FAULT_APP = "tests.integration.apps.fault_app:app"
# The robust connection retries every 5 s by default; once a second keeps these tests short.
FAST_RECONNECT = "?reconnect_interval=1"


class Job(BaseModel):  # the same shape as tests/integration/apps/fault_app.py's
    n: int


class Attempt(BaseModel):
    """A task the producer retries after an interrupted send: (n, attempt) names one send."""

    n: int
    attempt: int


def report(test: str, **counts: Any) -> None:
    print(f"\n[{test}] " + " ".join(f"{key}={value}" for key, value in counts.items()))


# --- worker processes -------------------------------------------------------------------------


@dataclass
class WorkerProcesses:
    """Starts `amqtask worker` subprocesses on fault_app; kills whatever is left at the end."""

    env: dict[str, str]
    log: Path
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    _log_file: IO[bytes] | None = None

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        if self._log_file is None:
            self._log_file = self.log.open("ab")
        proc = await start_worker(
            FAULT_APP,
            *args,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
        )
        self.procs.append(proc)
        return proc

    async def terminate(self, proc: asyncio.subprocess.Process) -> int:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            pytest.fail(f"worker {proc.pid} ignored SIGTERM for 30 s\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def cleanup(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if self._log_file is not None:
            self._log_file.close()


@asynccontextmanager
async def worker_processes(
    tmp_path: Path, broker_url: str, unique: str, **env: str
) -> AsyncIterator[WorkerProcesses]:
    workers = WorkerProcesses(
        env=app_env(broker_url, unique, tmp_path / "record.txt", **env),
        log=tmp_path / "workers.log",
    )
    try:
        yield workers
    finally:
        await workers.cleanup()


async def until_exit_or(
    proc: asyncio.subprocess.Process, done: Callable[[], Awaitable[bool]], timeout: float
) -> bool:
    """Wait until `done()` holds (True) or the process exits (False)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await done():
            return True
        try:
            await asyncio.wait_for(proc.wait(), 0.1)
            return False
        except TimeoutError:
            pass
    pytest.fail(f"worker {proc.pid}: neither exited nor finished within {timeout} s")


# --- 1. a worker killed with tasks in flight ----------------------------------------------------


async def test_tasks_in_flight_on_a_killed_worker_are_completed_by_the_next_one(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    total = 40
    job = amqtask.contract(f"{unique}.job", Job)
    producer = make_app([job])
    await producer.declare()
    async with producer:
        await asyncio.gather(*(producer.send(job, Job(n=n)) for n in range(total)))
    record = tmp_path / "record.txt"

    async with worker_processes(tmp_path, broker_url, unique, TEST_SLEEP="0.3") as workers:
        first = await workers.start("--concurrency", "4")

        def some_done_and_some_running() -> bool:
            started, done = records(record)
            return sum(done.values()) >= 8 and set(started) - set(done) != set()

        await wait_for(some_done_and_some_running, timeout=30)
        first.kill()  # SIGKILL: no shutdown, no acks
        assert await asyncio.wait_for(first.wait(), 10) == -signal.SIGKILL
        started, done = records(record)
        cut_off = set(started) - set(done)
        done_before_kill = sum(done.values())

        second = await workers.start("--concurrency", "8")
        await wait_for(lambda: set(records(record)[1]) == set(range(total)), timeout=30)
        assert await workers.terminate(second) == 0, workers.tail()

    started, done = records(record)
    dead = await queue_depth(amqp, f"{job.queue}.dead")
    report(
        "kill -9 worker",
        sent=total,
        confirmed=total,
        done_before_kill=done_before_kill,
        cut_off=len(cut_off),
        processed=len(done),
        duplicates=sum(done.values()) - len(done),
        restarted=sum(started.values()) - len(started),
        dead_lettered=dead,
    )
    assert set(done) == set(range(total))  # nothing lost...
    assert all(started[n] == 2 for n in cut_off)  # ...the cut-off ones ran again...
    assert await queue_depth(amqp, job.queue) == 0  # ...and everything was acked in the end
    assert dead == 0


# --- 2. and 3. a producer and a worker across a broker kill or a TCP cut ------------------------


@dataclass
class Ledger:
    """What a fault run saw: sends confirmed and interrupted, and tasks processed."""

    confirmed: set[tuple[int, int]] = field(default_factory=set)
    failed_sends: Counter[str] = field(default_factory=Counter)
    unconfirmed: set[tuple[int, int]] = field(default_factory=set)
    processed: Counter[tuple[int, int]] = field(default_factory=Counter)
    worker_events: Counter[str] = field(default_factory=Counter)
    fault_at: int = -1

    def report(self, test: str, total: int, dead_lettered: int) -> None:
        stored_anyway = set(self.processed) & self.unconfirmed
        report(
            test,
            tasks=total,
            sent=len(self.confirmed) + len(self.unconfirmed),
            confirmed=len(self.confirmed),
            fault_after_confirmed=self.fault_at,
            failed_sends=dict(self.failed_sends),
            unconfirmed_but_processed=len(stored_anyway),
            processed=len(self.processed),
            duplicates=sum(count - 1 for count in self.processed.values()),
            settle_failed=self.worker_events["settle_failed"],
            dead_lettered=dead_lettered,
        )


async def produce_and_consume_through_a_fault(
    producer: amqtask.App,
    worker_app: amqtask.App,
    contract: amqtask.Contract[Attempt, None],
    fault: Callable[[], Awaitable[None]],
    *,
    total: int = 300,
    lanes: int = 5,
    fault_after: int = 100,
) -> Ledger:
    """Send `total` tasks from `lanes` concurrent senders while a worker consumes; run `fault`
    once `fault_after` sends were confirmed. A send that raises is retried as a new attempt, so
    every task ends up confirmed once; each attempt that raised is recorded as unconfirmed.
    """
    ledger = Ledger()

    @worker_app.handler(contract)
    async def handle(task: Attempt) -> None:
        ledger.processed[(task.n, task.attempt)] += 1
        await asyncio.sleep(0.005)

    todo = iter(range(total))
    fault_started = asyncio.Event()

    async def sender() -> None:
        for n in todo:
            for attempt in range(200):
                try:
                    await producer.send(contract, Attempt(n=n, attempt=attempt), timeout=10)
                except (amqtask.PublishInterrupted, amqtask.PublishTimeout) as exc:
                    # Exactly these two mean "outcome unknown": anything else fails the test.
                    ledger.failed_sends[type(exc).__name__] += 1
                    ledger.unconfirmed.add((n, attempt))
                    await asyncio.sleep(0.25)
                    continue
                ledger.confirmed.add((n, attempt))
                if len(ledger.confirmed) == fault_after:
                    fault_started.set()
                break
            else:
                pytest.fail(f"task {n}: no send confirmed in 200 attempts")
            await asyncio.sleep(0.01)  # pace the sends, so the fault lands mid-way

    async def injector() -> None:
        await fault_started.wait()
        ledger.fault_at = len(ledger.confirmed)
        await fault()

    with structlog.testing.capture_logs() as logs:
        async with producer, running(worker_app, concurrency=4):
            injecting = asyncio.create_task(injector())
            try:
                await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(lanes))), 60)
                await asyncio.wait_for(injecting, 30)
            finally:
                injecting.cancel()
            await wait_for(lambda: ledger.confirmed <= set(ledger.processed), timeout=30)
    ledger.worker_events.update(event["event"] for event in logs)
    return ledger


def attempt_contract(unique: str) -> amqtask.Contract[Attempt, None]:
    return amqtask.contract(f"{unique}.attempt", Attempt)


@pytest.fixture
def private_node() -> Iterator[PrivateNode]:
    node = PrivateNode()
    try:
        node.start()
        yield node
    finally:
        node.cleanup()


async def test_confirmed_sends_survive_a_broker_kill_and_restart(
    private_node: PrivateNode, unique: str
) -> None:
    node = private_node
    contract = attempt_contract(unique)
    url = node.url + FAST_RECONNECT
    producer = amqtask.App(url, [contract], namespace=unique, name="producer")
    worker_app = amqtask.App(url, [contract], namespace=unique, name="worker")
    await producer.declare()
    # A quorum queue's registration must reach the disk before a kill -9 (see the constant).
    await asyncio.sleep(QUORUM_REGISTRATION_SETTLE)

    async def kill_and_restart() -> None:
        await asyncio.to_thread(node.kill)
        await asyncio.sleep(0.5)  # the clients notice and start reconnecting meanwhile
        await asyncio.to_thread(node.start)

    ledger = await produce_and_consume_through_a_fault(
        producer, worker_app, contract, kill_and_restart
    )
    connection = await aio_pika.connect(node.url)
    async with connection:
        await wait_for(lambda: depth_is(connection, contract.queue, 0))
        dead = await queue_depth(connection, f"{contract.queue}.dead")

    ledger.report("kill -9 broker", 300, dead)
    assert ledger.confirmed <= set(ledger.processed)  # nothing confirmed was lost
    assert {n for n, _ in ledger.confirmed} == set(range(300))
    # Sends in flight at the kill may be interrupted; those not yet published wait for the
    # restart. Either way the kill landed mid-way when the connections dropped before the end.
    assert ledger.worker_events["connection_lost"], "the kill did not drop the connections"
    assert 0 <= ledger.fault_at < 300
    assert dead == 0


async def test_confirmed_sends_survive_a_cut_connection(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str
) -> None:
    proxy, through_proxy = await start_proxy(broker_url)
    try:
        proxied_url = through_proxy.split("?")[0] + FAST_RECONNECT
        contract = attempt_contract(unique)
        await make_app([contract]).declare()  # directly: cleaned up by make_app
        producer = make_app([contract], transport=AioPikaTransport(proxied_url, name="producer"))
        worker_app = make_app([contract], transport=AioPikaTransport(proxied_url, name="worker"))

        async def cut() -> None:
            proxy.cut()

        ledger = await produce_and_consume_through_a_fault(producer, worker_app, contract, cut)
    finally:
        await proxy.close()
    await wait_for(lambda: depth_is(amqp, contract.queue, 0))
    dead = await queue_depth(amqp, f"{contract.queue}.dead")

    ledger.report("tcp cut", 300, dead)
    assert ledger.confirmed <= set(ledger.processed)
    assert {n for n, _ in ledger.confirmed} == set(range(300))
    # Sends not yet published when the cut came wait for the reconnect (so none may fail):
    # the cut landed mid-way when the connections dropped while sends were still to come.
    assert ledger.worker_events["connection_lost"], "the cut did not drop the connections"
    assert 0 <= ledger.fault_at < 300
    assert dead == 0


# --- 4. a poison message that kills every worker that takes it ----------------------------------


async def test_a_message_that_kills_its_worker_is_dead_lettered_past_the_delivery_limit(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    total, poison, limit = 15, 7, 2
    job = amqtask.contract(f"{unique}.job", Job, delivery_limit=limit)
    producer = make_app([job])
    await producer.declare()
    async with producer:
        ids = [await producer.send(job, Job(n=n)) for n in range(total)]
    record = tmp_path / "record.txt"
    innocent = set(range(total)) - {poison}

    async def finished() -> bool:
        return innocent <= set(records(record)[1]) and (
            await queue_depth(amqp, f"{job.queue}.dead") == 1
        )

    exits: list[int] = []
    env = {"TEST_SLEEP": "0.01", "TEST_POISON": str(poison), "TEST_DELIVERY_LIMIT": str(limit)}
    async with worker_processes(tmp_path, broker_url, unique, **env) as workers:
        # One at a time (prefetch 1): only the poison is unacked when its worker dies, so no
        # innocent task has its delivery count raised with it.
        for _ in range(limit + 4):
            proc = await workers.start("--concurrency", "1")
            if await until_exit_or(proc, finished, timeout=30):
                assert await workers.terminate(proc) == 0, workers.tail()
                break
            exits.append(proc.returncode or 0)
        else:
            pytest.fail(f"still not dead-lettered after {len(exits)} crashes\n{workers.tail()}")
        (letter,) = await dead_letters(amqp, job.queue, 1)

    started, done = records(record)
    headers = letter.headers
    death = headers["x-death"][0]
    report(
        "poison message",
        sent=total,
        confirmed=total,
        processed=len(done),
        duplicates=sum(done.values()) - len(done),
        crashes=len(exits),
        poison_runs=started[poison],
        dead_lettered=1,
        first_death_reason=headers.get("x-first-death-reason"),
        death=f"{death['reason']}x{death['count']}",
    )
    assert letter.message_id == ids[poison]
    assert letter.body == b'{"n":7}'
    assert headers["x-first-death-reason"] == "delivery_limit"
    assert death["reason"] == "delivery_limit"
    assert death["queue"] == job.queue
    assert exits == [1] * len(exits)  # os._exit(1) each time
    assert started[poison] == len(exits)
    # The broker counts a redelivery per crash and dead-letters past `delivery_limit` of them.
    assert len(exits) == limit + 1
    assert set(done) == innocent
    assert await queue_depth(amqp, job.queue) == 0


# --- 5. a broker that blocks publishers -------------------------------------------------------


async def rabbitmqctl(node: PrivateNode, *args: str, timeout: float = 30) -> str:
    """Run `rabbitmqctl -n NODE ...` against the private node, as PrivateNode.stop does."""
    proc = await asyncio.create_subprocess_exec(
        str(_RABBITMQ_BIN / _CTL),
        "-n",
        node.nodename,
        *args,
        cwd=node.base_dir,
        env=node._env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **node._popen_user_kwargs(),
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


async def test_send_times_out_while_the_broker_blocks_publishers_and_works_after(
    private_node: PrivateNode, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    node = private_node
    job = amqtask.contract(f"{unique}.job", Job)
    app = amqtask.App(node.url, [job], namespace=unique)
    await app.declare()
    sent = confirmed = timed_out = 0
    async with app:
        for n in range(5):
            sent += 1
            await app.send(job, Job(n=n), timeout=5)
            confirmed += 1

        await rabbitmqctl(node, "set_vm_memory_high_watermark", "0.0000001")
        try:
            started = time.monotonic()
            blocked = [app.send(job, Job(n=n), timeout=2) for n in range(100, 103)]
            sent += len(blocked)
            outcomes = await asyncio.wait_for(asyncio.gather(*blocked, return_exceptions=True), 10)
            waited = time.monotonic() - started
        finally:
            await rabbitmqctl(node, "set_vm_memory_high_watermark", "0.4")
        timed_out = sum(isinstance(o, amqtask.PublishTimeout) for o in outcomes)
        assert timed_out == len(blocked), outcomes
        assert all("the broker is blocking publishers" in str(o) for o in outcomes), outcomes
        assert "was blocked by: 'low on memory'" in caplog.text  # the alarm, not something else
        assert 1.9 <= waited < 4, waited

        for n in range(5, 10):  # once the alarm is gone, sends work again
            sent += 1
            await app.send(job, Job(n=n), timeout=10)
            confirmed += 1

    connection = await aio_pika.connect(node.url)
    async with connection:
        depth = await queue_depth(connection, job.queue)
    report(
        "memory alarm",
        sent=sent,
        confirmed=confirmed,
        timed_out=timed_out,
        waited_s=round(waited, 2),
        queued=depth,
        timed_out_but_stored=depth - confirmed,
        processed=0,
        duplicates=0,
        dead_lettered=0,
    )
    assert confirmed <= depth <= sent  # nothing confirmed lost; the timed-out may be stored
