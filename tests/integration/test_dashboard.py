"""`amqtask dashboard`: every endpoint over HTTP (aiohttp's test client) against the real broker,
its safety checks, and the command itself."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel

import amqtask
from amqtask import _codec
from amqtask.dashboard import create_dashboard

from .conftest import AppFactory, depth_is, queue_depth, running, wait_for, write_app_module
from .private_node import PrivateNode

ACTION = {"X-Amqtask-Action": "1"}


class Job(BaseModel):
    n: int


@asynccontextmanager
async def dashboard(app: amqtask.App, **options: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """The dashboard of `app` on a test server, sampling every 0.2 s."""
    options.setdefault("interval", 0.2)
    server = TestServer(create_dashboard(app, **options))
    async with TestClient(server) as client:
        yield client


async def ok(response: ClientResponse) -> Any:
    assert response.status == 200, await response.text()
    return await response.json()


async def post(client: TestClient[Any, Any], path: str, body: Any) -> ClientResponse:
    return await client.post(path, json=body, headers=ACTION)


async def put_dead_letters(
    amqp: AbstractConnection, contract: amqtask.Contract[Any, Any], count: int, start: int = 0
) -> list[str]:
    """Publish `count` dead letters straight to `contract`'s dead-letter queue, as a failed
    handler leaves them; their message ids are `dl-N`."""
    ids = []
    async with amqp.channel() as channel:
        for n in range(start, start + count):
            message_id = f"dl-{n}"
            await channel.default_exchange.publish(
                aio_pika.Message(
                    f'{{"n":{n}}}'.encode(),
                    message_id=message_id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers={
                        _codec.TASK: contract.name,
                        _codec.VERSION: contract.version,
                        _codec.REASON: "handler_error",
                        _codec.ERROR: f"RuntimeError: job {n} broke",
                        _codec.ERROR_TYPE: "RuntimeError",
                        _codec.TRACEBACK: f"Traceback (most recent call last):\n  line {n}\n",
                        _codec.ATTEMPT: 3,
                        _codec.FIRST_FAILED_AT: "2030-01-01T00:00:00+00:00",
                        _codec.FAILED_AT: "2030-01-01T00:01:00+00:00",
                    },
                ),
                routing_key=f"{contract.queue}.dead",
            )
            ids.append(message_id)
    return ids


async def dead_ids_are(client: TestClient[Any, Any], task: str, expected: list[str]) -> None:
    """Wait until the dead letters of `task` are `expected`, in order. A quorum queue takes the
    letters a closed channel held back asynchronously, after the close: a read just after a scan
    may miss them for a moment."""
    seen: list[list[str]] = []

    async def equal() -> bool:
        page = await ok(await client.get(f"/api/dead-letters/{task}?limit=200"))
        seen.append([letter["message_id"] for letter in page["letters"]])
        return seen[-1] == expected

    await wait_for(equal, timeout=10, interval=0.1)


async def dead_depth_is(amqp: AbstractConnection, contract: Any, expected: int) -> None:
    await wait_for(lambda: depth_is(amqp, f"{contract.queue}.dead", expected), timeout=10)


# --- pages, config, overview, rates ---------------------------------------------------------------


async def test_the_page_and_its_static_files_are_served(make_app: AppFactory, unique: str) -> None:
    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    async with dashboard(app) as client:
        page = await client.get("/")
        assert page.status == 200
        assert "text/html" in page.headers["Content-Type"]
        assert "<html" in (await page.text()).lower()
        script = await client.get("/static/vendor/uPlot.iife.min.js")
        assert script.status == 200
        for response in (page, script, await client.get("/api/config")):
            assert response.headers["X-Frame-Options"] == "DENY"
            assert response.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert (await client.get("/static/../__init__.py")).status == 404
        missing = await client.get("/api/nothing")
        assert missing.status == 404
        assert "error" in await missing.json()


async def test_config_and_overview_report_the_queues_without_the_broker_password(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    other = amqtask.contract(f"{unique}.other", Job)
    app = make_app([job, other])
    await app.declare()
    async with app:
        for n in range(3):
            await app.send(job, Job(n=n))
    await put_dead_letters(amqp, job, 2)
    async with dashboard(app, app_path="tests.app:app") as client:
        config = await ok(await client.get("/api/config"))
        assert config == {
            "app": "tests.app:app",
            "namespace": unique,
            "broker": "amqp://guest:***@127.0.0.1:5672/",
            "management": False,
            "read_only": False,
            "store": False,
            "schedules": False,
            "version": config["version"],
        }

        async def counted() -> bool:
            data = await ok(await client.get("/api/overview"))
            rows = {row["task"]: row for row in data["tasks"]}
            return rows[job.name]["ready"] == 3 and rows[job.name]["dead_letters"] == 2

        await wait_for(counted)
        response = await client.get("/api/overview")
        text = await response.text()
        data = await response.json()
        assert ":guest@" not in text
        rows = {row["task"]: row for row in data["tasks"]}
        assert rows[other.name]["ready"] == 0
        assert rows[job.name]["consumers"] == 0
        assert rows[job.name]["unacked"] is None  # unknown over AMQP, never 0
        assert data["error"] is None
        assert data["sampled_at"] is not None
        assert data["cluster"] == {"available": False, "nodes": [], "balanced": None}
        assert data["delayed"]["messages"] == 0

        async def sampled_twice() -> bool:
            return len((await ok(await client.get("/api/rates")))["t"]) >= 2

        await wait_for(sampled_twice)
        rates = await ok(await client.get("/api/rates"))
        assert rates["interval"] == 0.2
        assert set(rates["tasks"]) == {job.name, other.name}
        for series in rates["tasks"].values():
            assert len(series["in"]) == len(series["out"]) == len(rates["t"])

        queues = await ok(await client.get("/api/dead-letters"))
        assert {q["task"]: q["count"] for q in queues["queues"]} == {job.name: 2, other.name: 0}
        contracts = await ok(await client.get("/api/contracts"))
        assert [c["name"] for c in contracts["contracts"]] == sorted([job.name, other.name])
        assert "properties" in contracts["contracts"][0]["input"]


# --- dead letters ---------------------------------------------------------------------------------


@pytest.fixture
def job(unique: str) -> amqtask.Contract[Job, Any]:
    return amqtask.contract(f"{unique}.job", Job)


@pytest.fixture
async def app(make_app: AppFactory, job: amqtask.Contract[Job, Any]) -> amqtask.App:
    """An app of `job` alone, its queues declared."""
    app = make_app([job])
    await app.declare()
    return app


async def test_dead_letters_page_at_an_offset_and_show_one_in_full_removing_nothing(
    app: amqtask.App, job: amqtask.Contract[Job, Any], amqp: AbstractConnection
) -> None:
    await put_dead_letters(amqp, job, 7)
    async with dashboard(app) as client:
        page = await ok(await client.get(f"/api/dead-letters/{job.name}?offset=2&limit=3"))
        assert page["count"] == 7
        assert (page["offset"], page["limit"]) == (2, 3)
        assert [letter["message_id"] for letter in page["letters"]] == ["dl-2", "dl-3", "dl-4"]
        first = page["letters"][0]
        assert first["reason"] == "handler_error"
        assert first["error"] == "RuntimeError: job 2 broke"
        assert first["attempts"] == 3
        assert first["body"] == '{"n":2}'
        assert first["failed_at"] == "2030-01-01T00:01:00+00:00"
        # The last page is short; the order is the queue's, the same on every read.
        tail = await ok(await client.get(f"/api/dead-letters/{job.name}?offset=5&limit=50"))
        assert [letter["message_id"] for letter in tail["letters"]] == ["dl-5", "dl-6"]
        capped = await ok(await client.get(f"/api/dead-letters/{job.name}?limit=100000"))
        assert capped["limit"] == 200
        assert (await client.get(f"/api/dead-letters/{job.name}?offset=x")).status == 400

        detail = await ok(await client.get(f"/api/dead-letters/{job.name}/dl-4"))
        letter = detail["letter"]
        assert letter["message_id"] == "dl-4"
        assert letter["traceback"] == "Traceback (most recent call last):\n  line 4\n"
        assert letter["error_type"] == "RuntimeError"
        assert letter["headers"][_codec.TASK] == job.name
        assert letter["headers"][_codec.ATTEMPT] == "3"
        assert letter["content_type"] == "application/json"
        assert letter["body"] == '{"n":4}'
        gone = await client.get(f"/api/dead-letters/{job.name}/no-such-id")
        assert gone.status == 404
        assert "no-such-id" in (await gone.json())["error"]
        assert (await client.get("/api/dead-letters/no.such.task")).status == 404
    await dead_depth_is(amqp, job, 7)


async def test_pages_asked_for_at_once_each_see_every_letter(
    app: amqtask.App, job: amqtask.Contract[Job, Any], amqp: AbstractConnection
) -> None:
    ids = await put_dead_letters(amqp, job, 5)
    async with dashboard(app) as client:

        async def read(path: str) -> Any:
            return await ok(await client.get(f"/api/dead-letters/{job.name}{path}"))

        pages = await asyncio.gather(*(read("?offset=0&limit=5") for _ in range(2)))
        details = await asyncio.gather(read("/dl-4"), read(""))
    # Each read saw every letter: none was held by another read meanwhile.
    assert all([letter["message_id"] for letter in page["letters"]] == ids for page in pages)
    assert details[0]["letter"]["message_id"] == "dl-4"
    assert details[1]["count"] == 5


async def test_with_a_read_running_and_one_waiting_a_third_is_answered_429(
    app: amqtask.App,
    job: amqtask.Contract[Job, Any],
    amqp: AbstractConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from amqtask import _dead_letters
    from amqtask.dashboard._server import DATA

    await put_dead_letters(amqp, job, 2)
    gate = asyncio.Event()
    entered = asyncio.Event()
    real_page = _dead_letters.page_dead_letters

    async def held_page(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        return await real_page(*args, **kwargs)

    monkeypatch.setattr(_dead_letters, "page_dead_letters", held_page)
    async with dashboard(app) as client:
        path = f"/api/dead-letters/{job.name}"
        running = asyncio.create_task(client.get(path))
        await asyncio.wait_for(entered.wait(), 10)
        waiting = asyncio.create_task(client.get(path))
        data = client.server.app[DATA]
        await wait_for(lambda: data._scan_waiters.get(job.queue) == 1, timeout=10)
        third = await client.get(f"{path}/dl-0")
        assert third.status == 429
        assert "try again" in (await third.json())["error"]
        gate.set()
        for response in await asyncio.gather(running, waiting):
            assert len((await ok(response))["letters"]) == 2


async def test_cross_site_requests_to_the_api_are_refused_the_page_s_own_are_not(
    app: amqtask.App, job: amqtask.Contract[Job, Any], amqp: AbstractConnection
) -> None:
    await put_dead_letters(amqp, job, 1)
    async with dashboard(app) as client:
        path = f"/api/dead-letters/{job.name}/dl-0"
        own = f"http://{client.host}:{client.port}"
        for headers in (
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"},
        ):
            refused = await client.get(path, headers=headers)
            assert refused.status == 403, headers
            assert "cross-site" in (await refused.json())["error"]
        cross_post = await client.post(
            f"/api/dead-letters/{job.name}/purge",
            json={"all": True},
            headers={**ACTION, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert cross_post.status == 403
        for headers in (
            {},
            {"Sec-Fetch-Site": "same-origin"},
            {"Sec-Fetch-Site": "none"},
            {"Sec-Fetch-Site": "same-origin", "Origin": own},
        ):
            answer = await ok(await client.get(path, headers=headers))
            assert answer["letter"]["message_id"] == "dl-0"
        assert (await client.get("/", headers={"Sec-Fetch-Site": "cross-site"})).status == 200
    await dead_depth_is(amqp, job, 1)


async def test_a_deep_read_holds_at_most_a_window_of_letters_and_keeps_their_order(
    make_app: AppFactory, amqp: AbstractConnection, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from amqtask import _dead_letters

    monkeypatch.setattr(_dead_letters, "WINDOW", 10)  # 1,000 in use: the same, smaller
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    ids = await put_dead_letters(amqp, job, 45)
    held = most = 0
    read: list[str | None] = []

    async def slow_visit(_index: int, message: Any) -> bool:
        # Letters the broker sent that are not read yet are in this process's memory.
        nonlocal held, most
        held += 1
        most = max(most, held)
        await asyncio.sleep(0.01)
        read.append(message.message_id)
        held -= 1
        return False

    assert await _dead_letters._scan(app, job, slow_visit, first=43) == 45
    assert read == ids[:43]
    assert most <= 10  # a prefetch of `wanted` had all 43 in memory at once
    async with dashboard(app) as client:
        # Past the window, pages are right, and the letters went back in their order.
        page = await ok(await client.get(f"/api/dead-letters/{job.name}?offset=38&limit=5"))
        assert [letter["message_id"] for letter in page["letters"]] == ids[38:43]
        assert [letter["position"] for letter in page["letters"]] == list(range(38, 43))
        await dead_ids_are(client, job.name, ids)
    await dead_depth_is(amqp, job, 45)


async def test_a_large_body_is_previewed_within_its_bound(
    app: amqtask.App, job: amqtask.Contract[Job, Any], amqp: AbstractConnection
) -> None:
    async with amqp.channel() as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(b"x" * 200_000, message_id="big", headers={"h": "y" * 10_000}),
            routing_key=f"{job.queue}.dead",
        )
    async with dashboard(app) as client:
        (listed,) = (await ok(await client.get(f"/api/dead-letters/{job.name}")))["letters"]
        assert listed["body_size"] == 200_000
        assert listed["body_truncated"] is True
        assert len(listed["body"]) == 1024
        letter = (await ok(await client.get(f"/api/dead-letters/{job.name}/big")))["letter"]
        assert len(letter["body"]) == 64 * 1024
        assert len(letter["headers"]["h"]) < 4100


async def test_replay_of_one_a_selection_and_all_moves_them_to_the_work_queue(
    app: amqtask.App, job: amqtask.Contract[Job, Any], amqp: AbstractConnection
) -> None:
    await put_dead_letters(amqp, job, 6)
    async with dashboard(app) as client:
        one = await post(client, f"/api/dead-letters/{job.name}/replay", {"ids": ["dl-1"]})
        assert await ok(one) == {"replayed": 1}
        assert await queue_depth(amqp, job.queue) == 1
        await dead_ids_are(client, job.name, ["dl-0", "dl-2", "dl-3", "dl-4", "dl-5"])

        some = await post(client, f"/api/dead-letters/{job.name}/replay", {"ids": ["dl-3", "dl-5"]})
        assert await ok(some) == {"replayed": 2}
        await dead_ids_are(client, job.name, ["dl-0", "dl-2", "dl-4"])

        every = await post(client, f"/api/dead-letters/{job.name}/replay", {"all": True})
        assert await ok(every) == {"replayed": 3}
        await dead_ids_are(client, job.name, [])
    assert await queue_depth(amqp, job.queue) == 6
    async with amqp.channel() as channel:
        work = await channel.declare_queue(job.queue, passive=True)
        message = await work.get()
        assert message.message_id == "dl-1"
        assert _codec.REASON not in (message.headers or {})  # starts afresh
        await message.nack(requeue=True)


async def test_a_replay_the_work_queue_refuses_keeps_the_dead_letter(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, max_length=1)
    app = make_app([job])
    await app.declare()

    async def fill() -> None:
        for n in range(5):
            await app.send(job, Job(n=n))

    async with app:
        with pytest.raises(amqtask.QueueFull):  # the work queue is full now
            await fill()
    full = await queue_depth(amqp, job.queue)
    await put_dead_letters(amqp, job, 2)
    async with dashboard(app) as client:
        refused = await post(client, f"/api/dead-letters/{job.name}/replay", {"ids": ["dl-0"]})
        assert refused.status == 502
        assert "refused" in (await refused.json())["error"]
        # No confirm, no removal: the dead letter stays where it was.
        await dead_ids_are(client, job.name, ["dl-0", "dl-1"])
    assert await queue_depth(amqp, job.queue) == full


async def test_purge_by_id_deletes_only_those_and_purge_all_empties_the_queue(
    app: amqtask.App, job: amqtask.Contract[Job, Any], amqp: AbstractConnection
) -> None:
    await put_dead_letters(amqp, job, 5)
    async with dashboard(app) as client:
        some = await post(client, f"/api/dead-letters/{job.name}/purge", {"ids": ["dl-0", "dl-3"]})
        assert await ok(some) == {"purged": 2}
        await dead_ids_are(client, job.name, ["dl-1", "dl-2", "dl-4"])
        assert await queue_depth(amqp, job.queue) == 0  # deleted, not replayed
        every = await post(client, f"/api/dead-letters/{job.name}/purge", {"all": True})
        assert await ok(every) == {"purged": 3}
        await dead_ids_are(client, job.name, [])
        bad = await post(client, f"/api/dead-letters/{job.name}/purge", {"ids": []})
        assert bad.status == 400


# --- safety ---------------------------------------------------------------------------------------


async def test_of_two_letters_sharing_an_id_each_is_a_row_and_one_is_acted_on_alone(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    await put_dead_letters(amqp, job, 1, start=0)
    await put_dead_letters(amqp, job, 1, start=0)  # the same message id, a second copy
    async with amqp.channel() as channel:  # and a third copy with another body
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"n":99}', message_id="dl-0"), routing_key=f"{job.queue}.dead"
        )
    path = f"/api/dead-letters/{job.name}"
    async with dashboard(app) as client:
        page = await ok(await client.get(path))
        letters = page["letters"]
        assert [letter["message_id"] for letter in letters] == ["dl-0"] * 3
        assert [letter["position"] for letter in letters] == [0, 1, 2]
        other = letters[2]
        assert other["digest"] != letters[0]["digest"]
        # One copy named: only it goes, not every letter with its id.
        one = {"letters": [{"id": "dl-0", "digest": other["digest"]}]}
        assert await ok(await post(client, f"{path}/purge", one)) == {"purged": 1}
        await dead_depth_is(amqp, job, 2)
        left = (await ok(await client.get(path)))["letters"]
        assert [letter["body"] for letter in left] == ['{"n":0}', '{"n":0}']
        # Of two identical copies, naming one replays one.
        twin = {"letters": [{"id": "dl-0", "digest": left[0]["digest"]}]}
        assert await ok(await post(client, f"{path}/replay", twin)) == {"replayed": 1}
        await dead_depth_is(amqp, job, 1)
        assert await queue_depth(amqp, job.queue) == 1
        gone = {"letters": [{"id": "dl-0", "digest": other["digest"]}]}
        assert await ok(await post(client, f"{path}/purge", gone)) == {"purged": 0}
        bad = await post(client, f"{path}/purge", {"letters": [{"id": "dl-0"}]})
        assert bad.status == 400
    await dead_depth_is(amqp, job, 1)


async def test_purge_all_with_the_count_seen_refuses_when_the_queue_holds_more(
    make_app: AppFactory, amqp: AbstractConnection, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    await put_dead_letters(amqp, job, 2)
    path = f"/api/dead-letters/{job.name}/purge"
    async with dashboard(app) as client:
        seen = (await ok(await client.get(f"/api/dead-letters/{job.name}")))["count"]
        await put_dead_letters(amqp, job, 1, start=2)  # one more arrived after the page was read
        await dead_depth_is(amqp, job, 3)
        refused = await post(client, path, {"all": True, "count": seen})
        assert refused.status == 409
        answer = await refused.json()
        assert answer["count"] == 3
        assert "nothing purged" in answer["error"]
        await dead_depth_is(amqp, job, 3)
        assert (await post(client, path, {"all": True, "count": "3"})).status == 400
        assert await ok(await post(client, path, {"all": True, "count": 3})) == {"purged": 3}
    await dead_depth_is(amqp, job, 0)


async def test_write_actions_need_the_action_header_and_json_and_read_only_refuses_them(
    app: amqtask.App, job: amqtask.Contract[Job, Any], amqp: AbstractConnection
) -> None:
    await put_dead_letters(amqp, job, 1)
    path = f"/api/dead-letters/{job.name}/purge"
    async with dashboard(app) as client:
        no_header = await client.post(path, json={"all": True})
        assert no_header.status == 403
        assert "X-Amqtask-Action" in (await no_header.json())["error"]
        form = await client.post(path, data={"all": "true"}, headers=ACTION)
        assert form.status == 415
        assert (await client.get(path)).status in (404, 405)  # no write by GET
    await dead_depth_is(amqp, job, 1)
    async with dashboard(app, read_only=True) as client:
        assert (await ok(await client.get("/api/config")))["read_only"] is True
        for action in ("purge", "replay"):
            refused = await post(client, f"/api/dead-letters/{job.name}/{action}", {"all": True})
            assert refused.status == 403
            assert await refused.json() == {"error": "read-only"}
        await dead_ids_are(client, job.name, ["dl-0"])
    await dead_depth_is(amqp, job, 1)


async def test_errors_are_json_bad_input_400_a_closed_channel_503_anything_else_500(
    make_app: AppFactory, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiormq.exceptions import ChannelAccessRefused, ChannelInvalidStateError

    from amqtask.dashboard._data import DashboardData

    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    raised: list[Exception] = []

    async def workers(_self: Any) -> Any:
        raise raised[-1]

    monkeypatch.setattr(DashboardData, "workers", workers)
    async with dashboard(app) as client:
        far_back = await client.get("/api/tasks?since=99999999999w")
        assert far_back.status == 400
        assert (await far_back.json())["error"].startswith("since:")
        for exc, status in (
            (ChannelAccessRefused("ACCESS_REFUSED - no access to queue"), 503),
            (ChannelInvalidStateError("No active transport in channel"), 503),
            (KeyError("bug"), 500),
        ):
            raised.append(exc)
            answer = await client.get("/api/workers")
            assert answer.status == status, await answer.text()
            assert answer.content_type == "application/json"
            assert "error" in await answer.json()
        assert (await client.get("/api/config")).status == 200  # still serving


async def test_with_auth_every_request_needs_the_password(
    make_app: AppFactory, unique: str
) -> None:
    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    async with dashboard(app, auth="admin:s3cret") as client:
        for path in ("/", "/api/config", "/static/app.js"):
            refused = await client.get(path)
            assert refused.status == 401
            assert refused.headers["WWW-Authenticate"].startswith("Basic")
        wrong = base64.b64encode(b"admin:guess").decode()
        assert (
            await client.get("/api/config", headers={"Authorization": f"Basic {wrong}"})
        ).status == 401
        right = base64.b64encode(b"admin:s3cret").decode()
        answer = await client.get("/api/config", headers={"Authorization": f"Basic {right}"})
        assert answer.status == 200
        assert "s3cret" not in await answer.text()


async def test_a_request_naming_another_host_is_refused(make_app: AppFactory, unique: str) -> None:
    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    async with dashboard(app) as client:
        port = client.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            assert (await client.get("/api/config", headers={"Host": host})).status == 200
        for host in (f"evil.example:{port}", "attacker.test", f"10.0.0.1:{port}"):
            refused = await client.get("/api/config", headers={"Host": host})
            assert refused.status == 421
            assert "error" in await refused.json()


def test_a_dashboard_on_another_host_than_loopback_needs_auth(
    make_app: AppFactory, unique: str
) -> None:
    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    with pytest.raises(ValueError, match="needs auth"):
        create_dashboard(app, host="0.0.0.0")
    create_dashboard(app, host="0.0.0.0", auth="a:b")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_broker_that_is_down_gives_503_and_the_server_keeps_serving(
    unique: str,
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = amqtask.App(
        f"amqp://guest:Hunter2Secret@127.0.0.1:{_closed_port()}/",
        [job],
        namespace=unique,
        connect_timeout=1.0,
    )
    async with dashboard(app) as client:
        texts = []
        for path in ("/api/overview", f"/api/dead-letters/{job.name}", "/api/schedules"):
            response = await client.get(path)
            texts.append(await response.text())
            assert response.status in (200, 503), path
            if path != "/api/schedules":  # no schedules: nothing to ask the broker
                assert response.status == 503
                assert (await response.json())["error"].startswith("broker unreachable")
        refused = await post(client, f"/api/dead-letters/{job.name}/replay", {"all": True})
        assert refused.status == 503
        texts.append(await refused.text())
        config = await client.get("/api/config")
        assert config.status == 200
        texts.append(await config.text())
        texts.append(await (await client.get("/api/rates")).text())
        assert all("Hunter2Secret" not in text for text in texts)
        again = await client.get("/api/overview")  # still serving, still telling why
        assert again.status == 503


# --- schedules, workers, tasks --------------------------------------------------------------------


async def test_schedules_are_listed_and_paused_and_resumed(
    make_app: AppFactory, unique: str
) -> None:
    tick = amqtask.contract(f"{unique}.tick", Job)
    app = make_app([tick], schedules=[amqtask.schedule("beat", tick, Job(n=1), every=60)])
    await app.declare()
    async with dashboard(app) as client:
        listed = await ok(await client.get("/api/schedules"))
        (row,) = listed["schedules"]
        assert (row["name"], row["task"], row["paused"]) == ("beat", tick.name, False)
        assert row["next_due"] is not None

        paused = await post(client, "/api/schedules/beat/pause", {})
        assert await ok(paused) == {"name": "beat", "paused": True}
        (row,) = (await ok(await client.get("/api/schedules")))["schedules"]
        assert row["paused"] is True

        resumed = await post(client, "/api/schedules/beat/resume", {})
        assert await ok(resumed) == {"name": "beat", "paused": False}
        (row,) = (await ok(await client.get("/api/schedules")))["schedules"]
        assert row["paused"] is False

        unknown = await post(client, "/api/schedules/nope/pause", {})
        assert unknown.status == 404


async def test_workers_list_a_running_worker_with_what_it_answers_to_inspect(
    make_app: AppFactory, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])

    @app.handler(job)
    async def handle(task: Job) -> None:
        pass

    await app.declare()
    viewer = make_app([job])
    async with dashboard(viewer) as client:
        empty = await ok(await client.get("/api/workers"))
        assert empty == {"workers": [], "available": False, "inspected": False}
        async with running(app, concurrency=3):
            data = await ok(await client.get("/api/workers"))
    (worker,) = data["workers"]
    assert worker["pid"] == os.getpid()
    assert worker["concurrency"] == 3
    assert worker["in_flight"] == 0
    assert job.queue in worker["queues"]
    assert data["inspected"] is True
    assert data["available"] is False  # no management API: the listing is the answers alone


async def test_tasks_of_the_store_are_searched_shown_with_a_timeline_and_revoked(
    make_app: AppFactory, unique: str, tmp_path: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    other = amqtask.contract(f"{unique}.other", Job)
    app = make_app([job, other], store=f"sqlite:///{tmp_path / 'tasks.db'}")
    await app.declare()
    async with app:
        first = await app.send(job, Job(n=1))
        second = await app.send(other, Job(n=2))
        delayed = await app.send(job, Job(n=3), delay=3600)
    async with dashboard(app) as client:
        assert (await ok(await client.get("/api/config")))["store"] is True
        listed = await ok(await client.get("/api/tasks"))
        assert listed["store"] is True
        assert {t["id"] for t in listed["tasks"]} == {first, second, delayed}
        by_name = await ok(await client.get(f"/api/tasks?task={other.name}"))
        assert [t["id"] for t in by_name["tasks"]] == [second]
        scheduled = await ok(await client.get("/api/tasks?state=scheduled&since=1h"))
        assert [t["id"] for t in scheduled["tasks"]] == [delayed]
        by_id = await ok(await client.get(f"/api/tasks?id={first}"))
        assert [t["id"] for t in by_id["tasks"]] == [first]
        assert (await ok(await client.get("/api/tasks?since=2999-01-01T00:00:00Z")))["tasks"] == []
        assert (await client.get("/api/tasks?since=soon")).status == 400

        shown = await ok(await client.get(f"/api/tasks/{delayed}"))
        assert shown["task"]["state"] == "scheduled"
        assert [e["event"] for e in shown["timeline"]] == ["scheduled"]
        assert (await client.get("/api/tasks/no-such-task")).status == 404

        revoked = await post(client, f"/api/tasks/{delayed}/revoke", {"terminate": False})
        assert await ok(revoked) == {"id": delayed, "revoked": True}

        async def is_revoked() -> bool:
            data = await ok(await client.get(f"/api/tasks/{delayed}"))
            return bool(data["task"]["revoke_requested"])

        await wait_for(is_revoked)


async def test_two_first_revokes_at_once_open_one_connection(
    make_app: AppFactory, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job], store=f"sqlite:///{tmp_path / 'tasks.db'}")
    await app.declare()
    async with app:
        ids = [await app.send(job, Job(n=n), delay=3600) for n in range(2)]
    connects: list[None] = []
    real_connect = app.connect

    async def counted_connect() -> None:
        connects.append(None)
        await real_connect()

    monkeypatch.setattr(app, "connect", counted_connect)
    async with dashboard(app) as client:
        answers = await asyncio.gather(
            *(post(client, f"/api/tasks/{task_id}/revoke", {"terminate": False}) for task_id in ids)
        )
        assert [(await ok(answer))["revoked"] for answer in answers] == [True, True]
    assert len(connects) == 1


async def test_a_sample_that_fails_unexpectedly_is_reported_and_sampling_goes_on(
    make_app: AppFactory, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from amqtask import _status

    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    await app.declare()
    real_report = _status.report
    broken = [True]

    def report(*args: Any, **kwargs: Any) -> Any:
        if broken[0]:
            raise KeyError("surprise")
        return real_report(*args, **kwargs)

    monkeypatch.setattr(_status, "report", report)
    async with dashboard(app) as client:
        failing = await client.get("/api/overview")
        assert failing.status == 503
        assert "surprise" in (await failing.json())["error"]
        broken[0] = False

        async def sampled_again() -> bool:
            answer = await client.get("/api/overview")
            return answer.status == 200 and (await answer.json())["error"] is None

        await wait_for(sampled_again, timeout=10)


async def test_without_a_store_tasks_are_an_empty_list(make_app: AppFactory, unique: str) -> None:
    app = make_app([amqtask.contract(f"{unique}.job", Job)])
    async with dashboard(app) as client:
        assert await ok(await client.get("/api/tasks")) == {"store": False, "tasks": []}
        assert (await client.get("/api/tasks/x")).status == 404


# --- the command ----------------------------------------------------------------------------------


def test_the_command_refuses_another_host_without_auth(
    tmp_path: Path, broker_url: str, unique: str
) -> None:
    target = write_app_module(
        tmp_path, broker_url, unique, job=f'amqtask.contract("{unique}.job", Job)'
    )
    result = subprocess.run(
        [sys.executable, "-m", "amqtask", "dashboard", target, "--host", "0.0.0.0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "AMQTASK_DASHBOARD_AUTH": ""},
        check=False,
    )
    assert result.returncode == 2
    assert "--auth" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error")]) == 1


async def test_the_command_serves_the_dashboard_until_sigterm(
    tmp_path: Path, broker_url: str, unique: str
) -> None:
    target = write_app_module(
        tmp_path, broker_url, unique, job=f'amqtask.contract("{unique}.job", Job)'
    )
    port = _closed_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqtask",
        "dashboard",
        target,
        "--port",
        str(port),
        "--read-only",
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        def config() -> Any:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/config", timeout=2) as r:
                    return r.read()
            except OSError:
                return None

        answer: list[bytes] = []

        async def answered() -> bool:
            body = await asyncio.to_thread(config)
            if body:
                answer.append(body)
            return bool(body)

        await wait_for(answered, timeout=30, interval=0.2)
        assert b'"read_only":true' in answer[0]
        assert f'"app":"{target}"'.encode() in answer[0]
    finally:
        process.terminate()
        code = await asyncio.wait_for(process.wait(), 20)
    assert code == 0


def test_a_port_in_use_is_a_usage_error_that_names_it_not_the_broker(
    tmp_path: Path, broker_url: str, unique: str
) -> None:
    target = write_app_module(
        tmp_path, broker_url, unique, job=f'amqtask.contract("{unique}.job", Job)'
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "amqtask", "dashboard", target, "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "broker" not in result.stderr
    assert "dashboard on http" not in result.stderr  # no URL of a server that is not there


async def test_with_port_0_the_command_says_the_port_taken_and_answers_on_it(
    tmp_path: Path, broker_url: str, unique: str
) -> None:
    target = write_app_module(
        tmp_path, broker_url, unique, job=f'amqtask.contract("{unique}.job", Job)'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqtask",
        "dashboard",
        target,
        "--port",
        "0",
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        assert line.startswith("amqtask dashboard on http://127.0.0.1:"), line
        url = line.split()[3]
        assert not url.endswith(":0/")

        def config() -> tuple[int, bytes]:
            with urllib.request.urlopen(f"{url}api/config", timeout=5) as response:
                return response.status, response.read()

        status, body = await asyncio.to_thread(config)
        assert status == 200
        assert f'"app":"{target}"'.encode() in body
    finally:
        process.terminate()
        code = await asyncio.wait_for(process.wait(), 20)
    assert code == 0


# --- with the management API, on a private node -----------------------------------------------


@pytest.fixture
def management_node() -> Iterator[PrivateNode]:
    """A private node with the management plugin, statistics every second."""
    node = PrivateNode(management=True, config=("collect_statistics_interval = 1000",))
    with node:
        yield node


async def test_with_the_management_api_the_overview_has_unacked_the_cluster_and_the_workers(
    management_node: PrivateNode, unique: str
) -> None:
    node = management_node
    assert node.management_url is not None
    job = amqtask.contract(f"{unique}.job", Job)
    app = amqtask.App(node.url, [job], namespace=unique)
    viewer = amqtask.App(node.url, [job], namespace=unique)
    release = asyncio.Event()
    started = asyncio.Event()

    @app.handler(job)
    async def handle(task: Job) -> None:
        started.set()
        await release.wait()

    await app.declare()
    try:
        async with running(app, concurrency=2):
            await app.send(job, Job(n=1))
            await app.send(job, Job(n=2))
            await app.send(job, Job(n=3))
            await asyncio.wait_for(started.wait(), 20)
            async with dashboard(viewer, management_url=node.management_url) as client:
                config = await ok(await client.get("/api/config"))
                assert config["management"] is True

                async def unacked() -> bool:
                    data = await ok(await client.get("/api/overview"))
                    (row,) = data["tasks"]
                    return data["source"] == "amqp+management" and row["unacked"] == 2

                await wait_for(unacked, timeout=40, interval=0.5)
                response = await client.get("/api/overview")
                overview = await response.json()
                (row,) = overview["tasks"]
                assert (row["ready"], row["consumers"]) == (1, 1)
                assert row["leader"] is not None
                cluster = overview["cluster"]
                assert cluster["available"] is True
                assert [n["running"] for n in cluster["nodes"]] == [True]
                assert cluster["nodes"][0]["leaders"] >= 1
                assert overview["no_quorum"] == []

                workers = await ok(await client.get("/api/workers"))
                texts = [await response.text(), str(workers)]
                texts.append(await (await client.get("/api/config")).text())
            release.set()
    finally:
        release.set()
        await app.close()
        await viewer.close()
    assert workers["available"] is True
    (worker,) = workers["workers"]
    assert worker["pid"] == os.getpid()
    assert worker["amqtask_worker"] is True
    assert worker["queues"] == sorted([job.queue, f"{job.queue}.due"])
    assert (worker["concurrency"], worker["in_flight"]) == (2, 2)  # the answer to inspect
    assert all(":guest@" not in text for text in texts)


async def test_after_the_broker_comes_back_the_overview_answers_again(unique: str) -> None:
    node = PrivateNode()
    with node:
        job = amqtask.contract(f"{unique}.job", Job)
        app = amqtask.App(node.url, [job], namespace=unique, connect_timeout=2.0)
        await app.declare()
        await app.close()
        async with dashboard(app) as client:
            await ok(await client.get("/api/overview"))
            await asyncio.to_thread(node.kill)

            async def down() -> bool:
                return (await client.get("/api/overview")).status == 503

            await wait_for(down, timeout=30, interval=0.2)
            assert (await client.get("/api/config")).status == 200  # still serving
            await asyncio.to_thread(node.start)

            async def up() -> bool:
                response = await client.get("/api/overview")
                return response.status == 200 and (await response.json())["error"] is None

            await wait_for(up, timeout=60, interval=0.5)
