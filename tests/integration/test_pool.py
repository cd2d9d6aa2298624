"""Running user code safely, against the real broker: time limits, the process pool (crashes,
memory, shutdown) and handlers in another environment or a sandbox."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask._metrics import WorkerMetrics
from tests import pool_handlers as h

from .conftest import (
    AppFactory,
    app_env,
    dead_letters,
    depth_is,
    queue_depth,
    running,
    start_worker,
    wait_for,
)

POOL_APP = "tests.integration.apps.pool_app:app"
NO_RETRY = amqtask.Retry(attempts=1)


class Job(BaseModel):  # the same shape as tests/integration/apps/pool_app.py's
    n: int


def pool_records(path: Path) -> tuple[Counter[int], Counter[int], set[int]]:
    """How often each task started and finished in pool_app, and the pids that ran them."""
    started: Counter[int] = Counter()
    done: Counter[int] = Counter()
    pids: set[int] = set()
    if path.exists():
        for line in path.read_text().splitlines():
            what, n, pid = line.split()
            (started if what == "start" else done)[int(n)] += 1
            pids.add(int(pid))
    return started, done, pids


def live_pids() -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


def processes_of(unique: str) -> list[int]:
    """Live processes (not zombies) started with this test's TEST_UNIQUE in their environment."""
    marker = f"TEST_UNIQUE={unique}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(environ.parent.name))
        except (OSError, IndexError):
            continue
    return found


async def tasks_started(worker: asyncio.subprocess.Process, record: Path, count: int) -> None:
    """Wait until `count` tasks of pool_app have started; fail with the worker's stderr if it
    exits first or takes over a minute (its children start before it consumes)."""
    await wait_for(
        lambda: sum(pool_records(record)[0].values()) >= count or worker.returncode is not None,
        timeout=60,
    )
    if worker.returncode is not None:
        assert worker.stderr is not None
        pytest.fail(f"the worker exited {worker.returncode}: {(await worker.stderr.read())!r}")


# --- time limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["async", "process"])
async def test_a_handler_that_never_returns_is_stopped_at_its_time_limit_and_its_slot_runs_the_next(
    make_app: AppFactory, amqp: AbstractConnection, unique: str, where: str
) -> None:
    isolation = "process" if where == "process" else None
    queue = f"{unique}.work"  # one queue, prefetch 1: the echo waits behind the stuck task
    stuck = amqtask.contract(
        f"{unique}.stuck", h.Job, queue=queue, retry=NO_RETRY, time_limit=1.0, isolation=isolation
    )
    echo = amqtask.contract(f"{unique}.echo", h.Job, returns=h.Done, queue=queue)
    app = make_app([stuck, echo])
    app.handler(stuck)(h.forever_async if where == "async" else h.spin)  # awaits / a CPU loop
    app.handler(echo)(h.echo_async)
    await app.declare()
    async with running(app, concurrency=1), make_app([stuck, echo]) as producer:
        await producer.send(stuck, h.Job(n=1))
        done = await producer.call(echo, h.Job(n=2), timeout=30)
        (letter,) = await dead_letters(amqp, queue, 1)

    assert done.n == 2
    assert letter.headers["amqtask-reason"] == "time_limit"
    assert letter.headers["amqtask-error-type"] == "amqtask._exceptions.TimeLimitExceeded"
    assert await queue_depth(amqp, queue) == 0


# --- the process pool: a crash fails only its own task ---------------------------------------


