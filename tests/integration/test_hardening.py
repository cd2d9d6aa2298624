"""Whatever a handler or a message does, every delivery settles and the worker lives on."""

from __future__ import annotations

import asyncio
import functools
import gzip
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask._transport import AioPikaTransport

from .conftest import (
    AppFactory,
    app_env,
    dead_letters,
    queue_depth,
    records,
    running,
    start_worker,
    wait_for,
)
from .proxy import start_proxy


class Job(BaseModel):
    n: int


class Act(BaseModel):
    kind: str
    n: int = 0


# What each act of tests/integration/apps/hostile_app.py raises, and the reason it is
# dead-lettered with.
HOSTILE_ACTS = {
    "surrogate": ("builtins.FileNotFoundError", "handler_error"),
    "str_raises": ("tests.integration.apps.hostile_app.BadStr", "handler_error"),
    "str_not_text": ("tests.integration.apps.hostile_app.NonStr", "handler_error"),
    "reject_none": (None, "rejected"),
    "cancelled": ("asyncio.exceptions.CancelledError", "handler_error"),
    "keyboard_interrupt": ("builtins.KeyboardInterrupt", "handler_error"),
    "system_exit": ("builtins.SystemExit", "handler_error"),
    "base_exception": ("builtins.BaseException", "handler_error"),
}


async def test_no_handler_misbehaviour_leaves_a_delivery_unsettled_or_kills_the_worker(
    make_app: AppFactory,
    amqp: AbstractConnection,
    broker_url: str,
    unique: str,
    tmp_path: Path,
) -> None:
    no_retry = amqtask.Retry(attempts=1)
    on_loop = amqtask.contract(f"{unique}.async", Act, retry=no_retry)
    in_thread = amqtask.contract(f"{unique}.thread", Act, retry=no_retry)
    producer = make_app([on_loop, in_thread])
    await producer.declare()
    async with producer:
        for contract in (on_loop, in_thread):
            for kind in HOSTILE_ACTS:
                await producer.send(contract, Act(kind=kind))
            for n in range(5):
                await producer.send(contract, Act(kind="ok", n=n))

    record = tmp_path / "record"
    # Two slots: a delivery left unsettled would soon hold every slot, and "ok" would not run.
    worker = await start_worker(
        "tests.integration.apps.hostile_app:app",
        "--concurrency",
        "2",
        env=app_env(broker_url, unique, record),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: sum(records(record)[1].values()) == 10, timeout=30)
        letters = {
            contract.name: await dead_letters(amqp, contract.queue, len(HOSTILE_ACTS))
            for contract in (on_loop, in_thread)
        }
        assert worker.returncode is None, "a handler's exception ended the worker process"
    finally:
        worker.terminate()
        assert await asyncio.wait_for(worker.wait(), 30) == 0

    assert records(record)[1] == Counter({n: 2 for n in range(5)})
    for contract in (on_loop, in_thread):
        by_kind = {Act.model_validate_json(m.body).kind: m.headers for m in letters[contract.name]}
        assert by_kind.keys() == HOSTILE_ACTS.keys()
        for kind, (error_type, reason) in HOSTILE_ACTS.items():
            headers = by_kind[kind]
            assert headers["amqtask-reason"] == reason, kind
            assert isinstance(headers["amqtask-error"], str), kind
            if error_type is not None:
                assert headers["amqtask-error-type"] == error_type, kind
        assert "caf\\udce9" in by_kind["surrogate"]["amqtask-error"]
        # Settled, not left for redelivery: nothing comes back once the worker has gone.
        assert await queue_depth(amqp, contract.queue) == 0


