"""Per-process completion timelines, so several consumer processes can be measured together.

Each consumer counts completions in 10 ms bins of wall-clock time and writes them to
`$BENCH_STATS_DIR/<pid>.json` when the process exits. The benchmark then takes the window in which
every process was busy and divides what all of them completed in it by its length: start-up skew
between processes and the ragged end of a drain do not count.
"""

from __future__ import annotations

import atexit
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import orjson

BIN = 0.01  # seconds


class Timeline:
    def __init__(self, directory: str | None) -> None:
        self.bins: Counter[int] = Counter()
        if directory:
            atexit.register(self._dump, Path(directory) / f"{os.getpid()}.json")

    @classmethod
    def from_env(cls) -> Timeline:
        return cls(os.environ.get("BENCH_STATS_DIR"))

    def tick(self) -> None:
        self.bins[int(time.time() / BIN)] += 1

    def _dump(self, path: Path) -> None:
        if self.bins:
            path.write_bytes(orjson.dumps({str(k): v for k, v in self.bins.items()}))


def load(directory: Path) -> list[Counter[int]]:
    return [
        Counter({int(k): v for k, v in orjson.loads(p.read_bytes()).items()})
        for p in sorted(directory.glob("*.json"))
    ]


def throughput(timelines: Iterable[Counter[int]]) -> tuple[float, int]:
    """(completions per second while every process was busy, total completions)."""
    timelines = [t for t in timelines if t]
    if not timelines:
        return 0.0, 0
    start = max(min(t) for t in timelines)
    end = min(max(t) for t in timelines)
    total = sum(sum(t.values()) for t in timelines)
    if end <= start:  # one process did (nearly) everything: fall back to the whole span
        start, end = min(min(t) for t in timelines), max(max(t) for t in timelines)
    # Whole bins from start to end inclusive.
    done = sum(v for t in timelines for k, v in t.items() if start <= k <= end)
    return done / ((end - start + 1) * BIN), total
