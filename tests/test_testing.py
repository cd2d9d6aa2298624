"""Unit tests of `amqtask.testing`: apps on the in-memory broker with the virtual clock.

What the broker run gives for the same steps is checked side by side in
tests/integration/test_semantics.py; these tests cover the testing API itself.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta

import pytest
from pydantic import BaseModel

import amqtask
from amqtask import _codec
from amqtask._codec import Outgoing
from amqtask._control import inspect_workers
from amqtask.testing import TestApp
from amqtask.testing._broker import topic_matches
from amqtask.testing._messages import wire_headers


class Resize(BaseModel):
    path: str
    width: int


class Resized(BaseModel):
    path: str
    size: int


URL = "amqp://memory.invalid/"


def make_app(*contracts: amqtask.Contract[Resize, object]) -> amqtask.App:
    return amqtask.App(URL, list(contracts))


async def test_a_failing_task_waits_its_delay_retries_with_backoff_and_dead_letters_in_ms() -> None:
    resize = amqtask.contract("images.resize", Resize, returns=Resized, queue="images")
    app = make_app(resize)
    runs: list[float] = []

    @app.handler(resize)
    async def do_resize(job: Resize) -> Resized:
        runs.append(asyncio.get_running_loop().time())
        if job.width == 64:
            raise OSError("disk full")
        return Resized(path=job.path, size=job.width**2)

    started = time.monotonic()
    async with TestApp(app) as t:
        sent_at = t.clock.time()
        task_id = await app.send(
            resize, Resize(path="a.png", width=64), delay=timedelta(minutes=30)
        )
        await t.advance(minutes=29)
        assert runs == []
        await t.advance(minutes=30)
        (letter,) = t.dead_letters(resize)
        out = await app.call(resize, Resize(path="b.png", width=8))

    assert time.monotonic() - started < 5  # an hour of virtual time
    assert t.attempts(task_id) == 5
    assert 1800 <= runs[0] - sent_at < 1801
    gaps = [later - earlier for earlier, later in itertools.pairwise(runs[:5])]
    assert [round(gap) for gap in gaps] == [1, 2, 4, 8]
    assert letter.reason == "handler_error"
    assert letter.attempt == 5
    assert letter.error == "OSError: disk full"
    assert letter.message_id == task_id
    assert out == Resized(path="b.png", size=64)


async def test_a_batch_of_failing_tasks_is_retried_on_time_however_long_the_work_takes() -> None:
    # Between two timers the clock stands still: 200 tasks taking real time to fail must not
    # push their own next attempts back.
    job = amqtask.contract("jobs.run", Resize, retry=amqtask.Retry(attempts=5))
    app = make_app(job)
    runs: dict[int, int] = {}

    @app.handler(job)
    async def run(task: Resize) -> None:
        runs[task.width] = runs.get(task.width, 0) + 1
        raise OSError("again")

    async with TestApp(app) as t:
        for width in range(200):
            await app.send(job, Resize(path="a.png", width=width))
        await t.drain()
        await t.advance(seconds=15)  # attempts after 1, 2, 4 and 8 s: 15 s in all
        letters = t.dead_letters(job)

    assert set(runs.values()) == {5}
    assert len(letters) == 200


async def test_the_app_gets_its_own_transport_back_after_the_test() -> None:
    resize = amqtask.contract("images.resize", Resize)
    app = make_app(resize)
    transport, handlers = app.transport, app.handlers
    async with TestApp(app):
        assert app.transport is not transport
    assert app.transport is transport
    assert app.handlers is handlers
    with pytest.raises(amqtask.NotConnected):
        await app.send(resize, Resize(path="a.png", width=1))


async def test_a_delayed_send_arrives_at_its_eta_and_not_before() -> None:
    resize = amqtask.contract("images.resize", Resize)
    app = make_app(resize)
    seen: list[str] = []

    @app.handler(resize)
    def do_resize(job: Resize) -> None:  # a plain def: runs in a thread, as on a worker
        seen.append(job.path)

    async with TestApp(app) as t:
        await app.send(resize, Resize(path="later.png", width=1), eta=t.eta(timedelta(hours=2)))
        await app.send(resize, Resize(path="now.png", width=1))
        await t.drain()
        assert seen == ["now.png"]
        assert [m.json()["path"] for m in t.sent(resize)] == ["later.png", "now.png"]
        await t.advance(hours=1, minutes=59, seconds=59)
        assert seen == ["now.png"]
        await t.advance(seconds=2)
        assert seen == ["now.png", "later.png"]


async def test_drain_waits_for_a_handler_that_sleeps_and_advance_runs_a_long_sleep_at_once() -> (
    None
):
    resize = amqtask.contract("images.resize", Resize)
    app = make_app(resize)
    done: list[int] = []

    @app.handler(resize)
    async def do_resize(job: Resize) -> None:
        await asyncio.sleep(job.width)
        done.append(job.width)

    async with TestApp(app) as t:
        await app.send(resize, Resize(path="quick.png", width=0))
        await app.send(resize, Resize(path="slow.png", width=3600))
        await t.advance(seconds=1)
        assert done == [0]
        await t.advance(hours=1)
        assert done == [0, 3600]
        assert t.queued(resize) == []


async def test_a_call_to_a_task_nobody_handles_times_out_on_the_clock_and_its_request_expires() -> (
    None
):
    resize = amqtask.contract("images.resize", Resize, returns=Resized)
    app = make_app(resize)  # no handler: nobody consumes the queue
    async with TestApp(app) as t:
        call = asyncio.create_task(app.call(resize, Resize(path="a.png", width=1), timeout=30))
        await t.advance(seconds=29)
        assert not call.done()
        await t.advance(seconds=2)
        with pytest.raises(amqtask.CallTimeout):
            await call
        (letter,) = t.dead_letters(resize)

    assert letter.reason == "expired"
    assert letter.headers["x-first-death-reason"] == "expired"


async def test_messages_the_worker_cannot_decode_are_dead_lettered_with_their_reason() -> None:
    resize = amqtask.contract("images.resize", Resize)
    app = make_app(resize)

    @app.handler(resize)
    async def do_resize(job: Resize) -> None:
        pass

    async with TestApp(app) as t:
        for body, headers in [
            (b"{not json", {_codec.TASK: resize.name}),
            (b'{"path": 1}', {_codec.TASK: resize.name}),
            (b"{}", {_codec.TASK: "images.crop"}),
            (b"{}", {}),
        ]:
            message = Outgoing(body=body, message_id=f"m{len(body)}", headers=headers)
            exchange = app.names.task_exchange
            await app.transport.publish(
                exchange, resize.routing_key, message, task="raw", timeout=1
            )
        await t.drain()
        reasons = [letter.reason for letter in t.dead_letters(resize)]

    assert reasons == ["undecodable_body", "invalid_payload", "unknown_task", "missing_task_header"]


async def test_a_bounded_queue_refuses_sends_when_full_and_drop_head_dead_letters_the_oldest() -> (
    None
):
    bounded = amqtask.contract("images.resize", Resize, max_length=2, queue_type="classic")
    dropping = amqtask.contract(
        "images.crop", Resize, max_length=1, overflow="drop-head", queue_type="classic"
    )
    app = make_app(bounded, dropping)  # no handlers: nothing drains the queues
    async with TestApp(app) as t:
        for width in (1, 2):
            await app.send(bounded, Resize(path="a.png", width=width))
        with pytest.raises(amqtask.QueueFull):
            await app.send(bounded, Resize(path="a.png", width=3))
        first = await app.send(dropping, Resize(path="old.png", width=1))
        await app.send(dropping, Resize(path="new.png", width=1))
        assert [m.json()["width"] for m in t.queued(bounded)] == [1, 2]
        assert [m.json()["path"] for m in t.queued(dropping)] == ["new.png"]
        (dropped,) = t.dead_letters(dropping)

    assert dropped.message_id == first
    assert dropped.reason == "maxlen"


async def test_an_injected_publish_failure_reaches_the_sender_once() -> None:
    resize = amqtask.contract("images.resize", Resize)
    app = make_app(resize)
    async with TestApp(app) as t:
        t.fail_next_publish(amqtask.PublishInterrupted)
        with pytest.raises(amqtask.PublishInterrupted, match="injected"):
            await app.send(resize, Resize(path="a.png", width=1))
        t.fail_next_publish(amqtask.QueueFull, task=resize)
        with pytest.raises(amqtask.QueueFull):
            await app.send(resize, Resize(path="a.png", width=2))
        await app.send(resize, Resize(path="a.png", width=3))
        assert [m.json()["width"] for m in t.queued(resize)] == [3]


async def test_a_retry_whose_publish_is_interrupted_is_released_and_runs_again() -> None:
    resize = amqtask.contract("images.resize", Resize, retry=amqtask.Retry(attempts=2))
    app = make_app(resize)
    runs: list[bool] = []

    @app.handler(resize)
    async def do_resize(job: Resize) -> None:
        runs.append(True)
        raise OSError("flaky")

    async with TestApp(app) as t:
        task_id = await app.send(resize, Resize(path="a.png", width=1))
        t.fail_next_publish(amqtask.PublishInterrupted)  # the worker's retry copy
        await t.advance(seconds=10)
        letters = t.dead_letters(resize)

    # Released on the failed retry publish, so attempt 1 runs twice; then attempt 2 fails.
    assert t.attempts(task_id) == 3
    assert [letter.attempt for letter in letters] == [2]


async def test_a_worker_crash_redelivers_the_task_and_a_quorum_queue_counts_it() -> None:
    resize = amqtask.contract("images.resize", Resize, delivery_limit=1)
    app = make_app(resize)
    effects: list[str] = []

    @app.handler(resize)
    async def do_resize(job: Resize) -> None:
        effects.append(job.path)

    async with TestApp(app) as t:
        t.crash_next(resize)
        once = await app.send(resize, Resize(path="once.png", width=1))
        await t.drain()
        assert effects == ["once.png", "once.png"]  # ran, crashed before its ack, ran again
        assert t.dead_letters(resize) == []

        t.crash_next(resize, before_handler=True)
        t.crash_next(resize, before_handler=True)
        never = await app.send(resize, Resize(path="never.png", width=1))
        await t.drain()
        (letter,) = t.dead_letters(resize)

    assert t.attempts(once) == 2
    assert t.attempts(never) == 2
    assert effects == ["once.png", "once.png"]
    assert letter.message_id == never
    assert letter.reason == "delivery_limit"


async def test_a_crash_in_a_thread_handler_is_redelivered_too() -> None:
    resize = amqtask.contract("images.resize", Resize)
    app = make_app(resize)
    effects: list[str] = []

    @app.handler(resize)
    def do_resize(job: Resize) -> None:
        effects.append(job.path)

    async with TestApp(app) as t:
        t.crash_next(resize)
        await app.send(resize, Resize(path="a.png", width=1))
        await t.drain()

    assert effects == ["a.png", "a.png"]


async def test_redeliver_runs_a_finished_task_again_with_the_same_id() -> None:
    resize = amqtask.contract("images.resize", Resize)
    app = make_app(resize)
    seen: list[str] = []

    @app.handler(resize)
    async def do_resize(job: Resize) -> None:
        seen.append(job.path)

    async with TestApp(app) as t:
        task_id = await app.send(resize, Resize(path="a.png", width=1))
        with pytest.raises(KeyError):
            t.redeliver(task_id)  # not run yet
        await t.drain()
        t.redeliver(task_id)
        await t.drain()

    assert seen == ["a.png", "a.png"]
    assert t.attempts(task_id) == 2


async def test_a_producer_app_and_a_worker_app_share_one_broker() -> None:
    resize = amqtask.contract("images.resize", Resize, returns=Resized)
    worker, producer = make_app(resize), make_app(resize)

    @worker.handler(resize)
    async def do_resize(job: Resize) -> Resized:
        return Resized(path=job.path, size=job.width)

    async with TestApp(worker, producer):
        assert await producer.call(resize, {"path": "a.png", "width": 3}) == Resized(
            path="a.png", size=3
        )


async def test_without_declare_the_app_refuses_to_connect_as_on_a_fresh_broker() -> None:
    resize = amqtask.contract("images.resize", Resize)
    app = make_app(resize)
    with pytest.raises(amqtask.TopologyMissing):
        async with TestApp(app, declare=False):
            pass
    assert not app.transport.connected


def test_topic_patterns_match_words_as_rabbitmq_does() -> None:
    assert topic_matches("*.1.#", "0.1.images")
    assert topic_matches("*.1.#", "0.1")
    assert not topic_matches("*.1.#", "1.0.images")
    assert topic_matches("*.*.images.v2", "0.1.images.v2")
    assert not topic_matches("*.*.images", "0.1.images.v2")
    assert topic_matches("#", "")
    assert topic_matches("a.#.z", "a.z")
    assert topic_matches("a.#.z", "a.b.c.z")


def test_headers_come_back_as_a_consumer_reads_them_from_the_wire() -> None:
    headers = wire_headers({"text": "x", "count": 3, "raw": bytearray(b"\xff"), "flag": True})
    assert headers == {"text": "x", "count": 3, "raw": bytearray(b"\xff"), "flag": True}
    with pytest.raises(TypeError):
        wire_headers({"bad": object()})


def test_the_testing_module_exports_exactly_its_public_names() -> None:
    import amqtask.testing

    # "@..." names are pytest's assertion rewriting (the module is also a pytest plugin).
    public = {name for name in vars(amqtask.testing) if not name.startswith(("_", "@"))}
    assert set(amqtask.testing.__all__) == public
    for name in amqtask.testing.__all__:
        assert getattr(amqtask.testing, name).__module__.startswith("amqtask.testing.")


async def test_the_amqp_type_property_is_carried_through_retries_and_dead_letters() -> None:
    resize = amqtask.contract("images.resize", Resize, retry=amqtask.Retry(attempts=2, initial=1))
    app = make_app(resize)

    @app.handler(resize)
    async def do_resize(job: Resize) -> None:
        raise ValueError("too wide")

    async with TestApp(app) as t:
        await app.send(resize, Resize(path="a.png", width=64))
        await t.advance(seconds=5)
        (sent,) = t.sent(resize)
        (letter,) = t.dead_letters(resize)

    assert sent.type == resize.name  # as `send` publishes it: the task's name
    assert letter.message.type == resize.name  # kept on the retried copy and the dead letter


async def test_two_testapps_on_one_loop_leave_it_as_they_found_it() -> None:
    resize = amqtask.contract("images.resize", Resize)
    first, second = make_app(resize), make_app(resize)
    loop = asyncio.get_running_loop()
    async with TestApp(first) as outer:
        async with TestApp(second):
            await asyncio.to_thread(time.sleep, 0)
        await outer.drain()
        assert outer._threads == 0
        await asyncio.to_thread(time.sleep, 0)  # still counted by the outer one
    assert "run_in_executor" not in vars(loop)  # the loop's own method again


async def test_inspect_workers_is_answered_by_the_testapps_workers_over_the_memory_broker() -> None:
    resize = amqtask.contract("images.resize", Resize, queue="images")
    app = make_app(resize)
    started, release = asyncio.Event(), asyncio.Event()

    @app.handler(resize)
    async def do_resize(job: Resize) -> None:
        started.set()
        await release.wait()

    async with TestApp(app) as t:
        await app.send(resize, Resize(path="a.png", width=1))
        await started.wait()
        (busy,) = await inspect_workers(app, timeout=0.2)
        release.set()
        await t.drain()
        (idle,) = await inspect_workers(app, timeout=0.2)

    assert (busy["in_flight"], busy["running"], busy["processed"]) == (1, 1, {})
    assert busy["pool"] is None
    assert sorted(busy["queues"]) == ["images", "images.due"]
    assert (idle["in_flight"], idle["processed"]) == (0, {"succeeded": 1})


async def test_inspect_workers_without_a_worker_or_control_exchange_answers_nothing() -> None:
    resize = amqtask.contract("images.resize", Resize, queue="images")
    app = make_app(resize)
    async with TestApp(app, workers=False) as t:
        assert await inspect_workers(app, timeout=0.1) == []
        del t.broker.exchanges[app.names.control_exchange]  # declared by an older version
        assert await inspect_workers(app, timeout=0.1) == []  # logged, not raised
