"""`amqtask worker APP --processes N`: N worker processes under one supervisor.

Each child is a fresh `python -m amqtask worker APP ...` (the same options, without
`--processes`): nothing is forked from a process that already holds a connection or threads, and a
child is exactly the single-process worker, tested on its own. A child tells the supervisor it
consumes by writing a byte to a pipe (`notify_ready`); one that exits before that has failed to
start. Each child waits for the broker itself (`--start-timeout`), so a broker that is down or
restarting does not fail a start at once.

Only the first start of each of the N processes may be fatal: a child that exits before it is
ready then (bad configuration, missing topology, an import error, a broker that stayed away for
the whole start timeout) makes the supervisor stop the others and exit 1, since the same command
would fail again. After that, nothing stops the fleet: a child that dies (killed, out of memory,
crashed) is logged and replaced, and a replacement that exits before it is ready (the broker is
still down, the child was killed at once) is started again after an exponential backoff with
jitter, capped at `RESTART_BACKOFF.cap` seconds, forever, each failure logged with the delay
before the next try. The other children keep consuming meanwhile; the broker has already
requeued the dead child's unacked deliveries.

SIGTERM or SIGINT to the supervisor forwards SIGTERM to every child and waits for their graceful
shutdown (each finishes its running handlers within `--shutdown-timeout`); a child still alive
well after that is killed, and a restart waiting out its backoff is dropped. Exit code 0 when
every child stopped cleanly.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Callable, Sequence
from contextlib import suppress

import structlog

from amqtask._startup import Backoff

log = structlog.get_logger("amqtask.supervisor")

READY_FD = "AMQTASK_READY_FD"  # the write end of the readiness pipe, in a child's environment
SLOT = "AMQTASK_WORKER_SLOT"  # a child's number, 0 to N-1: it serves metrics on port + slot


def slot() -> int:
    """This process's number under a supervisor (0 when it runs on its own)."""
    return int(os.environ.get(SLOT, "0"))


_KILL_GRACE = 10.0  # seconds past the children's own shutdown timeout before SIGKILL

# Between restarts of a slot whose children keep failing. A child that stayed up for `cap`
# seconds after it was ready counts as a success: the next failure starts the schedule anew.
RESTART_BACKOFF = Backoff(first=0.5, cap=30.0)


def notify_ready() -> None:
    """In a supervised worker process: tell the supervisor it consumes. A no-op otherwise."""
    fd = os.environ.pop(READY_FD, None)
    if fd is None:
        return
    with suppress(OSError, ValueError):
        os.write(int(fd), b"1")
        os.close(int(fd))