@pytest.mark.parametrize(
    ("pool", "crash"),
    [
        pytest.param(
            "thread",
            "exit",
            marks=pytest.mark.xfail(reason="in a thread, a crash ends the worker", strict=True),
        ),
        ("process", "exit"),
        ("process", "segfault"),
    ],
)
async def test_a_crashing_task_fails_alone_and_its_nine_neighbours_succeed_exactly_once(
    make_app: AppFactory,
    amqp: AbstractConnection,
    broker_url: str,
    unique: str,
    tmp_path: Path,
    pool: str,
    crash: str,
) -> None:
    poison = 4
    job = amqtask.contract(f"{unique}.job", Job, retry=NO_RETRY)
    producer = make_app([job])
    await producer.declare()
    async with producer:
        ids = [await producer.send(job, Job(n=n)) for n in range(10)]
    record = tmp_path / "record"
    env = app_env(
        broker_url, unique, record, TEST_SLEEP="1.5", TEST_POISON=str(poison), TEST_CRASH=crash
    )
    # Ten at once: every task is in flight, held by this one worker, when the poison crashes.
    worker = await start_worker(
        POOL_APP, "--pool", pool, "--concurrency", "10", env=env, stderr=asyncio.subprocess.PIPE
    )
    innocent = [n for n in range(10) if n != poison]
    try:
        await wait_for(
            lambda: sum(pool_records(record)[1].values()) == 9 or worker.returncode is not None,
            timeout=60,
        )
        assert worker.returncode is None, "the crash of one task ended the worker"
        (letter,) = await dead_letters(amqp, job.queue, 1)
    finally:
        if worker.returncode is None:
            worker.terminate()
        _, stderr = await asyncio.wait_for(worker.communicate(), 30)
    started, done, _ = pool_records(record)

    assert worker.returncode == 0, stderr.decode()[-3000:]
    assert started == Counter({n: 1 for n in range(10)})
    assert done == Counter({n: 1 for n in innocent})
    assert letter.message_id == ids[poison]
    assert letter.headers["amqtask-reason"] == "crashed"
    assert letter.headers["amqtask-error-type"] == "amqtask._exceptions.HandlerCrashed"
    if crash == "segfault":
        assert letter.headers["amqtask-signal"] == "SIGSEGV"
    else:
        assert letter.headers["amqtask-exit-code"] == 1
    assert await queue_depth(amqp, f"{job.queue}.dead") == 0  # no neighbour dead-lettered
    assert await queue_depth(amqp, job.queue) == 0  # and none left for redelivery


async def test_a_leaking_handler_is_recycled_by_max_memory_per_child_and_the_worker_keeps_serving(
    make_app: AppFactory, unique: str
) -> None:
    leak = amqtask.contract(f"{unique}.leak", h.Job, returns=h.Done)
    app = make_app([leak])
    app.handler(leak)(h.leak)
    await app.declare()
    metrics = WorkerMetrics(app)
    settings = amqtask.WorkerSettings(concurrency=1, pool="process", max_memory_per_child=150)
    worker = amqtask.Worker(app, settings, metrics=metrics)
    await worker.start()
    try:
        async with make_app([leak]) as caller:
            # 40 MiB more per task: a child starts near 45 MiB, so it passes 150 at its third.
            results = [await caller.call(leak, h.Job(n=40), timeout=30) for _ in range(8)]
    finally:
        await worker.stop()

    per_child = Counter(result.pid for result in results)
    assert len(results) == 8
    assert len(per_child) >= 3, per_child
    assert max(per_child.values()) <= 3, per_child
    assert max(result.n for result in results) <= 3  # what a child had kept: never more
    assert metrics.pool_recycled.labels("max_memory")._value.get() >= 2


