"""The process pool: handlers run in child processes, fed by the worker's event loop.

The worker keeps the connection, the prefetch and every ack; a child only runs handlers, one
task at a time, and knows nothing of the broker. So a child that dies (a segfault, `os._exit`,
the OOM killer's SIGKILL) fails only the task it was running: that task is retried or
dead-lettered with reason `crashed`, the worker's other deliveries are untouched, and a new child
takes the dead one's place. A child is never acked for early: the delivery is settled by the
worker after the child answered, or after it died.

Children are started in advance (`size` of them per environment, a fresh interpreter each, no
fork of the running worker) and found by the runner (`amqtask._runner`) by import path; payloads
go to them and results come back as JSON. A child is replaced after `max_tasks` tasks, or when
its resident memory after a task is above `max_memory_mib`; one past its hard time limit is
killed. Log events: `pool_started`, `pool_child_started`, `pool_child_recycled`,
`pool_child_crashed`, `pool_child_killed`, `pool_child_failed_to_start`, `pool_stopped`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from pydantic import BaseModel, TypeAdapter, ValidationError

from amqtask import _runner
from amqtask._exceptions import (
    AmqtaskError,
    HandlerCrashed,
    Reject,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from amqtask._startup import Backoff

if TYPE_CHECKING:
    from amqtask._metrics import WorkerMetrics

log = structlog.get_logger("amqtask.worker")

RUNNER = Path(_runner.__file__).resolve()
START_TIMEOUT = 60.0  # seconds a child may take to start and import its handlers
STOP_TIMEOUT = 5.0  # seconds an idle child gets to exit once told to, before it is killed
_RESTART_BACKOFF = Backoff(first=0.5, cap=30.0)
_PREFIX = _runner._PREFIX


@dataclass(frozen=True, slots=True)
class Environment:
    """Where a pool's children run: an interpreter and a command prefix (bwrap, a container)."""

    python: str = sys.executable
    launcher: tuple[str, ...] = ()

    @property
    def native(self) -> bool:
        """This worker's own interpreter: handlers get their input model, as in the worker."""
        return self.python == sys.executable

    @property
    def command(self) -> list[str]:
        return [*self.launcher, self.python, str(RUNNER)]

    def __str__(self) -> str:
        return " ".join(self.command[:-1])


@dataclass(frozen=True, slots=True)
class Recycling:
    """When a child is replaced by a fresh one (after the task that crossed the line)."""

    max_tasks: int | None = None
    max_memory_mib: float | None = None


def import_path(func: Any, task: str, what: str = "handler") -> str:
    """`module:qualname` of a handler (or a model) that a child can import and find as this
    very object.

    Raises `AmqtaskError` for a closure, a lambda, a `functools.partial`, an instance with
    `__call__`, a function of `__main__` or one that a decorator replaced in its module.
    """
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    why = None
    if not isinstance(module, str) or not isinstance(qualname, str):
        why = "it has no module and qualified name (a partial or a callable object)"
    elif "<locals>" in qualname or "<lambda>" in qualname:
        why = f"{qualname!r} is defined inside a function or is a lambda"
    elif module == "__main__":
        why = "it is defined in __main__, which another process cannot import"
    else:
        try:
            found = _runner.resolve(f"{module}:{qualname}")
        except Exception as exc:
            found, why = None, f"{module}:{qualname} cannot be imported here ({exc!r})"
        if why is None and found is not func:
            why = f"{module}:{qualname} is another object (a decorator replaced it)"
    if why is not None:
        raise AmqtaskError(
            f"task {task!r}: the {what} {func!r} cannot be used in a process pool: a child "
            f"finds it by import path, and {why}. Define it at module level (a handler may also "
            "be registered by path with App.handler_at)"
        )
    return f"{module}:{qualname}"


class _ChildDied(Exception):
    """The child's end of the protocol closed: it exited or was killed."""


