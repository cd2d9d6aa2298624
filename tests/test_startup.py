"""A worker's start: the backoff schedule, which errors waiting can fix, and the bounded wait."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Iterator
from typing import Any

import aiormq.exceptions
import pytest
import structlog

from amqtask import _startup
from amqtask._exceptions import AmqtaskError, TopologyMissing
from amqtask._startup import Backoff, broker_may_come_back, describe, start_when_reachable

REFUSED = aiormq.exceptions.AMQPConnectionError(111, "Connect call failed ('127.0.0.1', 5672)")

# --- the backoff schedule -------------------------------------------------------------------


def test_the_ceiling_doubles_from_the_first_delay_up_to_the_cap() -> None:
    backoff = Backoff(first=0.5, cap=30.0)

    assert [backoff.ceiling(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.ceiling(10_000) == 30.0  # no overflow, however long it keeps failing


def test_a_delay_is_drawn_between_half_the_ceiling_and_the_ceiling() -> None:
    backoff = Backoff(first=1.0, cap=8.0)

    assert backoff.delay(3, 0.0) == 2.0
    assert backoff.delay(3, 0.5) == 3.0
    assert backoff.delay(3, 0.999) == pytest.approx(4.0, abs=0.01)
    assert all(backoff.delay(50, r / 10) <= 8.0 for r in range(10))  # never past the cap


def test_a_factor_of_one_retries_at_a_steady_pace() -> None:
    assert {Backoff(first=2.0, cap=2.0, factor=1).ceiling(n) for n in range(1, 20)} == {2.0}


@pytest.mark.parametrize(
    ("first", "cap", "factor"), [(0, 1, 2), (-1, 1, 2), (2, 1, 2), (1, 2, 0.5)]
)
def test_a_backoff_that_makes_no_sense_is_refused(first: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError, match=r"first|factor"):
        Backoff(first=first, cap=cap, factor=factor)


def test_retries_count_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        Backoff(first=1, cap=2).delay(0, 0.5)


# --- what waiting can fix -------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        REFUSED,
        aiormq.exceptions.AMQPConnectionError(-2, "Name or service not known"),
        aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED - broker forced shutdown"),
        ConnectionResetError(104, "Connection reset by peer"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        OSError(errno.ENETUNREACH, "Network is unreachable"),
    ],
    ids=repr,
)
def test_a_broker_down_restarting_or_out_of_reach_is_waited_for(error: BaseException) -> None:
    assert broker_may_come_back(error)


@pytest.mark.parametrize(
    "error",
    [
        aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused"),
        aiormq.exceptions.AuthenticationError("no mechanism"),
        aiormq.exceptions.ConnectionNotAllowed(530, "NOT_ALLOWED - access to vhost refused"),
        aiormq.exceptions.IncompatibleProtocolError("not AMQP"),
        aiormq.exceptions.InvalidFrameError("Connection.Close instead of OpenOk"),  # unknown vhost
        ValueError("Invalid URL: port can't be converted to integer"),
        TopologyMissing(["queue 'x.job'"]),
        AmqtaskError("cannot serve metrics on port 9100"),
        ImportError("no module named x"),
        FileNotFoundError(errno.ENOENT, "no such file"),
        RuntimeError("a bug"),
    ],
    ids=repr,
)
def test_errors_waiting_cannot_fix_are_not_waited_for(error: BaseException) -> None:
    assert not broker_may_come_back(error)


def test_an_amqtask_error_wrapping_a_connect_error_is_judged_by_that_error() -> None:
    def wrapped(cause: BaseException) -> AmqtaskError:
        try:
            raise AmqtaskError("cannot connect") from cause
        except AmqtaskError as exc:
            return exc

    assert broker_may_come_back(wrapped(REFUSED))
    assert broker_may_come_back(wrapped(TimeoutError()))
    assert not broker_may_come_back(wrapped(aiormq.exceptions.ProbableAuthenticationError("no")))
    assert not broker_may_come_back(wrapped(OSError(errno.EADDRINUSE, "port in use")))


def test_an_error_is_described_on_one_line_with_aiormqs_text() -> None:
    assert describe(REFUSED) == "AMQPConnectionError: Connect call failed ('127.0.0.1', 5672)"
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("two\nlines")) == "ValueError: two lines"


# --- the bounded wait -----------------------------------------------------------------------

FAST = Backoff(first=0.01, cap=0.02)


def failing(*errors: BaseException, then: str = "started") -> Callable[[], asyncio.Future[str]]:
    """A `start` that raises each of `errors` in turn, then returns `then`; counts its calls."""
    remaining = list(errors)

    def start() -> asyncio.Future[str]:
        start.calls += 1  # type: ignore[attr-defined]
        future = asyncio.get_running_loop().create_future()
        if remaining:
            future.set_exception(remaining.pop(0))
        else:
            future.set_result(then)
        return future

    start.calls = 0  # type: ignore[attr-defined]
    return start


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """The log events written meanwhile, at every level, whatever a CLI test configured before."""
    config = structlog.get_config()
    structlog.reset_defaults()
    try:
        with structlog.testing.capture_logs() as captured:
            yield captured
    finally:
        structlog.configure(**config)


async def test_the_start_is_retried_while_the_broker_is_down_and_each_attempt_logged(
    logs: list[dict[str, Any]],
) -> None:
    start = failing(REFUSED, TimeoutError(), REFUSED)

    result = await start_when_reachable(
        start, url="amqp://u:***@h/", timeout=30, stop=asyncio.Event(), backoff=FAST
    )

    assert result == "started"
    waits = [log for log in logs if log["event"] == "broker_unavailable"]
    assert [w["attempt"] for w in waits] == [1, 2, 3]
    assert {w["url"] for w in waits} == {"amqp://u:***@h/"}
    assert waits[1]["error"] == "TimeoutError"
    assert all(0 < w["retry_in"] <= FAST.cap for w in waits)


async def test_an_error_waiting_cannot_fix_fails_at_once() -> None:
    start = failing(aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED"))

    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await start_when_reachable(start, url="u", timeout=30, stop=asyncio.Event(), backoff=FAST)
    assert start.calls == 1  # type: ignore[attr-defined]


async def test_a_broker_down_past_the_timeout_ends_in_one_line_naming_it() -> None:
    start = failing(*[REFUSED] * 10_000)

    with pytest.raises(AmqtaskError) as raised:
        await start_when_reachable(
            start, url="amqp://u:***@h/", timeout=0.3, stop=asyncio.Event(), backoff=FAST
        )

    message = str(raised.value)
    assert "\n" not in message
    assert "amqp://u:***@h/" in message
    assert "still unavailable after 0.3 s" in message
    assert "Connect call failed" in message
    assert "--start-timeout" in message


async def test_a_timeout_of_zero_makes_one_attempt() -> None:
    assert await start_when_reachable(failing(), url="u", timeout=0, stop=asyncio.Event()) == (
        "started"
    )
    with pytest.raises(AmqtaskError, match="1 attempt;"):
        await start_when_reachable(failing(REFUSED), url="u", timeout=0, stop=asyncio.Event())


async def test_a_stop_while_waiting_between_attempts_returns_none_at_once() -> None:
    stop = asyncio.Event()
    slow = Backoff(first=60, cap=60)
    waiting = asyncio.create_task(
        start_when_reachable(failing(REFUSED), url="u", timeout=600, stop=stop, backoff=slow)
    )
    await asyncio.sleep(0.05)  # the first attempt failed; it waits 30 to 60 s for the next
    assert not waiting.done()

    stop.set()

    assert await asyncio.wait_for(waiting, 5) is None


async def test_a_stop_during_a_hanging_attempt_cancels_it() -> None:
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang() -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    waiting = asyncio.create_task(start_when_reachable(hang, url="u", timeout=600, stop=stop))
    await asyncio.sleep(0.05)
    stop.set()

    assert await asyncio.wait_for(waiting, 5) is None
    assert cancelled.is_set()


async def test_an_attempt_that_hangs_is_cut_off_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_startup, "_ATTEMPT_AT_LEAST", 0.1)  # instead of 10 s

    async def hang() -> str:
        await asyncio.sleep(3600)
        return "never"

    with pytest.raises(AmqtaskError, match="did not finish in time"):
        await start_when_reachable(hang, url="u", timeout=0.2, stop=asyncio.Event())
