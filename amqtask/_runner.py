"""The child of a process pool: runs handlers by import path, one task at a time.

Started by the worker (`amqtask._pool`) as `PYTHON [LAUNCHER...] /path/to/_runner.py`, possibly
under another interpreter with other packages: this file imports nothing outside the standard
library (amqtask, pydantic and orjson are used when that interpreter has them, never required).

The protocol runs over the child's original stdin and stdout; the handler's own prints go to
stderr. Every frame is `>II` (header length, body length), a JSON header, then a body:

    worker -> child   hello  {"path": [...], "preload": ["module:qualname", ...], "parent": pid,
                              "rss": whether to report the resident set size after each task}
    child -> worker   ready  {"ready": true, "pid": ...}   or  {"error": "...", "traceback": "..."}
    worker -> child   task   {"handler": "m:q", "input": "m:q" or null, "soft": seconds or null}
                             body: the payload's JSON
    child -> worker   done   {"ok": true, "rss": bytes or null}  body: the result's JSON
                             {"ok": false, "type": "m:Q", "message": ..., "traceback": ...,
                              "soft": bool, "reject": reason (only for amqtask.Reject), "rss": ...}

End of stdin ends the child (exit 0, atexit hooks run). A handler that kills its process
(`os._exit`, a segfault) ends it too: the worker sees the exit status and fails that task only.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import signal
import struct
import sys
import traceback
from collections.abc import Callable, Generator
from typing import Any

if __name__ == "__main__":  # run as a script: amqtask's own folder must not shadow other names
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
        del sys.path[0]

_PREFIX = struct.Struct(">II")

try:  # the same class amqtask exports, when this interpreter has amqtask
    from amqtask._exceptions import SoftTimeLimitExceeded
except ImportError:  # another environment: a stand-in of the same name

    class SoftTimeLimitExceeded(Exception):  # type: ignore[no-redef]
        """Raised inside a handler when its soft time limit has passed."""

        def __init__(self, message: str = "the task ran past its soft time limit") -> None:
            super().__init__(message)


try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - every environment amqtask itself runs in has orjson
    _orjson = None  # type: ignore[assignment]


# --- a soft limit inside a coroutine (also used by the worker's event loop) --------------------


class SoftLimited:
    """Awaits `awaitable`, and raises `make_exc()` inside it at its await point once `seconds`
    have passed, so the handler can catch it and clean up.

    The event loop can only interrupt a coroutine where it awaits: the task is cancelled at the
    limit, and the cancellation is turned into `make_exc()` before the coroutine sees it. A
    cancellation from anyone else (shutdown, a hard limit) passes through unchanged.
    """

    def __init__(
        self, awaitable: Any, seconds: float, make_exc: Callable[[], BaseException]
    ) -> None:
        self._awaitable = awaitable
        self._seconds = seconds
        self._make_exc = make_exc

    def __await__(self) -> Generator[Any, Any, Any]:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always awaited inside a task
            raise RuntimeError("SoftLimited must be awaited inside a task")
        fired = [False]

        def fire() -> None:
            fired[0] = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(self._seconds, fire)
        steps = self._awaitable.__await__()
        sent: Any = None
        thrown: BaseException | None = None
        try:
            while True:
                try:
                    step = steps.send(sent) if thrown is None else steps.throw(thrown)
                except StopIteration as done:
                    return done.value
                sent, thrown = None, None
                try:
                    sent = yield step
                except asyncio.CancelledError as exc:
                    thrown = exc
                    if fired[0]:
                        fired[0] = False  # delivered once
                        if task.uncancel() == 0:  # ours was the only cancellation pending
                            thrown = self._make_exc()
                except BaseException as exc:
                    thrown = exc
        finally:
            handle.cancel()


# --- framing -----------------------------------------------------------------------------------


def frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    """One frame: the prefix, the header as JSON, the body."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(len(encoded), len(body)) + encoded + body