class Child:
    """One child process and its pipes; one request at a time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.tasks = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    async def request(self, data: bytes) -> tuple[dict[str, Any], bytes]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        try:
            stdin.write(data)
            await stdin.drain()
            header_size, body_size = _PREFIX.unpack(await stdout.readexactly(_PREFIX.size))
            data = await stdout.readexactly(header_size + body_size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _ChildDied() from exc
        return orjson.loads(data[:header_size]), data[header_size:]

    def kill(self) -> None:
        """SIGKILL the child and whatever its launcher started (its own process group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def exit_status(self, timeout: float = STOP_TIMEOUT) -> int:
        """The child's return code once it exited (killed after `timeout` if it has not)."""
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.kill()
            return await self.process.wait()

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Close its input (it exits after its current task), wait, kill if it lingers."""
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        return await self.exit_status(timeout)


class ChildPool:
    """`size` children of one environment, started in advance, one task each at a time."""

    def __init__(
        self,
        environment: Environment,
        size: int,
        preload: list[str],
        recycling: Recycling = Recycling(),
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.environment = environment
        self.size = size
        self._preload = preload
        self._recycling = recycling
        self._metrics = metrics
        self._idle: list[Child] = []  # the last one back is the first out (its pages are warm)
        self._wanted: collections.deque[asyncio.Future[Child]] = collections.deque()  # FIFO
        self._children: set[Child] = set()
        self._starting: set[asyncio.Task[None]] = set()  # replacements being started
        self._stopping: set[asyncio.Task[None]] = set()  # children being stopped or reaped
        self._waiting: set[asyncio.Task[Any]] = set()  # tasks waiting for an idle child
        self._draining = False
        self._closing = False
        # Since the pool started, for `amqtask status` (`amqtask._control`); the metrics count
        # the same events.
        self.busy = 0  # children running a task now
        self.recycled = 0
        self.crashed = 0
        self.killed_time_limit = 0

    @property
    def alive(self) -> int:
        return len(self._children)

    def preload(self, *paths: str | None) -> None:
        """Have every child import these (`module:qualname`) at start, before it is ready."""
        self._preload.extend(p for p in paths if p is not None and p not in self._preload)

    async def start(self) -> None:
        """Start every child and wait until each has imported its handlers.

        Raises `AmqtaskError` (stopping those started) when one cannot start: the interpreter
        is missing, a handler cannot be imported there, or it took longer than START_TIMEOUT.
        """
        started = await asyncio.gather(
            *(self._start_child() for _ in range(self.size)), return_exceptions=True
        )
        errors = [result for result in started if isinstance(result, BaseException)]
        for result in started:
            if isinstance(result, Child):
                self._idle.append(result)
        if errors:
            await self.close()
            error = errors[0]
            if not isinstance(error, Exception):
                raise error
            raise AmqtaskError(
                f"the process pool ({self.environment}) cannot start: {error}"
            ) from None
        log.info("pool_started", environment=str(self.environment), children=self.size)

    async def _start_child(self) -> Child:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.environment.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                start_new_session=True,  # Ctrl-C in a terminal is for the worker, which stops it
            )
        except OSError as exc:
            raise AmqtaskError(f"{self.environment.command[0]}: {exc.strerror or exc}") from None
        child = Child(process)
        self._children.add(child)
        self._count_children()
        hello = {
            "parent": os.getpid() if not self.environment.launcher else None,
            "path": sys.path if self.environment.native else [os.getcwd()],
            "preload": self._preload,
            "rss": self._recycling.max_memory_mib is not None,
        }
        try:
            reply, _ = await asyncio.wait_for(child.request(_runner.frame(hello)), START_TIMEOUT)
        except BaseException as exc:
            child.kill()
            code = await child.exit_status()
            self._forget(child)
            if isinstance(exc, _ChildDied):
                raise AmqtaskError(f"the child exited at start with code {code}") from None
            if isinstance(exc, TimeoutError):
                raise AmqtaskError(f"the child did not start within {START_TIMEOUT:g} s") from None
            raise
        if "error" in reply:
            await child.stop()
            self._forget(child)
            raise AmqtaskError(str(reply["error"]))
        log.debug("pool_child_started", pid=child.pid, environment=str(self.environment))
        return child

    async def run(self, data: bytes, time_limit: float | None) -> tuple[dict[str, Any], bytes]:
        """Run one task frame on an idle child: the child's reply header and body.

        Raises `TimeLimitExceeded` (the child was killed) and `HandlerCrashed` (the child died);
        a cancellation (shutdown gave up on the task) kills the child too. Every other outcome,
        including the handler's exceptions, is in the reply.
        """
        child = await self._idle_child()
        self.busy += 1
        scope = None
        try:
            if time_limit is None:
                reply, body = await child.request(data)
            else:
                async with asyncio.timeout(time_limit) as scope:
                    reply, body = await child.request(data)
        except TimeoutError:
            if scope is None or not scope.expired():
                raise
            assert time_limit is not None
            self._discard(child, "time_limit")
            raise TimeLimitExceeded(time_limit, killed=True) from None
        except _ChildDied:
            self.crashed += 1
            code = await child.exit_status()
            self._forget(child)
            crash = _crash(code)
            log.warning(
                "pool_child_crashed", pid=child.pid, exit_code=crash.exit_code, signal=crash.signal
            )
            if self._metrics is not None:
                self._metrics.pool_crashed.inc()
            self._refill()
            raise crash from None
        except BaseException:
            self._discard(child, "cancelled")  # mid-task: it must not go on running
            raise
        finally:
            self.busy -= 1
        child.tasks += 1
        self._after_task(child, reply.get("rss"))
        return reply, body

    async def _idle_child(self) -> Child:
        """An idle child: at once if one is idle and nobody waits before us, else the next one
        back, in the order the tasks asked (`_give_back` hands it over)."""
        if self._draining:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # as if drained while waiting: the task never starts
            await asyncio.sleep(0)
        wanted_before = self._wanted
        while wanted_before and wanted_before[0].done():
            wanted_before.popleft()  # a task that gave up waiting
        if self._idle and not wanted_before:
            return self._idle.pop()
        task = asyncio.current_task()
        assert task is not None
        wanted: asyncio.Future[Child] = asyncio.get_running_loop().create_future()
        self._wanted.append(wanted)
        self._waiting.add(task)
        try:
            return await wanted
        except BaseException:
            if wanted.done() and not wanted.cancelled():
                self._give_back(wanted.result())  # handed over as we were cancelled: pass it on
            else:
                wanted.cancel()
            raise
        finally:
            self._waiting.discard(task)

    def _give_back(self, child: Child) -> None:
        """An idle child: to the first task still waiting for one, else to the idle ones."""
        wanted = self._wanted
        while wanted:
            first = wanted.popleft()
            if not first.done():
                first.set_result(child)
                return
        self._idle.append(child)

    def drain(self) -> None:
        """Start no more tasks: those waiting for a child are cancelled (their deliveries stay
        unacked and are redelivered); those running go on to their end."""
        self._draining = True
        for task in self._waiting:
            task.cancel()

    def _after_task(self, child: Child, rss: Any) -> None:
        max_tasks, max_mib = self._recycling.max_tasks, self._recycling.max_memory_mib
        mib = rss / (1024 * 1024) if isinstance(rss, int | float) else None
        why = None
        if max_tasks is not None and child.tasks >= max_tasks:
            why = "max_tasks"
        elif max_mib is not None and mib is not None and mib > max_mib:
            why = "max_memory"
        if why is None:
            self._give_back(child)
            return
        log.info(
            "pool_child_recycled",
            pid=child.pid,
            why=why,
            tasks=child.tasks,
            rss_mib=None if mib is None else round(mib, 1),
        )
        self.recycled += 1
        if self._metrics is not None:
            self._metrics.pool_recycled.labels(why).inc()
        self._in_background(self._stopping, self._retire(child))
        self._refill()

    async def _retire(self, child: Child) -> None:
        await child.stop()
        self._forget(child)

    def _discard(self, child: Child, reason: str) -> None:
        """Kill a child in the middle of a task, and start another in its place."""
        child.kill()
        if reason == "time_limit":
            self.killed_time_limit += 1
        log.warning("pool_child_killed", pid=child.pid, reason=reason)
        if self._metrics is not None:
            self._metrics.pool_killed.labels(reason).inc()
        self._in_background(self._stopping, self._reap(child))
        self._refill()

    async def _reap(self, child: Child) -> None:
        await child.process.wait()
        self._forget(child)

    def _forget(self, child: Child) -> None:
        self._children.discard(child)
        self._count_children()

    def _count_children(self) -> None:
        if self._metrics is not None:
            self._metrics.pool_children.labels(str(self.environment)).set(len(self._children))

    def _refill(self) -> None:
        if not self._closing:
            self._in_background(self._starting, self._replace())

    async def _replace(self) -> None:
        """Start a child to take a place that fell vacant; retry with backoff until one starts."""
        attempt = 0
        while not self._closing:
            attempt += 1
            try:
                child = await self._start_child()
            except AmqtaskError as exc:
                retry_in = _RESTART_BACKOFF.delay(attempt, _jitter())
                log.error(
                    "pool_child_failed_to_start",
                    environment=str(self.environment),
                    attempt=attempt,
                    error=str(exc),
                    retry_in=round(retry_in, 2),
                )
                await asyncio.sleep(retry_in)
                continue
            if self._closing:
                await child.stop()
                self._forget(child)
                return
            self._give_back(child)
            return

    @staticmethod
    def _in_background(tasks: set[asyncio.Task[None]], work: Any) -> None:
        task = asyncio.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every child: idle ones exit when told, any other is killed after `timeout`.

        Call it once no task runs (the worker waited for them or gave up on them)."""
        self._closing = True
        for task in self._starting:
            task.cancel()
        if self._starting:
            await asyncio.wait(self._starting, timeout=timeout)
        children = list(self._children)
        await asyncio.gather(*(child.stop(timeout) for child in children), return_exceptions=True)
        if self._stopping:
            await asyncio.wait(self._stopping, timeout=timeout + 1)
        for child in children:
            self._forget(child)
        log.info("pool_stopped", environment=str(self.environment), children=len(children))


def _crash(code: int) -> HandlerCrashed:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return HandlerCrashed(signal=name)
    return HandlerCrashed(exit_code=code)


def _jitter() -> float:
    return int.from_bytes(os.urandom(2), "big") / 65536


# --- the executor: a handler of one contract, run in a pool ------------------------------------


class ProcessExecutor:
    """Runs one contract's handler in a `ChildPool`: the payload goes as JSON, the result comes
    back as JSON (validated into the contract's output model here, when it fits)."""

    def __init__(
        self,
        pool: ChildPool,
        handler: str,
        *,
        input_model: str | None,
        output: Any,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
    ) -> None:
        self.pool = pool
        self.handler = handler
        self.time_limit = time_limit
        header = {"handler": handler, "input": input_model, "soft": soft_time_limit}
        self._header = orjson.dumps(header)
        self._output = None if output is None else TypeAdapter(output)

    async def run(self, func: Any, payload: Any) -> Any:
        body = payload.model_dump_json().encode() if isinstance(payload, BaseModel) else b"null"
        data = _PREFIX.pack(len(self._header), len(body)) + self._header + body
        reply, result = await self.pool.run(data, self.time_limit)
        if not reply.get("ok"):
            raise rebuilt(reply)
        if self._output is None:
            return None
        try:
            return self._output.validate_json(result)
        except ValidationError:
            return orjson.loads(result)  # settled as invalid_result for a call, as in the worker


def rebuilt(reply: dict[str, Any]) -> BaseException:
    """The exception a child reported, as an instance of its class where this process knows
    that class (so `Retry.on` applies as in the worker), with the child's traceback as a note."""
    message = str(reply.get("message", ""))
    if "reject" in reply:
        return Reject(str(reply["reject"]))
    exc: BaseException
    if reply.get("soft"):
        exc = SoftTimeLimitExceeded(message)
    else:
        try:
            exc = _remote_class(str(reply.get("type", "builtins:Exception")))(message)
        except Exception:  # a class whose __new__ wants other arguments
            exc = Exception(message)
    trace = reply.get("traceback")
    if trace:
        exc.add_note(f"in the child process:\n{str(trace).rstrip()}")
    return exc


_REMOTE_CLASSES: dict[str, type[BaseException]] = {}


def _remote_str(self: BaseException) -> str:
    return str(getattr(self, "_remote_message", ""))


def _remote_init(self: BaseException, message: str) -> None:
    BaseException.__init__(self, message)
    self._remote_message = message  # type: ignore[attr-defined]


def _remote_class(path: str) -> type[BaseException]:
    """A class named like the child's exception class: a subclass of it when this process has
    already imported it (only then: a child must not make the worker import modules), else of
    `Exception`. Its `str()` is the child's message, whatever the original's `__str__` does."""
    known = _REMOTE_CLASSES.get(path)
    if known is not None:
        return known
    module, _, qualname = path.partition(":")
    base: type[BaseException] = Exception
    if module in sys.modules:
        try:
            found = _runner.resolve(path)
        except Exception:
            found = None
        if isinstance(found, type) and issubclass(found, BaseException):
            base = found
    namespace = {
        "__module__": module,
        "__qualname__": qualname,
        "__init__": _remote_init,
        "__str__": _remote_str,
    }
    try:
        made = type(qualname.rpartition(".")[2] or "Exception", (base,), namespace)
    except TypeError:  # a class that cannot be subclassed
        made = type(qualname.rpartition(".")[2] or "Exception", (Exception,), namespace)
    if len(_REMOTE_CLASSES) < 1000:  # class names come from handler code: few, but bounded
        _REMOTE_CLASSES[path] = made
    return made
