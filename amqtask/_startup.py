"""Starting a worker process: wait for the broker (bounded, logged), back off between attempts.

A worker started while its broker is down or restarting (a deploy, a node failover, the whole
fleet rebooting together) should wait for it rather than exit at the first refused connect: its
supervisor (systemd, Kubernetes, `--processes`) would otherwise restart it in a tight loop, or
give up. Waiting is bounded (`--start-timeout`) and every attempt is logged, so a broker that
never comes back still ends in a clear error. What waiting cannot fix (wrong credentials, an
unknown vhost, a malformed URL, missing topology) fails at once.

`Backoff` is the one retry schedule: the broker wait here and the supervisor's restarts use it.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiormq.exceptions
import structlog

from amqtask._exceptions import AmqtaskError

log = structlog.get_logger("amqtask.worker")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter, capped.

    Retry n (1, 2, ...) waits a random time in [c/2, c] with c = min(cap, first * factor**(n-1)).
    The jitter keeps processes that failed together (a fleet whose broker restarted) from
    knocking on the recovering broker in step.
    """

    first: float
    cap: float
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError(f"need 0 < first <= cap, got first={self.first}, cap={self.cap}")
        if self.factor < 1:
            raise ValueError(f"factor must be at least 1, got {self.factor}")

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number `retry` (1 for the first retry)."""
        if retry < 1:
            raise ValueError(f"retries count from 1, got {retry}")
        exponent = min(retry - 1, 64)  # past that the cap holds anyway; no float overflow
        return min(self.cap, self.first * self.factor**exponent)

    def delay(self, retry: int, rand: float) -> float:
        """The wait before retry number `retry`, for `rand` drawn uniformly from [0, 1)."""
        ceiling = self.ceiling(retry)
        return ceiling / 2 + ceiling / 2 * rand


# Between connect attempts: a restarting RabbitMQ node is back in seconds, so look often.
BROKER_BACKOFF = Backoff(first=0.5, cap=5.0)

DEFAULT_START_TIMEOUT = 60.0  # seconds `amqtask worker` waits for its broker at start

# Every attempt gets at least this long, even at the deadline (or with a timeout of 0): a start
# on a busy broker takes a moment, and should not be cut off because waiting is over.
_ATTEMPT_AT_LEAST = 10.0

# The broker answered and said no: asking again will not change its mind.
_REFUSED_FOR_GOOD: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ProbableAuthenticationError,  # wrong user name or password
    aiormq.exceptions.AuthenticationError,  # no authentication mechanism in common
    aiormq.exceptions.ConnectionNotAllowed,  # 530: this user may not use this vhost
    aiormq.exceptions.IncompatibleProtocolError,  # not an AMQP 0-9-1 server
)

# Plain socket errors of a network that may come back (aiormq wraps most in AMQPConnectionError).
_NETWORK_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EAGAIN}
)


def broker_may_come_back(exc: BaseException) -> bool:
    """Whether waiting can fix `exc`, raised by a worker's first connect.

    True for a broker that is down, restarting or out of reach for now: connection refused or
    reset, a host name that does not resolve yet, no answer in time, a connection the broker
    closed while shutting down. False for everything else: wrong credentials, an unknown vhost
    (aiormq reports it as a protocol error), a malformed URL (`ValueError`), missing topology
    and every other amqtask error, a bug. An amqtask error raised `from` a connect error is
    judged by that error.
    """
    # One place to classify: once amqtask's own connect errors are typed (a ConnectError family
    # with authentication, vhost and timeout cases), this becomes a check of those types.
    if isinstance(exc, AmqtaskError):
        cause = exc.__cause__
        return cause is not None and broker_may_come_back(cause)
    if isinstance(exc, _REFUSED_FOR_GOOD):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):  # AMQPConnectionError is one too
        return True
    return isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS


def describe(exc: BaseException) -> str:
    """`exc` on one line: its type and message (the text of aiormq's `(errno, text)` pairs)."""
    args = exc.args
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        text = args[1]
    else:
        text = str(exc)
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def start_when_reachable(
    start: Callable[[], Awaitable[T]],
    *,
    url: str,
    timeout: float,
    stop: asyncio.Event,
    backoff: Backoff = BROKER_BACKOFF,
    rand: Callable[[], float] = random.random,
) -> T | None:
    """Run `start` until it succeeds, waiting for the broker for up to `timeout` seconds.

    Each attempt that fails in a way waiting can fix (`broker_may_come_back`) logs
    `broker_unavailable` with the attempt number, `url` (give it without its password), the error
    and the delay before the next attempt. An attempt that hangs is cut off at the deadline (but
    gets at least 10 s); `timeout=0` makes one attempt.
    Returns `start`'s result, or None as soon as `stop` is set (during an attempt or between
    them). Raises what `start` raised when waiting cannot fix it, and `AmqtaskError` when the
    broker was still unavailable after `timeout` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    stopping = asyncio.ensure_future(stop.wait())
    try:
        attempt = 0
        while True:
            attempt += 1
            outcome = await _attempt(start, stopping, deadline)
            if not isinstance(outcome, _Failed):
                return outcome  # even if `stop` was set meanwhile: the caller stops what started
            if stopping.done():
                return None
            error = outcome.error
            if not broker_may_come_back(error):
                raise error
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AmqtaskError(
                    f"the broker at {url} was still unavailable after {timeout:g} s "
                    f"({attempt} attempt{'s' if attempt > 1 else ''}; last: {describe(error)}); "
                    "start it or check the URL, or wait longer with --start-timeout"
                ) from error
            delay = min(backoff.delay(attempt, rand()), remaining)
            log.warning(
                "broker_unavailable",
                attempt=attempt,
                url=url,
                error=describe(error),
                retry_in=round(delay, 3),
            )
            await asyncio.wait({stopping}, timeout=delay)
            if stopping.done():
                return None
    finally:
        stopping.cancel()


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


async def _attempt(
    start: Callable[[], Awaitable[T]], stopping: asyncio.Future[Any], deadline: float
) -> T | _Failed:
    """One `start()`, cut off (cancelled) when `stopping` completes, or at `deadline` if that
    leaves it `_ATTEMPT_AT_LEAST` seconds."""

    async def run() -> T:
        return await start()

    task = asyncio.ensure_future(run())
    try:
        timeout = max(deadline - asyncio.get_running_loop().time(), _ATTEMPT_AT_LEAST)
        await asyncio.wait({task, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it clean up (close what it opened)
    if task.cancelled():
        return _Failed(TimeoutError("the start did not finish in time"))
    error = task.exception()
    if error is not None:
        return _Failed(error)
    return task.result()
