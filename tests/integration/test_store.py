"""The task store against the real broker, with each store (SQLite in a file of the test's own,
PostgreSQL in a schema of its own): every state a task passes, results read elsewhere,
revocation before delivery, during a delay, across a worker restart and while running, and
deduplication of a copy that comes again."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask import _codec
from tests.integration.conftest import (
    ROOT,
    AppFactory,
    app_env,
    depth_is,
    queue_depth,
    running,
    start_worker,
    wait_for,
)
from tests.integration.postgres import schema_url
from tests.integration.store_apps import store_app


class Job(BaseModel):
    n: int


class Out(BaseModel):
    doubled: int


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tasks.db'}"
        return
    async with schema_url() as url:
        yield url


async def state_of(app: amqtask.App, task_id: str) -> str | None:
    info = await app.task(task_id)
    return None if info is None else info.state.value


def reaches(app: amqtask.App, task_id: str, state: str) -> Callable[[], Any]:
    async def check() -> bool:
        return await state_of(app, task_id) == state

    return check


async def declared(make_app: AppFactory, contracts: list[Any], store_url: str) -> amqtask.App:
    app = make_app(contracts, store=store_url)
    await app.declare()  # topology and the store's tables
    return app


# --- every state, and a result read by another process ---------------------------------------


async def test_a_task_goes_from_queued_to_running_to_succeeded_and_another_process_reads_it(
    make_app: AppFactory, unique: str, store_url: str, tmp_path: Path
) -> None:
    contract = amqtask.contract(f"{unique}.double", Job, returns=Out)
    worker_app = await declared(make_app, [contract], store_url)
    producer = make_app([contract], store=store_url)
    gate = asyncio.Event()

    @worker_app.handler(contract)
    async def double(job: Job) -> Out:
        await gate.wait()
        return Out(doubled=job.n * 2)

    async with producer:
        task_id = await producer.send(contract, Job(n=21))
        assert await state_of(producer, task_id) == "queued"
        async with running(worker_app):
            await wait_for(reaches(producer, task_id, "running"))
            gate.set()
            result = await producer.result(contract, task_id, timeout=20)
        info = await producer.task(task_id)

    assert result == Out(doubled=42)
    assert info is not None
    assert (info.state.value, info.attempts, info.result) == ("succeeded", 1, Out(doubled=42))
    assert info.queued_at is not None
    assert info.started_at is not None
    assert info.finished_at is not None
    assert info.worker is not None
    # Another process, with only the app module: `amqtask task` reads the same record.
    module = tmp_path / f"store_reader_{unique}.py"
    module.write_text(
        "import amqtask\nfrom pydantic import BaseModel\n"
        "class Job(BaseModel):\n    n: int\n"
        "class Out(BaseModel):\n    doubled: int\n"
        f"double = amqtask.contract({contract.name!r}, Job, returns=Out)\n"
        f"app = amqtask.App({worker_app.url!r}, [double], namespace={unique!r}, "
        f"store={store_url!r})\n"
    )
    shown = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqtask",
        "task",
        f"{module.stem}:app",
        task_id,
        "--json",
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(shown.communicate(), 60)
    assert shown.returncode == 0, err.decode()
    read = orjson.loads(out)
    assert (read["state"], read["result"], read["attempts"]) == ("succeeded", {"doubled": 42}, 1)


async def test_a_failing_task_is_retrying_then_failed_with_its_reason_and_error(
    make_app: AppFactory, unique: str, store_url: str
) -> None:
    contract = amqtask.contract(
        f"{unique}.fails", Job, retry=amqtask.Retry(attempts=2, initial=1.0)
    )
    app = await declared(make_app, [contract], store_url)

    @app.handler(contract)
    async def fail(job: Job) -> None:
        raise ValueError(f"no {job.n}")

    async with app, running(app):
        task_id = await app.send(contract, Job(n=7))
        await wait_for(reaches(app, task_id, "retrying"))
        with pytest.raises(amqtask.RemoteError) as failed:
            await app.result(contract, task_id, timeout=30)
        info = await app.task(task_id)

    assert failed.value.remote_type == "builtins.ValueError"
    assert failed.value.remote_message == "no 7"
    assert failed.value.reason == "handler_error"
    assert info is not None
    assert (info.state.value, info.attempts, info.reason) == ("failed", 2, "handler_error")
    assert info.traceback is not None
    assert "no 7" in info.traceback


# --- revocation -------------------------------------------------------------------------------


async def test_a_task_revoked_before_delivery_is_acked_without_running(
    make_app: AppFactory, unique: str, store_url: str, amqp: AbstractConnection
) -> None:
    contract = amqtask.contract(f"{unique}.job", Job)
    app = await declared(make_app, [contract], store_url)
    ran: list[int] = []

    @app.handler(contract)
    async def run(job: Job) -> None:
        ran.append(job.n)

    async with app:
        revoked = await app.send(contract, Job(n=1))
        await app.send(contract, Job(n=2))
        await app.revoke(revoked)
        async with running(app) as worker:
            await wait_for(lambda: ran == [2])
            await wait_for(lambda: worker.counts["revoked"] == 1)
        info = await app.task(revoked)

    assert info is not None
    assert info.state.value == "revoked"
    assert await queue_depth(amqp, contract.queue) == 0


async def test_a_task_revoked_during_its_delay_stays_revoked_across_a_worker_restart(
    make_app: AppFactory, unique: str, store_url: str, amqp: AbstractConnection
) -> None:
    contract = amqtask.contract(f"{unique}.later", Job)
    app = await declared(make_app, [contract], store_url)
    ran: list[int] = []

    @app.handler(contract)
    async def run(job: Job) -> None:
        ran.append(job.n)

    producer = make_app([contract], store=store_url)
    async with producer:
        async with running(app):
            task_id = await producer.send(contract, Job(n=1), delay=2)
            assert await state_of(producer, task_id) == "scheduled"
            await producer.revoke(task_id)
        # A new worker: it knows the revocation from the store alone.
        async with running(app) as restarted:
            check = await producer.send(contract, Job(n=2), delay=2)
            await wait_for(lambda: ran == [2], timeout=30)
            await wait_for(lambda: restarted.counts["revoked"] == 1)
        assert await state_of(producer, task_id) == "revoked"
        assert await state_of(producer, check) == "succeeded"
    assert await depth_is(amqp, f"{contract.queue}.due", 0)


async def test_terminate_cancels_a_running_async_handler(
    make_app: AppFactory, unique: str, store_url: str, amqp: AbstractConnection
) -> None:
    contract = amqtask.contract(f"{unique}.long", Job)
    app = await declared(make_app, [contract], store_url)
    cancelled = asyncio.Event()

    @app.handler(contract)
    async def long(job: Job) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with app, running(app) as worker:
        task_id = await app.send(contract, Job(n=1))
        await wait_for(reaches(app, task_id, "running"))
        await app.revoke(task_id, terminate=True)
        with pytest.raises(amqtask.TaskRevoked):
            await app.result(contract, task_id, timeout=20)
        assert cancelled.is_set()
        assert worker.counts["revoked"] == 1

    assert await queue_depth(amqp, contract.queue) == 0
    assert await queue_depth(amqp, f"{contract.queue}.dead") == 0


async def test_terminate_kills_the_process_pool_child_running_the_task(
    unique: str, broker_url: str, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    store_url = f"sqlite:///{tmp_path / 'tasks.db'}"
    env = app_env(
        broker_url,
        unique,
        record,
        TEST_STORE_URL=store_url,
        TEST_SLEEP="60",
        TEST_SAME_TRANSACTION="0",
    )
    async with store_app(unique, broker_url, store_url) as module:
        app = module.app
        worker = await start_worker(
            "tests.integration.apps.store_app:app", "--concurrency", "1", env=env
        )
        try:
            async with app:
                task_id = await app.send(module.sleepy, {"n": 1})
                await wait_for(lambda: record.exists() and "start 1" in record.read_text(), 60)
                pid = int(record.read_text().split()[2])
                await app.revoke(task_id, terminate=True)
                with pytest.raises(amqtask.TaskRevoked):
                    await app.result(module.sleepy, task_id, timeout=30)
            await wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10)  # the child was killed
            assert "done 1" not in record.read_text()
        finally:
            worker.terminate()
            await asyncio.wait_for(worker.wait(), 30)


# --- deduplication ----------------------------------------------------------------------------


async def test_a_copy_of_a_deduplicated_task_that_succeeded_is_acked_without_running(
    make_app: AppFactory, unique: str, store_url: str, broker_url: str
) -> None:
    contract = amqtask.contract(f"{unique}.once", Job, deduplicate=True)
    app = await declared(make_app, [contract], store_url)
    ran: list[int] = []

    @app.handler(contract)
    async def once(job: Job) -> None:
        ran.append(job.n)

    async with app, running(app) as worker:
        task_id = await app.send(contract, Job(n=1))
        await wait_for(reaches(app, task_id, "succeeded"))
        # The producer sends it again (as after a PublishInterrupted): same message id.
        copy = _codec.encode_task(contract, Job(n=1), message_id=task_id)
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(app.names.task_exchange, ensure=False)
            await exchange.publish(
                aio_pika.Message(copy.body, headers=copy.headers, message_id=task_id),
                contract.routing_key,
            )
        await wait_for(lambda: worker.counts["skipped"] == 1)

    assert ran == [1]
