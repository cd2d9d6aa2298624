"""App.call against the real broker: direct reply-to, typed results, remote errors, timeouts."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pydantic
import pytest
import structlog
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

import amqtask
from amqtask._transport import AioPikaTransport

from .conftest import AppFactory, app_env, depth_is, queue_depth, running, start_worker, wait_for
from .proxy import start_proxy


class Job(BaseModel):  # the same shape as tests/integration/apps/slow_app.py's
    n: int


class Doubled(BaseModel):
    m: int


class Tripled(BaseModel):
    m: int
    factor: int


async def serving(
    make_app: AppFactory, contracts: list[amqtask.Contract[Any, Any]]
) -> tuple[amqtask.App, amqtask.App]:
    """A worker app (handlers to be added) and a caller app over the same declared contracts."""
    worker_app = make_app(contracts)
    await worker_app.declare()
    return worker_app, make_app(contracts)


async def test_a_call_returns_the_handlers_result_as_the_output_model(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    worker_app, caller = await serving(make_app, [double])
    sent: list[int] = []

    @worker_app.handler(double)
    def handle(task: Job) -> Doubled:  # a plain def: runs in a thread, replies all the same
        sent.append(task.n)
        return Doubled(m=task.n * 2)

    async with running(worker_app):
        async with caller:
            result = await caller.call(double, Job(n=21), timeout=10)
            from_dict = await caller.call(double, {"n": "4"}, timeout=10)
            # The same handler serves a send: it runs, and nobody is answered.
            await caller.send(double, Job(n=5))
            await wait_for(lambda: 5 in sent)
        async with caller:  # connected again: a new reply channel
            again = await caller.call(double, Job(n=1), timeout=10)

    assert type(result) is Doubled
    assert result == Doubled(m=42)
    assert from_dict == Doubled(m=8)
    assert again == Doubled(m=2)
    assert await queue_depth(amqp, double.queue) == 0


async def test_five_hundred_concurrent_calls_each_get_their_own_result(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    worker_app, caller = await serving(make_app, [double])

    @worker_app.handler(double)
    async def handle(task: Job) -> Doubled:
        await asyncio.sleep(random.uniform(0, 0.02))  # replies come back out of order
        return Doubled(m=task.n * 2)

    async with running(worker_app, concurrency=50), caller:
        results = await asyncio.gather(
            *(caller.call(double, Job(n=n), timeout=30) for n in range(500))
        )
        assert caller._caller.in_flight == 0

    assert [result.m for result in results] == [n * 2 for n in range(500)]
    assert await queue_depth(amqp, double.queue) == 0


async def test_a_handler_exception_reaches_the_caller_as_remote_error_and_is_not_retried(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)  # default Retry()
    worker_app, caller = await serving(make_app, [double])
    runs: Counter[int] = Counter()

    @worker_app.handler(double)
    async def handle(task: Job) -> Doubled:
        runs[task.n] += 1
        raise KeyError(f"no record {task.n}")

    async with running(worker_app), caller:
        with pytest.raises(amqtask.RemoteError) as caught:
            await caller.call(double, Job(n=7), timeout=10)
        await asyncio.sleep(0.5)

    error = caught.value
    assert type(error) is amqtask.RemoteError
    assert isinstance(error, amqtask.CallError)
    assert error.task == double.name
    assert error.reason == "handler_error"
    assert error.remote_type == "builtins.KeyError"
    assert error.remote_message == "'no record 7'"
    assert 'raise KeyError(f"no record {task.n}")' in error.remote_traceback
    assert "builtins.KeyError" in str(error)
    assert runs == Counter({7: 1})  # a call is answered, never retried
    # The failed request is dead-lettered like a sent task's.
    assert await queue_depth(amqp, f"{double.queue}.dead") == 1


async def test_a_contract_without_output_returns_none_once_the_handler_finished(
    make_app: AppFactory, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    worker_app, caller = await serving(make_app, [job])
    finished: list[int] = []

    @worker_app.handler(job)
    async def handle(task: Job) -> str:
        await asyncio.sleep(0.1)
        finished.append(task.n)
        return "ignored: the contract has no output model"

    async with running(worker_app), caller:
        result = await caller.call(job, Job(n=1), timeout=10)

        assert result is None
        assert finished == [1]


async def test_an_invalid_request_raises_validation_error_and_publishes_nothing(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    _, caller = await serving(make_app, [double])

    async with caller:
        with pytest.raises(pydantic.ValidationError):
            await caller.call(double, {"n": "seven"}, timeout=5)
        with pytest.raises(pydantic.ValidationError):
            await caller.call(double, {}, timeout=5)

    assert await queue_depth(amqp, double.queue) == 0


async def test_a_handler_result_of_the_wrong_shape_raises_invalid_reply(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    worker_app, caller = await serving(make_app, [double])

    @worker_app.handler(double)
    async def handle(task: Job) -> Any:
        return {"doubled": task.n * 2}  # not a Doubled

    async with running(worker_app), caller:
        with pytest.raises(amqtask.InvalidReply) as caught:
            await caller.call(double, Job(n=1), timeout=10)
        await asyncio.sleep(0.5)

    error = caught.value
    assert isinstance(error, amqtask.RemoteError)
    assert error.reason == "invalid_result"
    assert error.remote_type.endswith("ValidationError")
    assert "does not fit Doubled" in error.remote_message
    assert error.task == double.name
    assert await queue_depth(amqp, f"{double.queue}.dead") == 1


async def test_a_reply_that_does_not_fit_the_callers_model_raises_invalid_reply(
    make_app: AppFactory, unique: str
) -> None:
    # Caller and worker hold different versions of the output model.
    on_worker = amqtask.contract(f"{unique}.multiply", Job, returns=Doubled)
    on_caller = amqtask.contract(f"{unique}.multiply", Job, returns=Tripled)
    worker_app = make_app([on_worker])
    await worker_app.declare()
    caller = make_app([on_caller])

    @worker_app.handler(on_worker)
    async def handle(task: Job) -> Doubled:
        return Doubled(m=task.n * 2)

    async with running(worker_app), caller:
        with pytest.raises(amqtask.InvalidReply, match=rf"{unique}\.multiply.*Tripled"):
            await caller.call(on_caller, Job(n=1), timeout=10)


async def test_a_request_the_worker_refuses_is_answered_at_once_and_dead_lettered(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    handled = amqtask.contract(f"{unique}.handled", Job, returns=Doubled)
    # Routed to the same queue, but the worker has no handler for it.
    stranger = amqtask.contract(f"{unique}.stranger", Job, queue=handled.queue)

    class Text(BaseModel):
        n: str

    # The caller's idea of the input differs from the worker's.
    skewed = amqtask.contract(f"{unique}.handled", Text, returns=Doubled)
    worker_app = make_app([handled])
    producer = make_app([handled, stranger])
    await producer.declare()
    caller = make_app([skewed])

    @worker_app.handler(handled)
    async def handle(task: Job) -> Doubled:
        return Doubled(m=task.n)

    async with running(worker_app), producer, caller:
        started = asyncio.get_running_loop().time()
        with pytest.raises(amqtask.RemoteError) as unknown:
            await producer.call(stranger, Job(n=1), timeout=20)
        with pytest.raises(amqtask.RemoteError) as invalid:
            await caller.call(skewed, Text(n="one"), timeout=20)
        elapsed = asyncio.get_running_loop().time() - started
        await asyncio.sleep(0.5)

    assert elapsed < 5  # answered, not left to time out
    assert unknown.value.reason == "unknown_task"
    assert f"{unique}.stranger" in unknown.value.remote_message
    assert unknown.value.remote_type == "amqtask._exceptions.DecodeError"
    assert invalid.value.reason == "invalid_payload"
    assert "Job" in invalid.value.remote_message
    assert await queue_depth(amqp, f"{handled.queue}.dead") == 2


async def test_a_call_times_out_and_its_expired_request_never_runs(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    worker_app, caller = await serving(make_app, [double])
    runs: list[int] = []

    @worker_app.handler(double)
    async def handle(task: Job) -> Doubled:
        runs.append(task.n)
        return Doubled(m=task.n * 2)

    async with caller:
        started = asyncio.get_running_loop().time()
        with pytest.raises(amqtask.CallTimeout, match=f"no reply within 0.5 s.*{double.queue}"):
            await caller.call(double, Job(n=1), timeout=0.5)
        assert 0.5 <= asyncio.get_running_loop().time() - started < 2
        await asyncio.sleep(0.7)  # past the request's expiry
        async with running(worker_app):
            # A later call goes through: the expired one was dropped, not run.
            assert await caller.call(double, Job(n=2), timeout=10) == Doubled(m=4)
            await asyncio.sleep(0.3)

    assert runs == [2]
    assert await queue_depth(amqp, double.queue) == 0
    # The broker dead-letters what expires in a queue with a dead-letter exchange: the stale
    # request is kept there for inspection, marked as expired by the broker.
    async with amqp.channel() as channel:
        dlq = await channel.declare_queue(f"{double.queue}.dead", passive=True)
        letter = await dlq.get(timeout=5)
        await letter.ack()
    assert letter.headers["x-first-death-reason"] == "expired"
    assert letter.body == b'{"n":1}'


async def test_a_request_held_by_a_busy_worker_past_its_deadline_is_dropped_unrun(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    # Prefetch 2, one slot: the second request waits in the worker, out of the broker's reach,
    # while the first one runs; the worker itself must notice that its caller gave up.
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    worker_app, caller = await serving(make_app, [double])
    release = asyncio.Event()
    runs: list[int] = []

    @worker_app.handler(double)
    async def handle(task: Job) -> Doubled:
        runs.append(task.n)
        if task.n == 1:
            await release.wait()
        return Doubled(m=task.n * 2)

    with structlog.testing.capture_logs() as logs:
        async with running(worker_app, concurrency=1, prefetch=2), caller:
            first = asyncio.create_task(caller.call(double, Job(n=1), timeout=20))
            await wait_for(lambda: runs == [1])
            with pytest.raises(amqtask.CallTimeout):
                await caller.call(double, Job(n=2), timeout=0.5)
            release.set()
            assert await first == Doubled(m=2)
            await wait_for(lambda: any(e["event"] == "call_expired" for e in logs))

    assert runs == [1]
    expired = next(e for e in logs if e["event"] == "call_expired")
    assert expired["task"] == double.name
    assert await queue_depth(amqp, double.queue) == 0
    assert await queue_depth(amqp, f"{double.queue}.dead") == 0


async def test_a_reply_arriving_after_the_timeout_is_discarded(
    make_app: AppFactory, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    worker_app, caller = await serving(make_app, [double])
    done: list[int] = []

    @worker_app.handler(double)
    async def handle(task: Job) -> Doubled:
        await asyncio.sleep(0.8 if task.n == 1 else 0)
        done.append(task.n)
        return Doubled(m=task.n * 2)

    with structlog.testing.capture_logs() as logs:
        async with running(worker_app), caller:
            with pytest.raises(amqtask.CallTimeout):
                await caller.call(double, Job(n=1), timeout=0.3)  # started in time, ends late
            await wait_for(lambda: any(e["event"] == "late_reply_discarded" for e in logs))
            assert await caller.call(double, Job(n=3), timeout=10) == Doubled(m=6)

    assert done == [1, 3]
    late = next(e for e in logs if e["event"] == "late_reply_discarded")
    assert late["log_level"] == "debug"


async def test_a_call_whose_worker_is_killed_times_out_without_hanging(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    env = app_env(broker_url, unique, record, TEST_SLEEP="30")
    job = amqtask.contract(f"{unique}.job", Job)  # slow_app's contract
    caller = make_app([job])
    await caller.declare()
    worker = await start_worker(
        "tests.integration.apps.slow_app:app", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with caller:
            call = asyncio.create_task(caller.call(job, Job(n=1), timeout=3))
            await wait_for(lambda: record.exists() and "start 1" in record.read_text())
            worker.send_signal(signal.SIGKILL)
            started = asyncio.get_running_loop().time()
            with pytest.raises(amqtask.CallTimeout):
                await asyncio.wait_for(call, 10)
            assert asyncio.get_running_loop().time() - started < 3.5
    finally:
        if worker.returncode is None:
            worker.kill()
        await worker.wait()

    # The request went back to the queue when its worker died, and expired there.
    await wait_for(lambda: depth_is(amqp, job.queue, 0))
    assert "done 1" not in record.read_text()


async def test_a_lost_connection_fails_every_call_in_flight_and_later_calls_work(
    make_app: AppFactory, amqp: AbstractConnection, broker_url: str, unique: str
) -> None:
    proxy, proxied_url = await start_proxy(broker_url)
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    worker_app = make_app([double])
    await worker_app.declare()
    caller = make_app([double], transport=AioPikaTransport(proxied_url))
    release = asyncio.Event()
    started: list[int] = []

    @worker_app.handler(double)
    async def handle(task: Job) -> Doubled:
        started.append(task.n)
        if task.n < 5:
            await release.wait()
        return Doubled(m=task.n * 2)

    try:
        async with running(worker_app, concurrency=10), caller:
            calls = [
                asyncio.create_task(caller.call(double, Job(n=n), timeout=60)) for n in range(5)
            ]
            await wait_for(lambda: len(started) == 5)
            proxy.cut()
            cut_at = asyncio.get_running_loop().time()
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
            failed_after = asyncio.get_running_loop().time() - cut_at
            release.set()  # their replies go to a reply-to address that no longer exists
            # After the robust connection is back, calls work again.
            assert await caller.call(double, Job(n=10), timeout=30) == Doubled(m=20)
            assert await caller.call(double, Job(n=11), timeout=30) == Doubled(m=22)
    finally:
        await proxy.close()

    assert all(isinstance(outcome, amqtask.ConnectionLost) for outcome in outcomes), outcomes
    assert failed_after < 2  # at once, not at the call timeout
    assert "connection to the broker" in str(outcomes[0])
    assert await queue_depth(amqp, double.queue) == 0


async def test_connecting_before_declare_is_refused_and_the_app_recovers(
    make_app: AppFactory, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    worker_app = make_app([double])
    caller = make_app([double])

    @worker_app.handler(double)
    async def handle(task: Job) -> Doubled:
        return Doubled(m=task.n * 2)

    with pytest.raises(amqtask.TopologyMissing, match=r"tasks'.*amqtask declare"):
        async with caller:
            pass
    await caller.declare()
    async with caller, running(worker_app):
        assert await caller.call(double, Job(n=2), timeout=10) == Doubled(m=4)


async def test_call_outside_the_context_manager_raises_not_connected(
    make_app: AppFactory, unique: str
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=Doubled)
    app = make_app([double])
    with pytest.raises(amqtask.NotConnected):
        await app.call(double, Job(n=1), timeout=1)
