"""The dashboard's pure parts: the Host guard, basic auth, a task's timeline, `since`; and the
command without aiohttp."""

from __future__ import annotations

import base64
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from amqtask import _wallclock
from amqtask.dashboard._data import parse_since, timeline
from amqtask.dashboard._server import Settings, is_loopback


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def test_on_loopback_only_loopback_names_and_the_bound_port_are_accepted() -> None:
    settings = Settings(host="127.0.0.1", port=8077, auth=None, read_only=False)
    for host in ("127.0.0.1:8077", "localhost:8077", "[::1]:8077", "localhost"):
        assert settings.host_allowed(host), host
    for host in ("evil.example:8077", "127.0.0.1.nip.io:8077", "localhost:9999", "", None):
        assert not settings.host_allowed(host), host


def test_on_a_named_host_only_that_name_is_accepted_and_on_all_addresses_any() -> None:
    named = Settings(host="dash.internal", port=80, auth="a:b", read_only=False)
    assert named.host_allowed("dash.internal")
    assert named.host_allowed("DASH.internal:80")
    assert not named.host_allowed("localhost:80")
    everywhere = Settings(host="0.0.0.0", port=8077, auth="a:b", read_only=False)
    assert everywhere.host_allowed("10.1.2.3:8077")
    assert not everywhere.host_allowed("10.1.2.3:8078")


def test_basic_auth_needs_both_user_and_password() -> None:
    settings = Settings(host="127.0.0.1", port=None, auth="admin:pa:ss", read_only=False)
    assert settings.authorized(basic("admin:pa:ss"))
    for header in (basic("admin:pa"), basic("root:pa:ss"), "Basic !!!", "Bearer x", None):
        assert not settings.authorized(header), header
    assert Settings(host="127.0.0.1", port=None, auth=None, read_only=False).authorized(None)
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        Settings(host="127.0.0.1", port=None, auth="nopassword", read_only=False)


def _task(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "state": "queued",
        "queued_at": None,
        "due_at": None,
        "started_at": None,
        "finished_at": None,
        "updated_at": None,
    }
    return {**base, **fields}


def test_a_timeline_tells_sent_started_and_the_end_in_order() -> None:
    done = _task(
        state="succeeded",
        queued_at="2030-01-01T00:00:00+00:00",
        started_at="2030-01-01T00:00:01+00:00",
        finished_at="2030-01-01T00:00:02+00:00",
    )
    assert timeline(done) == [
        {"event": "queued", "at": "2030-01-01T00:00:00+00:00"},
        {"event": "started", "at": "2030-01-01T00:00:01+00:00"},
        {"event": "succeeded", "at": "2030-01-01T00:00:02+00:00"},
    ]
    delayed = _task(
        state="scheduled", queued_at="2030-01-01T00:00:00+00:00", due_at="2030-01-01T01:00:00"
    )
    assert timeline(delayed) == [{"event": "scheduled", "at": "2030-01-01T00:00:00+00:00"}]
    revoked = _task(state="revoked", updated_at="2030-01-01T00:00:05+00:00")
    assert timeline(revoked) == [{"event": "revoked", "at": "2030-01-01T00:00:05+00:00"}]


def test_since_is_an_iso_time_or_a_duration_back_from_now() -> None:
    assert parse_since("2030-01-01T00:00:00Z") == datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_since("2030-01-01T00:00:00") == datetime(2030, 1, 1, tzinfo=UTC)
    back = _wallclock.utc_now() - parse_since("1h")
    assert timedelta(minutes=59) < back < timedelta(minutes=61)
    with pytest.raises(ValueError, match="expected a duration"):
        parse_since("soon")


def test_without_aiohttp_the_command_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from amqtask._cli import main\n"
        "main(['dashboard', 'examples.app:app'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the dashboard needs aiohttp: pip install 'amqtask[dashboard]'"
    ]


def test_only_loopback_addresses_and_localhost_count_as_loopback() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("127.evil.example", "127.0.0.1.nip.io", "localhost.evil.example", "10.0.0.1"):
        assert not is_loopback(host), host
