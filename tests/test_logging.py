"""Logging setup: in JSON mode every line is one JSON object, whoever logged it; console mode
stays text. Each case runs in a fresh interpreter, since logging is configured per process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

SCRIPT = """
import logging, sys, warnings
import structlog
from amqtask import _logging

_logging.configure(logging.INFO, json=sys.argv[1] == "json")
structlog.get_logger("amqtask.worker").info("task_succeeded", task="t", duration_ms=1.5)
structlog.get_logger("amqtask.worker").debug("below_the_level")
logging.info("handler info %d", 1)
logging.getLogger("shop.handlers").warning("handler warning", extra={"order": 7})
logging.getLogger("aiormq.connection").debug("a frame, below the level")
logging.getLogger("aio_pika.robust_connection").info("Connection closed. Reconnecting")
try:
    raise ValueError("inside a handler")
except ValueError:
    logging.getLogger("shop.handlers").exception("handler failed")
    structlog.get_logger("amqtask.worker").error("task_failed", exc_info=True)
warnings.warn("an old API", UserWarning)
raise RuntimeError("a bug nobody caught")
"""


def run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def events(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    lines = (result.stdout + result.stderr).splitlines()
    parsed = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all(isinstance(event, dict) for event in parsed)
    return parsed


def test_with_json_logs_every_line_is_a_json_object_whoever_logged_it() -> None:
    logged = {event["event"]: event for event in events(run("json"))}

    assert logged["task_succeeded"]["level"] == "info"
    assert logged["handler info 1"]["level"] == "info"  # a stdlib info is not dropped
    assert logged["handler warning"] == {
        **logged["handler warning"],
        "level": "warning",
        "logger": "shop.handlers",
        "order": 7,
    }
    assert logged["Connection closed. Reconnecting"]["logger"] == "aio_pika.robust_connection"
    assert "below_the_level" not in logged
    assert "a frame, below the level" not in logged


def test_tracebacks_are_a_field_of_their_event_not_lines_of_text() -> None:
    logged = {event["event"]: event for event in events(run("json"))}

    assert "ValueError: inside a handler" in logged["handler failed"]["exception"]
    assert "ValueError: inside a handler" in logged["task_failed"]["exception"]
    assert "RuntimeError: a bug nobody caught" in logged["uncaught_exception"]["exception"]
    assert any("UserWarning: an old API" in name for name in logged)


def test_console_logs_stay_readable_text() -> None:
    result = run("console")
    lines = result.stderr.splitlines()

    assert any("task_succeeded" in line and "task=t" in line for line in lines)
    assert any("handler warning" in line and "shop.handlers" in line for line in lines)
    assert not any(line.startswith("{") for line in lines)
    assert "Traceback (most recent call last):" in result.stderr
