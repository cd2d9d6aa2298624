"""The example services' own tests: no broker, the virtual clock (`amqtask.testing`).

`make example` runs the same two services against RabbitMQ.
"""

from datetime import timedelta

import pydantic
import pytest

from amqtask.testing import TestApp
from examples import app as worker_service
from examples.contracts import Notify, Resize, Resized, notify, resize
from examples.producer import main as run_producer
from examples.producer import producer


async def test_the_producer_run_processes_everything_and_dead_letters_the_unknown_user(
    amqtask_testapp: TestApp,
) -> None:
    await run_producer()
    await amqtask_testapp.drain()

    assert len(amqtask_testapp.sent(resize)) == 6  # five sends and one call
    assert amqtask_testapp.queued(resize) == []
    (letter,) = amqtask_testapp.dead_letters(notify)
    assert letter.reason == "handler_error"
    assert letter.error == "LookupError: no such user: nobody"
    assert amqtask_testapp.attempts(letter.message_id or "") == 1  # not a retried error


async def test_a_resize_call_returns_the_new_path_and_size(amqtask_testapp: TestApp) -> None:
    out = await producer.call(resize, Resize(path="cover.png", width=32))

    assert out == Resized(path="cover-32.png", size=1024)


async def test_an_invalid_resize_is_refused_before_anything_is_sent(
    amqtask_testapp: TestApp,
) -> None:
    with pytest.raises(pydantic.ValidationError):
        await producer.send(resize, {"path": "bad.png", "width": -1})

    assert amqtask_testapp.sent(resize) == []


async def test_an_unreachable_mail_server_is_retried_after_1_and_2_seconds_then_dead_lettered(
    amqtask_testapp: TestApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(user: str, text: str) -> None:
        raise ConnectionError("mail server unreachable")

    monkeypatch.setattr(worker_service, "deliver_mail", unreachable)
    task_id = await producer.send(notify, Notify(user="ada", text="hi"))
    await amqtask_testapp.advance(seconds=2.5)
    assert amqtask_testapp.attempts(task_id) == 2
    assert amqtask_testapp.dead_letters(notify) == []
    await amqtask_testapp.advance(seconds=1)

    assert amqtask_testapp.attempts(task_id) == 3
    (letter,) = amqtask_testapp.dead_letters(notify)
    assert letter.attempt == 3
    assert letter.error == "ConnectionError: mail server unreachable"


async def test_a_notification_delayed_by_half_an_hour_goes_out_after_half_an_hour(
    amqtask_testapp: TestApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    monkeypatch.setattr(worker_service, "deliver_mail", lambda user, text: sent.append(text))
    await producer.send(notify, Notify(user="ada", text="later"), delay=timedelta(minutes=30))
    await amqtask_testapp.advance(minutes=29)
    assert sent == []
    await amqtask_testapp.advance(minutes=1)

    assert sent == ["later"]


async def test_a_resize_call_survives_a_worker_crash_mid_task(amqtask_testapp: TestApp) -> None:
    amqtask_testapp.crash_next(resize)  # the worker dies after the handler, before its reply
    out = await producer.call(resize, Resize(path="a.png", width=2))

    assert out == Resized(path="a-2.png", size=4)
    assert amqtask_testapp.attempts(amqtask_testapp.sent(resize)[0].message_id or "") == 2