class Supervisor:
    """Runs `processes` copies of `command`, replacing any that dies, until told to stop."""

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        shutdown_timeout: float,
        *,
        backoff: Backoff = RESTART_BACKOFF,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.command = list(command)
        self.processes = processes
        self.shutdown_timeout = shutdown_timeout
        self.backoff = backoff
        self._rand = rand
        self._children: dict[int, asyncio.subprocess.Process] = {}  # slot -> its latest child
        self._stop = asyncio.Event()
        self._failed = False
        self.failure: str | None = None  # why a first start stopped the supervisor, if one did

    async def run(self) -> int:
        """Supervise until SIGTERM/SIGINT or `stop()` (or a first start fails); return the exit
        code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        slots = [asyncio.create_task(self._slot(slot)) for slot in range(self.processes)]
        log.info("supervisor_started", processes=self.processes, pid=os.getpid())
        await self._stop.wait()
        log.info("supervisor_stopping", children=[c.pid for c in self._children.values()])
        codes = await self._stop_children()
        await asyncio.gather(*slots)  # each returns once its child has exited
        clean = not self._failed and all(code == 0 for code in codes)
        log.info("supervisor_stopped", exit_codes=codes)
        return 0 if clean else 1

    def stop(self) -> None:
        """Stop every child and return from `run` (what SIGTERM and SIGINT do)."""
        self._stop.set()

    async def _slot(self, slot: int) -> None:
        """Keep one child running: start it, wait for it, replace it if it dies.

        Only the slot's first start may be fatal; later failures back off and try again.
        """
        loop = asyncio.get_running_loop()
        first = True
        failures = 0  # consecutive children of this slot that failed to start or died soon
        delay = 0.0
        while not self._stop.is_set():
            if delay:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return
            try:
                child, ready = await self._spawn(slot)
            except OSError as exc:
                error = f"cannot start a worker process: {exc!r}"
                if first:
                    self._fail(slot, error)
                    return
                failures += 1
                delay = self._delay(failures)
                log.error(
                    "worker_process_failed_to_start",
                    slot=slot,
                    error=error,
                    attempt=failures,
                    retry_in=delay,
                )
                continue
            if not ready:
                code = await child.wait()
                if self._stop.is_set():
                    return
                if first:
                    self._fail(slot, f"exited with code {code} before it was ready", pid=child.pid)
                    return
                self._forget(slot, child)
                failures += 1
                delay = self._delay(failures)
                log.error(
                    "worker_process_failed_to_start",
                    pid=child.pid,
                    exit_code=code,
                    slot=slot,
                    attempt=failures,
                    retry_in=delay,
                )
                continue
            first = False
            started = loop.time()
            log.info("worker_process_started", pid=child.pid, slot=slot)
            code = await child.wait()
            if self._stop.is_set():
                return
            self._forget(slot, child)
            # A child that ran a while is replaced at once; one that dies soon after starting,
            # again and again (a crash at every start), backs off like a failed start.
            failures = failures + 1 if loop.time() - started < self.backoff.cap else 0
            delay = self._delay(failures) if failures else 0.0
            log.error(
                "worker_process_died",
                pid=child.pid,
                exit_code=code,
                slot=slot,
                restart=True,
                retry_in=delay,
            )

    def _delay(self, failures: int) -> float:
        return round(self.backoff.delay(failures, self._rand()), 3)

    def _forget(self, slot: int, child: asyncio.subprocess.Process) -> None:
        """Drop an exited child, so that stopping neither waits for it nor counts its exit code."""
        if self._children.get(slot) is child:
            del self._children[slot]

    def _fail(self, slot: int, error: str, *, pid: int | None = None) -> None:
        """A slot's first start failed: the same command would fail again, so stop everything."""
        self.failure = f"worker process {slot} failed on its first start: {error}"
        log.error(
            "worker_process_failed_to_start", pid=pid, slot=slot, error=error, first_start=True
        )
        self._failed = True
        self._stop.set()

    async def _spawn(self, slot: int) -> tuple[asyncio.subprocess.Process, bool]:
        """Start a child; return it and whether it reported ready (False: it exited first)."""
        read_fd, write_fd = os.pipe()
        try:
            child = await asyncio.create_subprocess_exec(
                *self.command,
                pass_fds=(write_fd,),
                env={**os.environ, READY_FD: str(write_fd), SLOT: str(slot)},
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # ours; the child has its own copy until it reports or exits
        self._children[slot] = child
        if self._stop.is_set():  # stopping began while it was being started
            with suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
            try:
                # One byte once the child consumes; end of file if it exits (or dies) first.
                ready = await reader.read(1) == b"1"
            finally:
                transport.close()
        return child, ready

    async def _stop_children(self) -> list[int]:
        """SIGTERM every child, wait for them to finish; SIGKILL those that take far too long."""
        children = list(self._children.values())
        if not children:  # stopped before the first child was even started
            return []
        for child in children:
            if child.returncode is None:
                with suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(child.wait()) for child in children]
        _, pending = await asyncio.wait(waits, timeout=self.shutdown_timeout + _KILL_GRACE)
        if pending:
            log.error("worker_process_killed", count=len(pending))
            for child in children:
                if child.returncode is None:
                    with suppress(ProcessLookupError):
                        child.kill()
        codes = [await child.wait() for child in children]
        # A child stopped by our SIGTERM before it had set up its own handlers ends with -SIGTERM:
        # it had not started consuming, so nothing was cut off.
        return [0 if code == -signal.SIGTERM else code for code in codes]
