"""Connect failures as a user meets them: each command ends with one line on stderr (one JSON
event for a worker logging JSON) and exit 1, says what is wrong and what to do, never waits
unbounded and never prints the password."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import amqtask

SECRET = "not-the-password"


def broker_with(broker_url: str, *, password: str | None = None, vhost: str | None = None) -> str:
    url = broker_url
    if password is not None:
        assert "guest:guest@" in url, "these cases need the guest user in the broker URL"
        url = url.replace("guest:guest@", f"guest:{password}@")
    if vhost is not None:
        url = url.rstrip("/") + f"/{vhost}"
    return url


def write_app(tmp_path: Path, url: str, unique: str) -> str:
    (tmp_path / f"app_{unique}.py").write_text(
        textwrap.dedent(
            f"""
            from pydantic import BaseModel
            import amqtask

            class Job(BaseModel):
                n: int

            job = amqtask.contract("{unique}.job", Job)
            app = amqtask.App({url!r}, [job], namespace="{unique}", connect_timeout=1.0)

            @app.handler(job)
            async def handle(task: Job) -> None:
                pass
            """
        )
    )
    return f"app_{unique}:app"


async def amqtask_cli(tmp_path: Path, *args: str) -> tuple[int, str, str, float]:
    """`python -m amqtask ARGS` in `tmp_path`: exit code, stdout, stderr and seconds taken."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqtask",
        *args,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:  # it hung: fail, but leave nothing running
            process.kill()
            await process.wait()
    return process.returncode, stdout.decode(), stderr.decode(), time.monotonic() - started


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert SECRET not in stderr
    return lines[0]


@pytest.fixture
async def silent_url() -> AsyncIterator[str]:
    """A host that accepts TCP and never speaks AMQP."""
    accepted: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"amqp://guest:{SECRET}@127.0.0.1:{port}/"
    finally:
        server.close()
        for writer in accepted:
            writer.close()


async def test_wrong_credentials_are_reported_as_such_not_as_an_unreachable_broker(
    broker_url: str, unique: str, tmp_path: Path
) -> None:
    target = write_app(tmp_path, broker_with(broker_url, password=SECRET), unique)

    code, _, stderr, _ = await amqtask_cli(tmp_path, "send", target, f"{unique}.job", '{"n": 1}')

    assert code == 1
    line = one_error_line(stderr)
    assert "authentication failed for user 'guest'" in line
    assert "guest:***@" in line
    assert "cannot reach" not in line


async def test_an_unknown_vhost_is_named_with_what_to_do(
    broker_url: str, unique: str, tmp_path: Path
) -> None:
    target = write_app(tmp_path, broker_with(broker_url, vhost=f"{unique}-nowhere"), unique)

    code, _, stderr, _ = await amqtask_cli(tmp_path, "declare", target)

    assert code == 1
    line = one_error_line(stderr)
    assert f"refused virtual host '{unique}-nowhere' to user 'guest'" in line
    assert "rabbitmqctl add_vhost" in line


@pytest.mark.parametrize("command", ["send", "status", "declare", "dlq-list"])
async def test_every_command_gives_up_on_a_host_that_never_speaks_amqp(
    command: str, silent_url: str, unique: str, tmp_path: Path
) -> None:
    target = write_app(tmp_path, silent_url, unique)
    args = {
        "send": ["send", target, f"{unique}.job", '{"n": 1}'],
        "status": ["status", target],
        "declare": ["declare", target],
        "dlq-list": ["dlq", "list", target, f"{unique}.job"],
    }[command]

    code, _, stderr, seconds = await amqtask_cli(tmp_path, *args)

    assert code == 1
    line = one_error_line(stderr)
    assert "no AMQP handshake with the broker at amqp://guest:***@127.0.0.1:" in line
    assert "within 1 s" in line
    assert seconds < 30  # connect_timeout is 1 s; it waited forever before


async def test_a_malformed_url_is_one_line_without_its_password(
    unique: str, tmp_path: Path
) -> None:
    target = write_app(tmp_path, f"amqp://guest:{SECRET}@127.0.0.1:notaport/", unique)

    code, _, stderr, _ = await amqtask_cli(tmp_path, "send", target, f"{unique}.job", '{"n": 1}')

    assert code == 1
    assert "invalid broker URL 'amqp://guest:***@127.0.0.1:notaport/'" in one_error_line(stderr)


async def test_a_bad_management_url_is_not_printed_back_with_its_password(
    broker_url: str, unique: str, tmp_path: Path
) -> None:
    target = write_app(tmp_path, broker_url, unique)

    code, stdout, stderr, _ = await amqtask_cli(
        tmp_path, "status", target, "--management-url", f"htp://admin:{SECRET}@127.0.0.1:15672"
    )

    assert code == 2
    assert "htp://admin:***@127.0.0.1:15672" in stderr
    assert SECRET not in stdout + stderr


async def test_an_unreachable_management_api_warns_without_the_password(
    broker_url: str, unique: str, tmp_path: Path
) -> None:
    target = write_app(tmp_path, broker_url, unique)

    code, stdout, stderr, _ = await amqtask_cli(
        tmp_path, "status", target, "--management-url", f"http://admin:{SECRET}@127.0.0.1:1"
    )

    assert code == 0, stderr
    assert "cannot reach the management API at http://127.0.0.1:1" in stdout
    assert SECRET not in stdout + stderr


async def test_a_worker_logging_json_reports_a_failed_connect_as_one_json_event(
    broker_url: str, unique: str, tmp_path: Path
) -> None:
    target = write_app(tmp_path, broker_with(broker_url, password=SECRET), unique)

    code, stdout, stderr, _ = await amqtask_cli(tmp_path, "worker", target, "--json-logs")

    assert code == 1
    events = [json.loads(line) for line in (stdout + stderr).splitlines()]
    assert [event["event"] for event in events] == ["worker_failed"], stderr
    assert events[0]["error"].startswith("authentication failed for user 'guest'")
    assert SECRET not in stdout + stderr


async def test_app_connect_raises_the_typed_error(broker_url: str, unique: str) -> None:
    wrong_password = amqtask.App(broker_with(broker_url, password=SECRET), [])
    unknown_vhost = amqtask.App(broker_with(broker_url, vhost=f"{unique}-nowhere"), [])

    with pytest.raises(amqtask.AuthenticationFailed) as denied:
        await wrong_password.connect()
    with pytest.raises(amqtask.VhostRefused) as refused:
        await unknown_vhost.connect()

    assert denied.value.user == "guest"
    assert SECRET not in str(denied.value)
    assert refused.value.vhost == f"{unique}-nowhere"
