"""`amqtask worker --reload`: run the worker in a child process and restart it when code changes.

For development only. The watching is watchfiles' (Rust's `notify` underneath; what uvicorn and
FastStream use too): `.py` files under the given directory, with its default ignores (`.git`,
`.venv`, `__pycache__`, `node_modules`, ...). A restart stops the child as SIGINT does (running
handlers get the shutdown timeout to finish), then starts it again with the same options.
SIGTERM or Ctrl-C stops the child the same way and ends the command.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

import structlog

log = structlog.get_logger("amqtask.worker")


class ReloadUnavailable(RuntimeError):
    """watchfiles is not installed."""


def run(command: Sequence[str], *, directory: str, shutdown_timeout: float) -> int:
    """Run `command`, restarting it whenever a `.py` file under `directory` changes, until
    SIGTERM or SIGINT; returns how many times it restarted. Raises `ReloadUnavailable`."""
    try:
        import watchfiles
    except ImportError:
        raise ReloadUnavailable(
            "--reload needs the watchfiles package: pip install 'amqtask[reload]'"
        ) from None

    def changed(changes: set[tuple[watchfiles.Change, str]]) -> None:
        files = sorted({os.path.relpath(path, directory) for _, path in changes})
        log.info("worker_reloading", changed=files[:20], count=len(files))

    log.info("worker_reloader_started", watching=directory, pid=os.getpid())
    return watchfiles.run_process(
        directory,
        target=shlex.join(command),
        target_type="command",
        callback=changed,
        watch_filter=watchfiles.PythonFilter(),
        sigint_timeout=int(shutdown_timeout) + 5,
        sigkill_timeout=5,
    )
