"""What every peer script shares, on the standard library alone: the command line, the payload,
the 5 ms CPU burn and the completion timeline the benchmark reads (`bench._timeline`'s format).

    python -m bench.peers.NAME produce QUEUE --count N --in-flight C [--warmup W] [--workload W]
    python -m bench.peers.NAME work QUEUE --prefetch P [--children N] [--workload noop|cpu]
    python -m bench.peers.NAME respond QUEUE --prefetch P      (peers with request/response)
    python -m bench.peers.NAME call QUEUE --count N --in-flight C [--warmup W]

`produce` and `call` print one JSON line: {"rate": per second} and, for `call` with
`--in-flight 1`, {"p50": ms, "p99": ms}. `work` and `respond` run until SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

URL = os.environ.get("AMQTASK_URL", "amqp://guest:guest@127.0.0.1:5672/")
CPU_SECONDS = 0.005  # bench.app.CPU_SECONDS
BIN = 0.01  # bench._timeline.BIN
FLUSH_EVERY = 0.1  # seconds


def payload(n: int) -> dict[str, Any]:
    return {"n": n, "user": "ada", "text": "hello from the benchmark"}


def burn_cpu() -> None:
    """5 ms of this thread's CPU time in pure Python, as `bench.app._burn_cpu`."""
    end = time.thread_time() + CPU_SECONDS
    while time.thread_time() < end:
        pass


class Timeline:
    """Completions in 10 ms bins, written to `$BENCH_STATS_DIR/<pid>.json` (per process: a forked
    child writes its own) by a thread of the process every `FLUSH_EVERY` seconds and at exit, so
    a pool child that leaves without running atexit still leaves its timeline."""

    def __init__(self) -> None:
        self.directory = os.environ.get("BENCH_STATS_DIR")
        self.bins: Counter[int] = Counter()
        self.pid = 0  # the process whose bins these are; its flusher runs once it ticked
        self.dirty = False
        self.lock = threading.Lock()
        atexit.register(self.flush)

    def tick(self) -> None:
        with self.lock:
            if os.getpid() != self.pid:  # the first tick here, or a forked child's
                self.bins, self.pid = Counter(), os.getpid()
                threading.Thread(target=self._flusher, daemon=True).start()
            self.bins[int(time.time() / BIN)] += 1
            self.dirty = True

    def _flusher(self) -> None:
        while True:
            time.sleep(FLUSH_EVERY)
            self.flush()

    def flush(self) -> None:
        with self.lock:
            if self.directory and self.dirty and os.getpid() == self.pid:
                path = Path(self.directory) / f"{self.pid}.json"
                path.write_text(json.dumps({str(k): v for k, v in self.bins.items()}))
                self.dirty = False


timeline = Timeline()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["produce", "work", "respond", "call"])
    parser.add_argument("queue")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--prefetch", type=int, default=50)
    parser.add_argument("--children", type=int, default=0, help="0: one process, no pool")
    parser.add_argument("--workload", choices=["noop", "cpu"], default="noop")
    return parser.parse_args(argv)


def report(**figures: float) -> None:
    print(json.dumps(figures), flush=True)


def until_signalled() -> threading.Event:
    """An event set on SIGTERM or SIGINT (for peers whose worker runs in other threads)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def threaded_sends(count: int, in_flight: int, send: Callable[[int], Any]) -> float:
    """Per second of `count` blocking sends from `in_flight` threads (sync clients' way to have
    that many in flight)."""
    numbers = iter(range(count))
    lock = threading.Lock()

    def lane() -> None:
        while True:
            with lock:
                n = next(numbers, None)
            if n is None:
                return
            send(n)

    threads = [threading.Thread(target=lane) for _ in range(min(in_flight, count))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count / (time.perf_counter() - started)


async def async_sends(count: int, in_flight: int, send: Callable[[int], Any]) -> float:
    """Per second of `count` awaited sends, `in_flight` at a time (lanes, as `bench._scenarios`)."""
    import asyncio

    numbers = iter(range(count))

    async def lane() -> None:
        for n in numbers:
            await send(n)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(in_flight, count))))
    return count / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
