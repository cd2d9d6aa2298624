"""structlog setup for the CLI: key-value console output on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure(level: int = logging.INFO, *, json: bool | None = None) -> None:
    """Configure structlog once for a process; `json=None` picks JSON unless stderr is a tty."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if json
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=(
            structlog.BytesLoggerFactory(sys.stderr.buffer)
            if json
            else structlog.PrintLoggerFactory(sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )
