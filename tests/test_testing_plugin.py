"""The pytest plugin's fixtures in a project of their own, under each async test runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = textwrap.dedent(
    """
    import pytest
    from pydantic import BaseModel

    import amqtask

    class Job(BaseModel):
        n: int

    double = amqtask.contract("jobs.double", Job, returns=int)
    app = amqtask.App("amqp://memory.invalid/", [double])

    @app.handler(double)
    async def run(job: Job) -> int:
        return job.n * 2

    @pytest.fixture
    def amqtask_app():
        return app

    {marker}
    async def test_a_call_runs_in_memory_and_the_clock_jumps(amqtask_testapp, amqtask_clock):
        assert await app.call(double, Job(n=21)) == 42
        before = amqtask_clock.time()
        await amqtask_clock.advance(hours=1)
        assert amqtask_clock.time() - before >= 3600
        assert amqtask_testapp.attempts(amqtask_testapp.sent(double)[0].message_id) == 1

    {marker}
    async def test_the_next_test_gets_a_fresh_broker(amqtask_testapp):
        assert amqtask_testapp.sent(double) == []
    """
)


def run_pytest(tmp_path: Path, marker: str, ini: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_with_plugin.py").write_text(TESTS.format(marker=marker))
    (tmp_path / "pytest.ini").write_text(
        f"[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n{ini}\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_with_plugin.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )


@pytest.mark.parametrize(
    ("marker", "ini"),
    [
        pytest.param("", "asyncio_mode = auto", id="pytest-asyncio-auto"),
        pytest.param("@pytest.mark.asyncio", "asyncio_mode = strict", id="pytest-asyncio-strict"),
        pytest.param(
            "@pytest.mark.anyio",
            "asyncio_mode = strict\nanyio_mode = strict",
            id="anyio",
        ),
    ],
)
def test_the_fixtures_run_the_app_in_memory_under_each_runner(
    tmp_path: Path, marker: str, ini: str
) -> None:
    if marker == "@pytest.mark.anyio":
        marker = "@pytest.mark.parametrize('anyio_backend', ['asyncio'])\n@pytest.mark.anyio"
    result = run_pytest(tmp_path, marker, ini)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_without_an_amqtask_app_fixture_the_error_says_what_to_define(tmp_path: Path) -> None:
    (tmp_path / "test_missing.py").write_text("async def test_it(amqtask_testapp):\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_missing.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1
    assert "define an `amqtask_app` fixture" in result.stdout
