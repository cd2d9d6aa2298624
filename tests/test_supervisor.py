"""`amqtask worker --processes`: what the supervisor runs, without a broker."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
from click.testing import CliRunner

from amqtask import _supervisor
from amqtask._cli import cli
from amqtask._startup import Backoff

APP = "examples.app:app"  # importable, and nothing connects until a worker starts


class Recorded:
    """Stands in for `Supervisor`: keeps what it was asked to run."""

    calls: ClassVar[list[tuple[list[str], int, float]]] = []
    failure = None

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
    assert any(options[i : i + 2] == ["--start-timeout", "60.0"] for i in range(len(options)))


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


# --- restarts, with stand-in children -----------------------------------------------------------

# A stand-in for a worker process. Each start appends "<slot> <action>" to DIR/runs and acts out
# the next action of its slot's plan (the environment's PLAN_<slot>, comma-separated; the last
# one repeats): "ready" reports ready and runs until SIGTERM, "die" reports ready and exits 1 a
# moment later, "fail" exits 2 without reporting ready (a start that failed).
CHILD = """
import os, sys, time
from pathlib import Path
from amqtask import _supervisor
slot = _supervisor.slot()
runs = Path(sys.argv[1]) / "runs"
plan = os.environ[f"PLAN_{slot}"].split(",")
done = [line for line in (runs.read_text().splitlines() if runs.exists() else []) if
        line.split()[0] == str(slot)]
action = plan[min(len(done), len(plan) - 1)]
with runs.open("a") as f:
    f.write(f"{slot} {action}\\n")
if action == "fail":
    sys.exit(2)
_supervisor.notify_ready()
if action == "die":
    time.sleep(0.1)
    sys.exit(1)
time.sleep(3600)
"""


class Fleet:
    """A `Supervisor` of stand-in children, run as a task, and the log events it wrote."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *plans: str) -> None:
        for slot, plan in enumerate(plans):
            monkeypatch.setenv(f"PLAN_{slot}", plan)
        self.runs_file = tmp_path / "runs"
        command = [sys.executable, "-c", CHILD, str(tmp_path)]
        self.supervisor = _supervisor.Supervisor(
            command, len(plans), shutdown_timeout=5, backoff=Backoff(first=0.05, cap=0.4)
        )
        self.logs: list[dict[str, Any]] = []

    async def __aenter__(self) -> Fleet:
        # Log at every level, whatever a CLI test configured before (`--log-level error`).
        self._config = structlog.get_config()
        structlog.reset_defaults()
        self._capture = structlog.testing.capture_logs()
        self.logs = self._capture.__enter__()
        self.task = asyncio.create_task(self.supervisor.run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.supervisor.stop()
        await asyncio.wait_for(self.task, 30)
        self._capture.__exit__(None, None, None)
        structlog.configure(**self._config)

    def runs(self, slot: int) -> list[str]:
        lines = self.runs_file.read_text().splitlines() if self.runs_file.exists() else []
        return [line.split()[1] for line in lines if line.split()[0] == str(slot)]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [log for log in self.logs if log["event"] == name]

    async def until(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if predicate():
                return
            assert asyncio.get_running_loop().time() < deadline, f"not within {timeout} s"
            await asyncio.sleep(0.02)


async def test_a_child_that_fails_its_first_start_stops_the_supervisor_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Fleet(tmp_path, monkeypatch, "fail", "ready") as fleet:
        code = await asyncio.wait_for(fleet.task, 30)

    assert code == 1
    assert fleet.supervisor.failure is not None
    assert "worker process 0 failed on its first start" in fleet.supervisor.failure
    [failed] = fleet.events("worker_process_failed_to_start")
    assert failed["first_start"] is True
    assert fleet.runs(0) == ["fail"]  # not retried: the same command would fail again


async def test_a_replacement_that_fails_to_start_is_retried_with_backoff_and_the_rest_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = "die,fail,fail,fail,fail,ready"
    async with Fleet(tmp_path, monkeypatch, plan, "ready") as fleet:
        await fleet.until(lambda: len(fleet.events("worker_process_started")) == 3)

        assert not fleet.task.done()
        assert fleet.runs(0) == plan.split(",")
        assert fleet.runs(1) == ["ready"]  # never stopped nor restarted
        [died] = fleet.events("worker_process_died")
        failed = fleet.events("worker_process_failed_to_start")
        # Consecutive failures: the quick death counted as the first (unless the machine was so
        # slow that the child had lived past the cap: then the count starts anew).
        attempts = [f["attempt"] for f in failed]
        assert attempts in ([2, 3, 4, 5], [1, 2, 3, 4]), attempts
        for event in [died, *failed]:
            retry = event.get("attempt", 1)
            ceiling = fleet.supervisor.backoff.ceiling(retry)
            assert ceiling / 2 <= event["retry_in"] <= ceiling, event
    assert fleet.task.result() == 0


async def test_a_stop_while_a_restart_waits_out_its_backoff_is_prompt_and_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Fleet(tmp_path, monkeypatch, "die,ready", "ready") as fleet:
        fleet.supervisor.backoff = Backoff(first=60, cap=60)  # the restart waits 30 to 60 s
        await fleet.until(lambda: bool(fleet.events("worker_process_died")))
        assert fleet.events("worker_process_died")[0]["retry_in"] >= 30

        fleet.supervisor.stop()
        code = await asyncio.wait_for(fleet.task, 10)

    assert code == 0  # the dead child's exit code 1 is not held against the stop
    assert fleet.runs(0) == ["die"]