async def test_a_call_whose_result_cannot_be_encoded_is_answered_with_an_error_at_once(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    class Loose(BaseModel):
        value: Any

    ask = amqtask.contract(f"{unique}.ask", Job, returns=Loose)
    app = make_app([ask])

    @app.handler(ask)
    async def handle(task: Job) -> Loose:
        return Loose(value=object())  # validates, but has no JSON form

    await app.declare()
    caller = make_app([ask])
    async with running(app), caller:
        with pytest.raises(amqtask.InvalidReply) as raised:
            await caller.call(ask, Job(n=1), timeout=20)
        (letter,) = await dead_letters(amqp, ask.queue, 1)
    assert raised.value.reason == "invalid_result"
    assert letter.headers["amqtask-reason"] == "invalid_result"
    assert await queue_depth(amqp, ask.queue) == 0


def plain_decorator(func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(task: Any) -> Any:
        return func(task)  # hands back the coroutine, unawaited

    return wrapper


async def test_an_async_handler_behind_a_plain_decorator_or_in_a_callable_object_really_runs(
    make_app: AppFactory, unique: str
) -> None:
    wrapped = amqtask.contract(f"{unique}.wrapped", Job)
    hidden = amqtask.contract(f"{unique}.hidden", Job)
    called = amqtask.contract(f"{unique}.called", Job)
    app = make_app([wrapped, hidden, called])
    ran: list[str] = []

    @app.handler(wrapped)
    @plain_decorator
    async def handle_wrapped(task: Job) -> None:
        await asyncio.sleep(0)
        ran.append("wrapped")

    async def really(task: Job) -> None:
        await asyncio.sleep(0)
        ran.append("hidden")

    # No functools.wraps: nothing tells it is async until it returns a coroutine (in a thread).
    app.handler(hidden)(lambda task: really(task))

    class Handler:
        async def __call__(self, task: Job) -> None:
            await asyncio.sleep(0)
            ran.append("called")

    app.handler(called)(Handler())

    await app.declare()
    async with running(app), make_app([wrapped, hidden, called]) as producer:
        for contract in (wrapped, hidden, called):
            await producer.send(contract, Job(n=1))
        await wait_for(lambda: sorted(ran) == ["called", "hidden", "wrapped"])


async def test_json_with_a_charset_and_compressed_bodies_are_tasks_other_encodings_dead_letters(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    done: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        done.append(task.n)

    await app.declare()
    headers = {"amqtask-task": job.name, "amqtask-version": 1}
    good = [
        (b'{"n": 1}', "application/json; charset=utf-8", None),
        (b'{"n": 2}', "Application/JSON;charset=UTF-8", None),
        (gzip.compress(b'{"n": 3}'), "application/json", "gzip"),
        (zlib.compress(b'{"n": 4}'), "application/json", "deflate"),
    ]
    bad = [
        (b'{"n": 5}', "application/json; charset=latin-1", None, "unsupported_content_type"),
        (b'{"n": 6}', "application/json", "br", "unsupported_content_encoding"),
        (b"not gzip at all", "application/json", "gzip", "undecodable_body"),
    ]
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(app.names.task_exchange)
        for body, content_type, encoding, *_ in (*good, *bad):
            message = aio_pika.Message(
                body, headers=headers, content_type=content_type, content_encoding=encoding
            )
            await exchange.publish(message, job.routing_key)
    async with running(app):
        await wait_for(lambda: sorted(done) == [1, 2, 3, 4])
        letters = await dead_letters(amqp, job.queue, len(bad))
    reasons = {letter.body: letter.headers["amqtask-reason"] for letter in letters}
    assert reasons == {body: reason for body, _, _, reason in bad}
    # A dead letter keeps its encoding, so it can be replayed as it came.
    assert {letter.content_encoding for letter in letters} == {None, "br", "gzip"}


async def test_a_failing_task_with_huge_headers_is_dead_lettered_without_closing_the_connection(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=1))
    app = make_app([job])
    done: list[int] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        if task.n == 0:
            raise RuntimeError("x" * 3000)  # a long error and traceback on top of the headers
        done.append(task.n)

    await app.declare()
    huge = {"amqtask-task": job.name, "amqtask-version": 1, "junk": "j" * 125_000}
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(app.names.task_exchange)
        await exchange.publish(aio_pika.Message(b'{"n": 0}', headers=huge), job.routing_key)
    async with running(app, concurrency=4), make_app([job]) as producer:
        for n in range(1, 21):
            await producer.send(job, Job(n=n))
        (letter,) = await dead_letters(amqp, job.queue, 1)
        await wait_for(lambda: sorted(done) == list(range(1, 21)))
        assert app.transport.connected
    assert letter.headers["amqtask-reason"] == "handler_error"
    assert "junk" not in letter.headers
    assert letter.headers["amqtask-dropped-headers"] == "junk"
    assert letter.body == b'{"n": 0}'


async def test_a_send_while_the_connection_is_restored_waits_and_is_stored(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str
) -> None:
    proxy, proxied_url = await start_proxy(broker_url)
    job = amqtask.contract(f"{unique}.job", Job)
    await make_app([job]).declare()
    producer = make_app([job], transport=AioPikaTransport(proxied_url))
    try:
        async with producer:
            await producer.send(job, Job(n=0))
            proxy.refusing = True  # the broker stays out of reach until we say so
            proxy.cut()
            await wait_for(lambda: not producer.transport.connected, timeout=5)
            # Nothing was published yet, so nothing is uncertain: these wait for the reconnect.
            sends = [
                asyncio.create_task(producer.send(job, Job(n=n), timeout=30)) for n in range(1, 21)
            ]
            await asyncio.sleep(1.0)
            assert not any(send.done() for send in sends), "a send gave up while reconnecting"
            proxy.refusing = False
            await asyncio.gather(*sends)
    finally:
        await proxy.close()
    assert await queue_depth(amqp, job.queue) == 21


async def test_retries_cut_off_by_a_reconnect_are_retried_never_dead_lettered_early(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str
) -> None:
    proxy, proxied_url = await start_proxy(broker_url)
    job = amqtask.contract(
        f"{unique}.job", Job, retry=amqtask.Retry(attempts=3, initial=1, max_delay=1)
    )
    app = make_app([job], transport=AioPikaTransport(proxied_url))
    attempts: Counter[int] = Counter()
    succeeded: set[int] = set()
    cut = asyncio.Event()

    @app.handler(job)
    async def handle(task: Job) -> None:
        attempts[task.n] += 1
        if attempts[task.n] == 1:
            await cut.wait()  # fail only once the connection has been cut under us
            raise ConnectionResetError("the first attempt fails")
        succeeded.add(task.n)

    await app.declare()
    async with make_app([job]) as producer:
        for n in range(20):
            await producer.send(job, Job(n=n))
    try:
        async with running(app, concurrency=20):
            await wait_for(lambda: len(attempts) == 20)
            proxy.cut()
            cut.set()
            await wait_for(lambda: succeeded == set(range(20)), timeout=60)
    finally:
        await proxy.close()
    assert await queue_depth(amqp, f"{job.queue}.dead") == 0
