"""Connecting: bounded by the connect timeout, and every failure a typed, one-line error that
names the URL without its password. Local sockets only: no broker needed."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiormq.exceptions
import pytest

import amqtask
from amqtask._transport import AioPikaTransport, connect_error, open_connection

SECRET = "s3cret"


class _Silent(asyncio.Protocol):
    """Accepts a TCP connection and never says a word, like a host that is not RabbitMQ (or a
    firewall that swallows everything)."""

    def __init__(self, accepted: list[asyncio.BaseTransport]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted.append(transport)


@pytest.fixture
async def silent_url() -> AsyncIterator[str]:
    accepted: list[asyncio.BaseTransport] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Silent(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"amqp://guest:{SECRET}@127.0.0.1:{port}/"
    finally:
        server.close()
        for transport in accepted:
            transport.close()


@pytest.fixture
def refused_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"amqp://guest:{SECRET}@127.0.0.1:{port}/"


async def _nothing_left_running() -> bool:
    await asyncio.sleep(0.1)  # a leaked reconnect loop would be scheduled by now
    return asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_host_that_never_speaks_amqp_fails_the_app_after_the_connect_timeout(
    silent_url: str,
) -> None:
    app = amqtask.App(silent_url, [], connect_timeout=0.5)
    started = time.monotonic()

    with pytest.raises(amqtask.ConnectTimeout) as raised:
        await app.connect()

    assert time.monotonic() - started < 10  # generous: it hung forever before
    assert "no AMQP handshake" in str(raised.value)
    assert "within 0.5 s" in str(raised.value)
    assert SECRET not in str(raised.value)
    assert raised.value.url == silent_url.replace(SECRET, "***")
    assert await _nothing_left_running()


async def test_the_robust_connection_is_bounded_too_and_leaves_no_reconnect_loop_behind(
    silent_url: str,
) -> None:
    transport = AioPikaTransport(silent_url, connect_timeout=0.5)

    with pytest.raises(amqtask.ConnectTimeout):
        await transport.connect()

    assert not transport.connected
    assert await _nothing_left_running()


async def test_a_refused_connection_says_the_broker_cannot_be_reached(refused_url: str) -> None:
    with pytest.raises(amqtask.BrokerUnreachable) as raised:
        await open_connection(refused_url, name="test", timeout=5)

    assert "cannot reach the broker at amqp://guest:***@127.0.0.1:" in str(raised.value)
    assert "Connection refused" in str(raised.value)
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    "url", [f"http://guest:{SECRET}@127.0.0.1:5672/", f"amqp://guest:{SECRET}@127.0.0.1:abc/"]
)
async def test_a_malformed_url_is_refused_before_connecting(url: str) -> None:
    transport = AioPikaTransport(url, connect_timeout=5)

    with pytest.raises(amqtask.InvalidURL) as raised:
        await transport.connect()

    assert str(raised.value).startswith("invalid broker URL")
    assert SECRET not in str(raised.value)
    assert await _nothing_left_running()


def test_wrong_credentials_are_called_an_authentication_failure() -> None:
    refused = aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused")

    error = connect_error(refused, f"amqp://ada:{SECRET}@host/", 10)

    assert isinstance(error, amqtask.AuthenticationFailed)
    assert str(error).startswith("authentication failed for user 'ada' at amqp://ada:***@host/")
    assert "cannot reach" not in str(error)


def test_a_refused_vhost_names_the_vhost_and_the_user() -> None:
    # What aiormq raises when the broker answers connection.open with connection.close (530).
    refused = aiormq.exceptions.InvalidFrameError(
        "Expected one of ['Connection.OpenOk'], got <Connection.Close object at 0x7f>"
    )

    error = connect_error(refused, f"amqp://ada:{SECRET}@host/shop", 10)

    assert isinstance(error, amqtask.VhostRefused)
    assert (error.user, error.vhost) == ("ada", "shop")
    assert "refused virtual host 'shop' to user 'ada'" in str(error)


def test_a_library_message_quoting_the_url_loses_the_password() -> None:
    quoted = ValueError(f"cannot parse amqp://ada:{SECRET}@host:x/")

    error = connect_error(quoted, f"amqp://ada:{SECRET}@host:x/", 10)

    assert isinstance(error, amqtask.InvalidURL)
    assert SECRET not in str(error)


def test_what_is_not_a_connect_failure_is_left_alone() -> None:
    assert connect_error(asyncio.CancelledError(), "amqp://h/", 10) is None
    assert connect_error(KeyError("x"), "amqp://h/", 10) is None


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_the_connect_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="connect_timeout"):
        amqtask.App("amqp://h/", [], connect_timeout=timeout)
