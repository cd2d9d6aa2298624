"""The store is an option, not a cost: without `store=`, nothing of it is imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def modules_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys\nprint('\\n'.join(sys.modules))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(done.stdout.split())


def test_an_app_and_a_worker_without_a_store_import_neither_the_store_nor_a_driver() -> None:
    loaded = modules_after(
        """
        from pydantic import BaseModel
        import amqtask

        class Job(BaseModel):
            n: int

        job = amqtask.contract("jobs.run", Job)
        app = amqtask.App("amqp://guest:guest@127.0.0.1:5672/", [job])

        @app.handler(job)
        async def run(task: Job) -> None: ...

        amqtask.Worker(app)
        """
    )

    assert {"amqtask.store", "asyncpg", "sqlite3"} & loaded == set()


def test_a_sqlite_store_does_not_import_the_postgresql_driver() -> None:
    loaded = modules_after(
        """
        import amqtask
        amqtask.App("amqp://guest:guest@127.0.0.1:5672/", [], store="sqlite:///:memory:")
        """
    )

    assert "amqtask.store._sqlite" in loaded
    assert "asyncpg" not in loaded