def _read_exactly(fd: int, count: int) -> bytes | None:
    chunks: list[bytes] = []
    while count:
        chunk = os.read(fd, min(count, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> tuple[dict[str, Any], bytes] | None:
    prefix = _read_exactly(fd, _PREFIX.size)
    if prefix is None:
        return None
    header_size, body_size = _PREFIX.unpack(prefix)
    data = _read_exactly(fd, header_size + body_size)
    if data is None:
        return None
    return json.loads(data[:header_size]), data[header_size:]


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- running a handler -------------------------------------------------------------------------


_found: dict[str, Any] = {}


def resolve(path: str) -> Any:
    """The object at `module:qualname`, imported once."""
    obj = _found.get(path)
    if obj is None:
        module_name, _, qualname = path.partition(":")
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        _found[path] = obj
    return obj


class _Alarm:
    """The soft limit of a plain function: SIGALRM raises inside it, also in a blocking call
    (`time.sleep`, a socket read), as long as the handler runs in this, the main, thread."""

    armed = False

    def __init__(self) -> None:
        signal.signal(signal.SIGALRM, self._ring)

    def _ring(self, signum: int, frame: Any) -> None:
        if self.armed:
            self.armed = False
            raise SoftTimeLimitExceeded()

    def arm(self, seconds: float | None) -> None:
        if seconds:
            self.armed = True
            signal.setitimer(signal.ITIMER_REAL, seconds)

    def disarm(self) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def _is_async(func: Any) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(inspect.unwrap(func))


class Runner:
    def __init__(self, report_rss: bool = True) -> None:
        self.report_rss = report_rss  # reading /proc costs a little: only when it is checked
        self._alarm = _Alarm()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _await(self, awaitable: Any, soft: float | None) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)

        async def limited() -> Any:
            if soft:
                return await SoftLimited(awaitable, soft, SoftTimeLimitExceeded)
            return await awaitable

        return self._loop.run_until_complete(limited())

    def call(self, func: Any, payload: Any, soft: float | None) -> Any:
        if _is_async(func):
            return self._await(func(payload), soft)
        self._alarm.arm(soft)
        try:
            result = func(payload)
        finally:
            self._alarm.disarm()
        return self._await(result, None) if inspect.isawaitable(result) else result

    def task(self, header: dict[str, Any], body: bytes) -> bytes:
        try:
            func = resolve(header["handler"])
            model = header.get("input")
            payload = resolve(model).model_validate_json(body) if model else json.loads(body)
            result = _encode(self.call(func, payload, header.get("soft")))
        except BaseException as exc:
            return frame(_failure(exc))
        return frame({"ok": True, "rss": _rss() if self.report_rss else None}, result)


def _encode(result: Any) -> bytes:
    """The result as JSON: a pydantic model by its own serializer, anything else as JSON can."""
    if hasattr(result, "model_dump_json"):
        return bytes(result.model_dump_json().encode())
    if _orjson is not None:
        return _orjson.dumps(result, default=_plain)
    return json.dumps(result, default=_plain, allow_nan=False).encode()


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"the result holds a {type(value).__name__}, which JSON cannot encode")


def _failure(exc: BaseException) -> dict[str, Any]:
    kind = type(exc)
    header: dict[str, Any] = {
        "ok": False,
        "type": f"{kind.__module__}:{kind.__qualname__}",
        "message": _text(exc),
        "traceback": _traceback(exc),
        "soft": isinstance(exc, SoftTimeLimitExceeded),
        "rss": _rss(),
    }
    if kind.__name__ == "Reject" and kind.__module__.startswith("amqtask"):
        header["reject"] = _text(getattr(exc, "reason", ""))
    return header


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _traceback(exc: BaseException) -> str:
    """The traceback from the handler's frame down: this file's frames are left out."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        return _text(exc)


def _rss() -> int:
    """This process's resident set size in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return 0


# --- the process -------------------------------------------------------------------------------


def _die_with(parent: int | None) -> None:
    """Linux: be killed when the process that started this one dies, so a worker killed with
    SIGKILL leaves no child behind, even one busy in a long handler."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    if parent is not None and os.getppid() != parent:
        os._exit(0)  # the worker died before the line above ran


def main() -> int:
    commands, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # print() in a handler goes to the worker's stderr, not into the protocol
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the worker, which stops us
    hello = _read_frame(commands)
    if hello is None:
        return 0
    config = hello[0]
    _die_with(config.get("parent"))
    sys.path[:0] = [p for p in config.get("path", []) if p not in sys.path]
    for path in config.get("preload", []):
        try:
            if not callable(resolve(path)):
                raise TypeError(f"{path} is not callable")
        except BaseException as exc:
            problem = f"cannot import {path!r} in {sys.executable}: {type(exc).__name__}: {exc}"
            _write(replies, frame({"error": problem, "traceback": _traceback(exc)}))
            return 1
    _write(replies, frame({"ready": True, "pid": os.getpid()}))
    runner = Runner(report_rss=bool(config.get("rss", True)))
    while True:
        task = _read_frame(commands)
        if task is None:
            return 0
        _write(replies, runner.task(*task))


if __name__ == "__main__":
    sys.exit(main())
