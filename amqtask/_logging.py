"""Logging for the CLI: amqtask's structlog events and every stdlib record (aio-pika's and
aiormq's reconnect messages, the handlers' own `logging` calls, Python warnings) rendered by one
set of processors, to stderr.

JSON mode writes one JSON object per line, whoever logged it, tracebacks included (as the
`exception` field): a log collector can parse every line the process writes. Console mode is
key-value text for a terminal.

amqtask's own events take structlog's direct path (rendered, then written: about 5 us a line)
rather than a stdlib `LogRecord` each (about 14 us), since a worker logs a line per task; stdlib
records go through structlog's `ProcessorFormatter`. Both share the processors, the renderer's
settings and one locked output, so their lines never interleave.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

import orjson
import structlog
from structlog.types import Processor

# aio-pika and aiormq log every frame at debug: their debug is not amqtask's.
_LIBRARIES = ("aio_pika", "aiormq")

_json = False  # what the last `configure` chose


def _not_repeated(record: logging.LogRecord) -> bool:
    """Drop aiormq's line for a failed connect: whoever connected reports it already (amqtask's
    one-line error at start, aio-pika's reconnect warning later), with what to do."""
    return not (
        record.name == "aiormq.connection" and record.msg == "error when creating transport: %r"
    )


def renders_json() -> bool:
    """Whether this process's logs are JSON lines (as `configure` last set them up)."""
    return _json


class _Output(logging.Handler):
    """Writes whole lines to one stream under the handler's lock: stdlib records through its
    formatter, and structlog's rendered events through `write` (see `_EventWriter`)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.binary = getattr(stream, "buffer", None)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write(line)

    def write(self, line: str | bytes) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            if isinstance(line, bytes) and self.binary is not None:
                self.binary.write(line + b"\n")
                self.binary.flush()
                return
            text = line.decode() if isinstance(line, bytes) else line
            self.stream.write(text + "\n")
            self.stream.flush()


class _EventWriter:
    """structlog's logger: hands each rendered event to the shared output."""

    def __init__(self, output: _Output) -> None:
        self._output = output

    def msg(self, message: str | bytes) -> None:
        self._output.write(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def _text_dumps(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, **kwargs).decode()


def configure(level: int = logging.INFO, *, json: bool | None = None) -> None:
    """Configure structlog and stdlib logging for this process; `json=None` picks JSON unless
    stderr is a terminal. Records below `level` are dropped, from amqtask and from stdlib
    loggers alike (aio-pika and aiormq: info at the most verbose)."""
    global _json
    if json is None:
        json = not sys.stderr.isatty()
    _json = json
    stamp: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    finish: list[Processor] = []
    ours: Processor
    theirs: Processor
    if json:
        # A traceback becomes a field (one line), not lines of text after the event.
        finish.append(structlog.processors.format_exc_info)
        ours = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        theirs = structlog.processors.JSONRenderer(serializer=_text_dumps)
    else:
        ours = theirs = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    output = _Output(sys.stderr)
    output.addFilter(_not_repeated)
    output.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),
                *stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *finish,
                theirs,
            ],
        )
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Output)]:
        root.removeHandler(handler)  # configured before (tests run several commands)
    root.addHandler(output)
    root.setLevel(level)
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    logging.captureWarnings(True)
    writer = _EventWriter(output)
    structlog.configure(
        processors=[*stamp, *finish, ours],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=True,
    )
    if json:
        sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], exc: BaseException, traceback: TracebackType | None
) -> None:
    """In JSON mode an uncaught exception is a log event too, not lines of plain text."""
    structlog.get_logger("amqtask").critical("uncaught_exception", exc_info=(kind, exc, traceback))


class LogConfigError(ValueError):
    """A `--log-config` file that cannot be read or applied."""


# Attributes of a `LogRecord`: an event key of one of these names is passed on with a `_` suffix.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _to_record(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[str], dict[str, Any]]:
    """The last processor with a file configuration: the event becomes a record whose message is
    `event key=value ...` and whose attributes also hold each key (for JSON formatters)."""
    event = str(event_dict.pop("event", ""))
    exc_info = event_dict.pop("exc_info", None)
    event_dict.pop("level", None)
    text = " ".join([event, *(f"{key}={value!r}" for key, value in event_dict.items())])
    extra = {
        (f"{key}_" if key in _RECORD_ATTRIBUTES else key): value
        for key, value in event_dict.items()
    }
    return (text,), {"extra": {"event": event, **extra}, "exc_info": exc_info}


def _read_config(path: str) -> dict[str, Any] | None:
    """The dictConfig of a JSON or YAML file, or None for an INI file (fileConfig)."""
    suffix = path.rsplit(".", 1)[-1].lower()
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise LogConfigError(f"cannot read {path}: {exc.strerror}") from None
    if suffix == "json":
        try:
            loaded = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise LogConfigError(f"{path} is not valid JSON: {exc}") from None
    elif suffix in ("yaml", "yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise LogConfigError(f"{path}: a YAML file needs PyYAML (pip install pyyaml)") from None
        try:
            loaded = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise LogConfigError(f"{path} is not valid YAML: {exc}") from None
    else:
        return None
    if not isinstance(loaded, dict):
        raise LogConfigError(f"{path} must hold a mapping (logging's dictConfig schema)")
    return loaded


def configure_file(path: str) -> None:
    """Configure logging from a file, as uvicorn's `--log-config` does: JSON or YAML go to
    `logging.config.dictConfig`, any other file (INI) to `fileConfig`. amqtask's structlog events
    then go through stdlib logging (the file's loggers, levels, handlers and formatters), with
    the event's keys as record attributes. Loggers that exist already stay enabled unless the
    file says `disable_existing_loggers`. Raises `LogConfigError`."""
    import logging.config

    global _json
    _json = False
    config = _read_config(path)
    try:
        if config is not None:
            config.setdefault("version", 1)
            # amqtask's, aio-pika's and aiormq's loggers exist by now: disabling them (dictConfig's
            # default) would silently drop the worker's own lines.
            config.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(config)
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except (ValueError, TypeError, AttributeError, ImportError, KeyError, RuntimeError) as exc:
        raise LogConfigError(f"{path}: {exc}") from None
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            _to_record,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
