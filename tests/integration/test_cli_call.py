"""`amqtask call` and `amqtask send` as a user runs them: a worker process, exit codes, output."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import orjson
import pytest
from aio_pika.abc import AbstractConnection

from .apps.rpc_app import build
from .conftest import ROOT, AppFactory, app_env, depth_is, queue_depth, start_worker, wait_for

APP = "tests.integration.apps.rpc_app:app"


async def amqtask_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqtask",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def consumers(amqp: AbstractConnection, queue: str) -> int:
    async with amqp.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count or 0


@pytest.fixture
def env(broker_url: str, unique: str) -> dict[str, str]:
    return app_env(broker_url, unique)


@pytest.fixture
async def worker(
    make_app: AppFactory,
    amqp: AbstractConnection,
    env: dict[str, str],
    unique: str,
    broker_url: str,
) -> AsyncIterator[list[str]]:
    """The rpc_app's topology declared and a worker process consuming it; yields its queues."""
    app = make_app(list(build(unique, broker_url).contracts))
    await app.declare()
    queues = [contract.queue for contract in app.contracts]
    process = await start_worker(
        APP, "--shutdown-timeout", "2", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        for queue in queues:
            await wait_for(lambda queue=queue: _has_consumer(amqp, queue))
        yield queues
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)


async def _has_consumer(amqp: AbstractConnection, queue: str) -> bool:
    return await consumers(amqp, queue) > 0


async def test_call_prints_the_result_as_json(
    worker: list[str], env: dict[str, str], unique: str
) -> None:
    code, stdout, stderr = await amqtask_cli(
        env, "call", APP, f"{unique}.double", '{"n": 21}', "--timeout", "10"
    )
    assert code == 0, stderr
    assert orjson.loads(stdout) == {"m": 42}

    code, stdout, stderr = await amqtask_cli(env, "call", APP, f"{unique}.nap", '{"n": 0}')
    assert code == 0, stderr
    assert stdout.strip() == "null"


async def test_call_exits_1_with_the_remote_error(
    worker: list[str], env: dict[str, str], unique: str
) -> None:
    code, stdout, stderr = await amqtask_cli(
        env, "call", APP, f"{unique}.fail", '{"n": 3}', "--timeout", "10"
    )
    assert code == 1
    assert stdout == ""
    assert "builtins.LookupError: no such number: 3" in stderr
    assert "remote traceback:" in stderr
    assert 'raise LookupError(f"no such number: {task.n}")' in stderr


async def test_call_exits_1_when_no_reply_comes_in_time(
    worker: list[str], env: dict[str, str], unique: str
) -> None:
    code, _, stderr = await amqtask_cli(
        env, "call", APP, f"{unique}.nap", '{"n": 20}', "--timeout", "0.3"
    )
    assert code == 1
    assert "no reply within 0.3 s" in stderr


async def test_call_and_send_refuse_bad_arguments_with_exit_2(
    env: dict[str, str],
    unique: str,
    make_app: AppFactory,
    amqp: AbstractConnection,
    broker_url: str,
) -> None:
    app = make_app(list(build(unique, broker_url).contracts))
    await app.declare()
    for command in ("call", "send"):
        code, _, stderr = await amqtask_cli(env, command, APP, f"{unique}.double", "{n: 1")
        assert code == 2
        assert "not valid JSON" in stderr
        code, _, stderr = await amqtask_cli(env, command, APP, f"{unique}.double", '{"n": "x"}')
        assert code == 2
        assert "does not fit Numbers" in stderr
        code, _, stderr = await amqtask_cli(env, command, APP, "no.such.task", "{}")
        assert code == 2
        assert "no task 'no.such.task'" in stderr
    # Nothing was published.
    assert await queue_depth(amqp, f"{unique}.double") == 0


async def test_send_prints_the_message_id_and_the_worker_runs_it(
    worker: list[str], env: dict[str, str], unique: str, amqp: AbstractConnection
) -> None:
    code, stdout, stderr = await amqtask_cli(env, "send", APP, f"{unique}.double", '{"n": 1}')
    assert code == 0, stderr
    message_id = stdout.strip()
    assert len(message_id) == 32
    int(message_id, 16)
    await wait_for(lambda: depth_is(amqp, f"{unique}.double", 0))


async def test_send_exits_1_when_the_topology_is_missing(env: dict[str, str], unique: str) -> None:
    code, stdout, stderr = await amqtask_cli(env, "send", APP, f"{unique}.double", '{"n": 1}')
    assert code == 1
    assert stdout == ""
    assert "amqtask declare" in stderr


async def test_the_help_of_call_and_send_shows_an_example() -> None:
    for command in ("call", "send"):
        code, stdout, _ = await amqtask_cli(dict(os.environ), command, "--help")
        assert code == 0
        assert f"amqtask {command} examples.app:app" in stdout


async def test_send_with_delay_parks_the_task_on_the_broker_first(
    worker: list[str], env: dict[str, str], unique: str, amqp: AbstractConnection
) -> None:
    code, _, stderr = await amqtask_cli(
        env, "send", APP, f"{unique}.double", '{"n": 2}', "--delay", "1"
    )
    assert code == 0, stderr
    # One second is level 0 of the delay levels: the task waits there, not in its queue.
    assert await depth_is(amqp, f"{unique}.delay.0", 1)
    await wait_for(lambda: depth_is(amqp, f"{unique}.delay.0", 0), timeout=10)
    await wait_for(lambda: depth_is(amqp, f"{unique}.double", 0))
