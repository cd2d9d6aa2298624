"""Wall-clock time, read in one place so that `amqtask.testing` can move it with its clock.

A call's deadline (`amqtask-deadline`), an `eta=` and the failure times on a dead letter are
wall-clock times shared with other processes, so amqtask reads them here. Durations and timeouts
use the event loop's clock (`loop.time()`), which `amqtask.testing` moves as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

_source: Callable[[], float] = time.time


def now() -> float:
    """Seconds since the epoch."""
    return _source()


def utc_now() -> datetime:
    """Now as an aware datetime in UTC."""
    return datetime.fromtimestamp(_source(), UTC)


def set_source(source: Callable[[], float]) -> Callable[[], float]:
    """Read the time from `source` from now on; returns the source it replaces."""
    global _source
    previous, _source = _source, source
    return previous
