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


FILE_SCRIPT = """
import logging, sys
import aio_pika  # its loggers exist before the configuration, as in the worker
import structlog
from amqtask import _logging

_logging.configure_file(sys.argv[1])
structlog.get_logger("amqtask.worker").info("task_succeeded", task="t", duration_ms=1.5, name="n")
structlog.get_logger("amqtask.worker").debug("below_the_level")
logging.getLogger("aio_pika.robust_connection").warning("Connection closed. Reconnecting")
"""


def run_with_config(tmp_path: Any, name: str, text: str) -> tuple[str, str]:
    config = tmp_path / name
    config.write_text(textwrap.dedent(text).replace("LOG", str(tmp_path / "out.log")))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FILE_SCRIPT), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out.log"
    return (out.read_text() if out.exists() else ""), done.stderr


def test_a_json_log_config_routes_amqtasks_events_through_its_handlers(tmp_path: Any) -> None:
    written, stderr = run_with_config(
        tmp_path,
        "logging.json",
        """
        {
          "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s|%(task)s"}},
          "handlers": {"file": {"class": "logging.FileHandler", "filename": "LOG",
                                "formatter": "plain"}},
          "loggers": {"amqtask": {"level": "INFO", "handlers": ["file"]}}
        }
        """,
    )

    assert written.splitlines() == [
        "INFO amqtask.worker task_succeeded task='t' duration_ms=1.5 name='n'|t"
    ]
    # aio-pika's logger is not disabled: with no handler of the file's, Python's last resort
    # prints its warning.
    assert stderr == "Connection closed. Reconnecting\n"


def test_an_ini_log_config_works_and_keeps_the_libraries_loggers(tmp_path: Any) -> None:
    written, _ = run_with_config(
        tmp_path,
        "logging.ini",
        """
        [loggers]
        keys = root

        [handlers]
        keys = file

        [formatters]
        keys = plain

        [logger_root]
        level = INFO
        handlers = file

        [handler_file]
        class = FileHandler
        args = ("LOG",)
        formatter = plain

        [formatter_plain]
        format = %(name)s: %(message)s
        """,
    )

    assert written.splitlines() == [
        "amqtask.worker: task_succeeded task='t' duration_ms=1.5 name='n'",
        "aio_pika.robust_connection: Connection closed. Reconnecting",  # not disabled
    ]