async def test_shutdown_lets_tasks_in_child_processes_finish_and_leaves_no_process_behind(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=NO_RETRY)
    producer = make_app([job])
    await producer.declare()
    async with producer:
        for n in range(5):
            await producer.send(job, Job(n=n))
    record = tmp_path / "record"
    env = app_env(broker_url, unique, record, TEST_SLEEP="2.0")
    worker = await start_worker(
        POOL_APP,
        "--pool",
        "process",
        "--concurrency",
        "2",
        "--shutdown-timeout",
        "20",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    await tasks_started(worker, record, 2)
    children = pool_records(record)[2]
    assert len(processes_of(unique)) == 3  # the worker and its two children
    worker.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(worker.communicate(), 30)
    started, done, _ = pool_records(record)

    assert worker.returncode == 0, stderr.decode()[-3000:]
    assert started == done == Counter({0: 1, 1: 1})  # in flight at SIGTERM, then finished
    # Never started: back in the queue for redelivery, once the broker has seen the close.
    await wait_for(lambda: depth_is(amqp, job.queue, 3), timeout=10)
    assert processes_of(unique) == []
    assert children.isdisjoint(live_pids())


async def test_a_worker_killed_outright_takes_its_busy_children_with_it(
    make_app: AppFactory, broker_url: str, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=NO_RETRY)
    producer = make_app([job])
    await producer.declare()
    async with producer:
        for n in range(2):
            await producer.send(job, Job(n=n))
    record = tmp_path / "record"
    env = app_env(broker_url, unique, record, TEST_SLEEP="60")
    worker = await start_worker(
        POOL_APP, "--pool", "process", "--concurrency", "2", env=env, stderr=asyncio.subprocess.PIPE
    )
    await tasks_started(worker, record, 2)
    worker.kill()  # no shutdown at all, as the OOM killer would
    await worker.wait()

    await wait_for(lambda: processes_of(unique) == [], timeout=10)


# --- another environment, a sandbox ----------------------------------------------------------

OTHER_IDNA = "3.7"  # the worker's venv has another version of idna (a dependency of yarl)

OTHER_ENV_MODULE = '''
import sys

import idna


def version(job):
    """Runs in the other virtualenv: its idna, its interpreter; the payload as a dict."""
    return {"version": idna.__version__, "prefix": sys.prefix, "n": job["n"]}
'''


class Where(BaseModel):
    version: str
    prefix: str
    n: int


@pytest.fixture(scope="session")
def other_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second virtualenv, without amqtask, with another version of idna (once per session)."""
    venv = tmp_path_factory.mktemp("other-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"idna=={OTHER_IDNA}"],
        check=True,
        timeout=300,
    )
    return venv


async def test_a_handler_in_another_virtualenv_runs_with_that_environments_package_version(
    make_app: AppFactory,
    unique: str,
    tmp_path: Path,
    other_venv: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import idna

    assert idna.__version__ != OTHER_IDNA
    (tmp_path / f"other_env_{unique}.py").write_text(OTHER_ENV_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # what the child process imports from
    python = str(other_venv / "bin" / "python")
    there = amqtask.contract(
        f"{unique}.there", h.Job, returns=Where, isolation="process", python=python
    )
    app = make_app([there])
    app.handler_at(there, f"other_env_{unique}:version")
    await app.declare()
    async with running(app, concurrency=1), make_app([there]) as caller:
        result = await caller.call(there, h.Job(n=7), timeout=30)

    assert result == Where(version=OTHER_IDNA, prefix=str(other_venv), n=7)


def sandbox() -> list[str]:
    """bubblewrap: the whole file system read-only, no network, gone when the worker goes."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None, "bubblewrap is not installed: apt-get install -y bubblewrap"
    return [
        bwrap,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--unshare-net",
        "--unshare-pid",
        "--die-with-parent",
    ]


async def test_a_handler_under_a_bubblewrap_launcher_has_no_network_and_a_read_only_root(
    make_app: AppFactory, unique: str, broker_url: str
) -> None:
    port = int(broker_url.rsplit(":", 1)[1].split("/")[0])
    boxed = amqtask.contract(
        f"{unique}.boxed", h.Job, returns=h.Probe, isolation="process", launcher=sandbox()
    )
    app = make_app([boxed])
    app.handler(boxed)(h.sandbox_probe)
    await app.declare()
    async with running(app, concurrency=1), make_app([boxed]) as caller:
        probe = await caller.call(boxed, h.Job(n=port), timeout=30)

    assert h.sandbox_probe(h.Job(n=port)).network == "open"  # here, outside the box, it is
    assert probe.network.startswith("blocked"), probe
    assert probe.root.startswith("read-only"), probe
    assert probe.pid != os.getpid()
