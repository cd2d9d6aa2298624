"""`amqtask worker` at start: it waits for a broker that is down (bounded by --start-timeout,
logged per attempt) and fails at once on what waiting cannot fix. Broker outages happen on a
private node."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from pydantic import BaseModel

import amqtask

from .conftest import app_env, records, start_worker, wait_for
from .private_node import QUORUM_REGISTRATION_SETTLE, PrivateNode
from .test_supervisor import Supervised

SLOW_APP = "tests.integration.apps.slow_app:app"
REFUSED_URL = "amqp://guest:s3cret@127.0.0.1:1/"  # nothing listens on port 1: a broker that is down


class Job(BaseModel):  # the same shape as tests/integration/apps/slow_app.py's
    n: int


async def worker(env: dict[str, str], *args: str) -> Supervised:
    """A single-process worker on slow_app, its JSON log events read as they come."""
    return Supervised(await start_worker(SLOW_APP, *args, env=env, stderr=asyncio.subprocess.PIPE))


@pytest.mark.timeout(240)
async def test_a_worker_started_while_its_broker_is_down_waits_and_consumes_once_it_is_up(
    unique: str, tmp_path: Path
) -> None:
    node = PrivateNode()
    started = None
    try:
        await asyncio.to_thread(node.start)
        record = tmp_path / "record.txt"
        job = amqtask.contract(f"{unique}.job", Job)
        producer = amqtask.App(node.url, [job], namespace=unique)
        await producer.declare()
        await asyncio.sleep(QUORUM_REGISTRATION_SETTLE)  # before a kill -9 of the node
        await asyncio.to_thread(node.kill)

        started = await worker(
            app_env(node.url, unique, record, TEST_SLEEP="0.01"), "--start-timeout", "120"
        )
        await wait_for(lambda: started.count("broker_unavailable") >= 3, timeout=30)
        assert started.process.returncode is None, started
        assert started.count("worker_started") == 0

        await asyncio.to_thread(node.start)
        await wait_for(lambda: started.count("worker_started") == 1, timeout=60)
        async with producer:
            await asyncio.gather(*(producer.send(job, {"n": n}) for n in range(10)))
        await wait_for(lambda: set(records(record)[1]) == set(range(10)), timeout=30)

        waits = [e for e in started.events if e["event"] == "broker_unavailable"]
        print(f"\nattempts before the broker was back: {len(waits)}")
        assert [e["attempt"] for e in waits] == list(range(1, len(waits) + 1))
        for wait in waits:
            assert wait["level"] == "warning"
            assert wait["url"] == node.url.replace("guest:guest", "guest:***")
            assert wait["error"]
            assert 0 < wait["retry_in"] <= 5
        assert await started.stop() == 0, started
    finally:
        if started is not None and started.process.returncode is None:
            await started.stop()
        await asyncio.to_thread(node.cleanup)


async def test_a_broker_down_past_the_start_timeout_ends_the_worker_with_one_line(
    unique: str, tmp_path: Path
) -> None:
    started = await worker(
        app_env(REFUSED_URL, unique, tmp_path / "record.txt"), "--start-timeout", "2"
    )

    assert await started.wait() == 1, started
    assert started.count("broker_unavailable") >= 2, started
    # With --json-logs the error is a JSON event too, like every line the worker writes.
    [failed] = [event for event in started.events if event["event"] == "worker_failed"]
    assert started.events[-1] == failed  # the last word
    assert "still unavailable after 2 s" in failed["error"]
    assert "127.0.0.1:1" in failed["error"]
    assert started.other == [], started  # no plain text, no traceback
    assert "s3cret" not in str(started)  # the password is never printed


async def test_wrong_credentials_fail_at_once_without_waiting(
    broker_url: str, unique: str, tmp_path: Path
) -> None:
    wrong = broker_url.replace("guest:guest@", "guest:not-the-password@")
    assert wrong != broker_url, "this test needs the guest user in the broker URL"

    started = await worker(
        app_env(wrong, unique, tmp_path / "record.txt"), "--start-timeout", "600"
    )

    assert await started.wait() == 1, started  # well within the 600 s it would have waited
    assert started.count("broker_unavailable") == 0, started
    assert "not-the-password" not in str(started)


async def test_a_worker_waiting_for_its_broker_stops_at_once_on_sigterm(
    unique: str, tmp_path: Path
) -> None:
    started = await worker(
        app_env(REFUSED_URL, unique, tmp_path / "record.txt"), "--start-timeout", "600"
    )
    await wait_for(lambda: started.count("broker_unavailable") >= 2, timeout=30)

    started.process.send_signal(signal.SIGTERM)

    assert await started.wait() == 0, started  # nothing was consumed: a clean stop
