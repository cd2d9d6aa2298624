"""PostgreSQL for the task store's tests: the shared server, and private clusters to stop.

The shared server (127.0.0.1:5432, trust auth, database `test`) is used through a schema of the
test's own, dropped afterwards (`schema_url`). Tests that stop the store run a private cluster
instead (`PrivatePostgres`): `initdb` into a temporary directory and `pg_ctl` on a port of its
own, as the `postgres` user, from the PostgreSQL 15 installed here; never the shared server.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import asyncpg
import pytest

SHARED_DSN = os.environ.get("AMQTASK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
HOW_TO_GET_POSTGRES = (
    "no PostgreSQL for the task store's tests at {dsn}: start it (`pg_ctlcluster 15 main start`, "
    "which .ci/run does) or set AMQTASK_TEST_POSTGRES"
)
_BIN = Path(os.environ.get("AMQTASK_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
_USER = "postgres"


async def _shared_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(SHARED_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"{HOW_TO_GET_POSTGRES.format(dsn=SHARED_DSN)} ({exc})", pytrace=False)


@contextlib.asynccontextmanager
async def schema_url(**options: str) -> AsyncIterator[str]:
    """A store URL on the shared server with a schema of its own, dropped on exit."""
    schema = f"amqtask_t{uuid.uuid4().hex[:10]}"
    query = "&".join(f"{k}={v}" for k, v in {"schema": schema, **options}.items())
    connection = await _shared_connection()
    await connection.close()
    try:
        yield f"{SHARED_DSN}?{query}"
    finally:
        connection = await _shared_connection()
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on its own port and data directory, to stop and start."""

    def __init__(self) -> None:
        if not (_BIN / "pg_ctl").exists():
            pytest.fail(
                f"PostgreSQL's pg_ctl is not in {_BIN} (AMQTASK_POSTGRES_BIN)", pytrace=False
            )
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="amqtask-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.url = f"postgresql://{_USER}@127.0.0.1:{self.port}/postgres"
        user = pwd.getpwnam(_USER)
        os.chown(self.dir, user.pw_uid, user.pw_gid)

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        runner = (
            [] if os.geteuid() == pwd.getpwnam(_USER).pw_uid else ["runuser", "-u", _USER, "--"]
        )
        return subprocess.run(
            [*runner, *command],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
            cwd=self.dir,
        )

    def init(self) -> None:
        self._run(
            str(_BIN / "initdb"), "-D", str(self.data), "-U", _USER, "-A", "trust", "--no-sync"
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop it (`fast`: clients are disconnected, as in a restart for maintenance)."""
        self._run(str(_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def __enter__(self) -> PrivatePostgres:
        self.init()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(
                str(_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False
            )
        deadline = time.monotonic() + 10
        while self.answers() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)
