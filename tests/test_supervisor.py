"""`amqtask worker --processes`: what the supervisor runs, without a broker."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

from amqtask import _supervisor
from amqtask._cli import cli

APP = "examples.app:app"  # importable, and nothing connects until a worker starts


class Recorded:
    """Stands in for `Supervisor`: keeps what it was asked to run."""

    calls: ClassVar[list[tuple[list[str], int, float]]] = []

    def __init__(self, command: list[str], processes: int, shutdown_timeout: float) -> None:
        Recorded.calls.append((command, processes, shutdown_timeout))

    async def run(self) -> int:
        return 0


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], int, float]]:
    Recorded.calls = []
    monkeypatch.setattr(_supervisor, "Supervisor", Recorded)
    return Recorded.calls


def run_worker(*args: str) -> Any:
    return CliRunner().invoke(cli, ["worker", APP, *args], catch_exceptions=False)


def test_each_child_gets_every_worker_option_except_processes(recorded: list[Any]) -> None:
    result = run_worker(
        "--processes", "3", "-c", "7", "--prefetch", "9", "--console-logs", "--log-level", "error"
    )

    assert result.exit_code == 0, result.output
    [(command, processes, shutdown_timeout)] = recorded
    assert (processes, shutdown_timeout) == (3, 30.0)
    assert command[1:5] == ["-m", "amqtask", "worker", APP]
    options = command[5:]
    assert "--processes" not in options
    assert "--console-logs" in options
    for given in (["--concurrency", "7"], ["--prefetch", "9"], ["--log-level", "error"]):
        assert any(options[i : i + 2] == given for i in range(len(options))), options
    assert any(options[i : i + 2] == ["--shutdown-timeout", "30.0"] for i in range(len(options)))


def test_notify_ready_writes_one_byte_to_the_supervisors_pipe_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_fd, write_fd = os.pipe()
    monkeypatch.setenv(_supervisor.READY_FD, str(write_fd))

    _supervisor.notify_ready()
    _supervisor.notify_ready()  # the variable is gone: a second call does nothing

    assert os.read(read_fd, 16) == b"1"
    assert os.read(read_fd, 16) == b""  # our end was closed: end of file
    os.close(read_fd)


def test_notify_ready_without_a_supervisor_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_supervisor.READY_FD, raising=False)
    _supervisor.notify_ready()
