"""The README's first command: the example services run against the broker and account for all."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from examples.app import app

from .conftest import ROOT, delete_topology


def test_the_example_services_process_every_task_and_dead_letter_the_failure(
    broker_url: str,
) -> None:
    env = {**os.environ, "AMQTASK_URL": broker_url}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "examples.demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    finally:
        asyncio.run(delete_topology(broker_url, app.topology))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("task_succeeded") == 7
    assert "call images.resize -> Resized(path='cover-32.png', size=1024)" in result.stdout
    assert "task_failed     users.notify" in result.stdout
    assert "reason=handler_error error='LookupError: no such user: nobody'" in result.stdout
    assert "refused locally, nothing published: ValidationError" in result.stdout
    assert "all tasks accounted for" in result.stdout
