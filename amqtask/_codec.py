"""The one path of a message: encoding, header names and decoding.

Used by `App.send`, `App.call`, the worker and dead-lettering alike, so each header name is
written once.
Header names carry no `x-` prefix: RabbitMQ reserves those for itself (4.x drops client-set ones).
"""

from __future__ import annotations

import os
import struct
import traceback as tb
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from pamqp.encode import field_table
from pydantic import BaseModel, TypeAdapter, ValidationError

from amqtask import _tracing, _wallclock
from amqtask._contract import Calls, Contract
from amqtask._exceptions import DecodeError, InvalidReply, RemoteError

CONTENT_TYPE = "application/json"

# Headers of a task message.
TASK = "amqtask-task"
VERSION = "amqtask-version"
# A scheduled task's: the schedule that fired it and the tick's due time (ISO 8601, UTC). Its
# message id derives from both, so a tick published twice carries one id.
SCHEDULE = "amqtask-schedule"
DUE = "amqtask-due"
# A call's request: when its caller stops waiting, in milliseconds since the epoch (an integer:
# pamqp sends a float header as a 32-bit float, off by a minute at today's epoch). The broker drops
# a request still queued then (its `expiration`); the worker drops one it received but had not
# started by then (held in its prefetch buffer or waiting for a free slot).
DEADLINE = "amqtask-deadline"
ATTEMPT = "amqtask-attempt"  # 1 on the first run; our own count: RabbitMQ 4 ignores client x-death
FIRST_FAILED_AT = "amqtask-first-failed-at"  # ISO 8601, UTC; set by the first failure
# Headers amqtask adds to a dead letter, and to an error reply (without the time and queue).
REASON = "amqtask-reason"  # short code: undecodable_body, invalid_payload, handler_error, ...
ERROR = "amqtask-error"  # human-readable detail
ERROR_TYPE = "amqtask-error-type"  # exception class of a failed handler
TRACEBACK = "amqtask-traceback"  # trimmed traceback of a failed handler
FAILED_AT = "amqtask-failed-at"  # ISO 8601, UTC
ORIGIN_QUEUE = "amqtask-queue"  # the work queue the message was taken from
EXIT_CODE = "amqtask-exit-code"  # a crashed handler's process exited with this code
SIGNAL = "amqtask-signal"  # ...or was killed by this signal (SIGSEGV, SIGKILL)

_MAX_HEADER_TEXT = 4000  # keeps a dead letter's headers well under the frame size
DROPPED_HEADERS = "amqtask-dropped-headers"  # names of headers left off a copy to fit the frame
MAX_BODY_BYTES = 64 * 1024 * 1024  # the most a compressed body may expand to


class Reasons:
    """Why a message became a dead letter (the `amqtask-reason` header)."""

    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    UNSUPPORTED_CONTENT_ENCODING = "unsupported_content_encoding"
    UNDECODABLE_BODY = "undecodable_body"
    MISSING_TASK_HEADER = "missing_task_header"
    UNKNOWN_TASK = "unknown_task"
    INVALID_PAYLOAD = "invalid_payload"
    INVALID_RESULT = "invalid_result"  # a called handler's return value does not fit `returns`
    HANDLER_ERROR = "handler_error"  # the last attempt failed, or the error is not retried
    REJECTED = "rejected"  # the handler raised `amqtask.Reject`
    TIME_LIMIT = "time_limit"  # the handler ran past its time limit (the last attempt)
    CRASHED = "crashed"  # the process running the handler died (the last attempt)
    EXPIRED = "expired"  # a call whose caller stopped waiting before it could start (acked)
    REVOKED = "revoked"  # `App.revoke`: acked without running, or stopped (answered to a call)


@dataclass(slots=True)
class Outgoing:
    """A message ready for the transport: body, identity and headers."""

    body: bytes
    message_id: str
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = CONTENT_TYPE
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: float | None = None  # seconds
    content_encoding: str | None = None
    type: str | None = None  # the AMQP `type` property: the task name on a task message
    persistent: bool = True  # False: delivery mode 1, the request of a transient call


class Delivery(Protocol):
    """What the codec and the worker read of an incoming message (aio-pika's fits)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def redelivered(self) -> bool | None: ...


def new_message_id() -> str:
    """A random UUID (version 4) as 32 hex digits, like `uuid.uuid4().hex` at a third of its cost
    (this runs on every send)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def validate_input(contract: Contract[Any, Any], payload: BaseModel | Mapping[str, Any]) -> Any:
    """The payload as the contract's input model. Raises pydantic's `ValidationError`."""
    return contract.input.model_validate(payload)


def encode_task(
    contract: Contract[Any, Any],
    payload: BaseModel | Mapping[str, Any],
    *,
    message_id: str | None = None,
) -> Outgoing:
    """Validate and serialize a task message. Raises `ValidationError`, publishing nothing."""
    model = validate_input(contract, payload)
    # The trace context (traceparent) is added by `send` and `call`, in their producer span.
    return Outgoing(
        body=orjson.dumps(model.model_dump(mode="json")),
        message_id=message_id or new_message_id(),
        headers={TASK: contract.name, VERSION: contract.version},
        type=contract.name,
    )


def header_text(value: Any) -> str | None:
    """A header value as text, whatever its AMQP type; never raises.

    AMQP long strings arrive as `bytes` (or `bytearray` from some clients); invalid UTF-8 is
    replaced, and a value whose `str()` fails reads as its type name.
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    try:
        text = str(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if isinstance(text, str) else f"<{type(value).__name__}>"


def header_int(value: Any, default: int | None = None) -> int | None:
    """A header value as an integer (an int, or digits as text or bytes), else `default`."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    text = header_text(value)
    if text is None:
        return default
    try:
        return int(text.strip())
    except ValueError:
        return default


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """`type/subtype` (lower case) and the parameters of a content type."""
    kind, *params = content_type.split(";")
    parsed: dict[str, str] = {}
    for param in params:
        name, _, value = param.partition("=")
        parsed[name.strip().lower()] = value.strip().strip('"').lower()
    return kind.strip().lower(), parsed


def _check_content_type(content_type: str | None, body: bytes) -> None:
    """JSON, with no charset or UTF-8 (RFC 8259: JSON between systems is UTF-8)."""
    if not content_type:
        return
    kind, params = _media_type(content_type)
    charset = params.get("charset", "utf-8")
    if kind != CONTENT_TYPE or charset not in ("utf-8", "utf8"):
        raise DecodeError(
            Reasons.UNSUPPORTED_CONTENT_TYPE,
            f"content type {content_type!r} is not {CONTENT_TYPE!r} (UTF-8)",
            body=body,
        )


def _inflate(body: bytes, wbits: int) -> bytes:
    """Decompress a whole zlib/gzip/raw-deflate stream (by `wbits`) of at most `MAX_BODY_BYTES`.

    Raises `zlib.error` for bad or truncated data, `OverflowError` when it expands too far.
    """
    inflater = zlib.decompressobj(wbits)
    expanded = inflater.decompress(body, MAX_BODY_BYTES + 1)
    if len(expanded) > MAX_BODY_BYTES or inflater.unconsumed_tail:
        raise OverflowError(f"the body expands beyond {MAX_BODY_BYTES} bytes")
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return expanded


# What `content_encoding` names, and the zlib window bits that read it (deflate, per RFC 9110, is
# a zlib stream; raw deflate is accepted as well).
_ENCODINGS = {
    "gzip": (16 + zlib.MAX_WBITS,),
    "x-gzip": (16 + zlib.MAX_WBITS,),
    "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS),
}


def _decoded_body(encoding: str | None, body: bytes) -> bytes:
    """The body with its `content_encoding` undone: none, gzip or deflate. Raises `DecodeError`."""
    name = (encoding or "").strip().lower()
    if name in ("", "identity"):
        return body
    if name not in _ENCODINGS:
        raise DecodeError(
            Reasons.UNSUPPORTED_CONTENT_ENCODING,
            f"content encoding {encoding!r} is not supported (use gzip, deflate or none)",
            body=body,
        )
    error: Exception = zlib.error("no data")
    for wbits in _ENCODINGS[name]:
        try:
            return _inflate(body, wbits)
        except zlib.error as exc:
            error = exc
        except OverflowError as exc:
            raise DecodeError(Reasons.UNDECODABLE_BODY, str(exc), body=body) from None
    raise DecodeError(
        Reasons.UNDECODABLE_BODY, f"the body is not valid {name} data: {error}", body=body
    )


def decode_task(
    delivery: Delivery, contracts: Mapping[tuple[str, int], Contract[Any, Any]]
) -> tuple[Contract[Any, Any], BaseModel]:
    """Find the message's contract and validate its body. Raises `DecodeError`."""
    body = delivery.body
    _check_content_type(delivery.content_type, body)
    headers = delivery.headers or {}
    name = header_text(headers.get(TASK))
    if not name:
        raise DecodeError(
            Reasons.MISSING_TASK_HEADER, f"the message has no {TASK!r} header", body=body
        )
    version = header_int(headers.get(VERSION, 1))
    if version is None:
        raise DecodeError(
            Reasons.UNKNOWN_TASK, f"task {name!r} has an invalid version header", body=body
        )
    contract = contracts.get((name, version))
    if contract is None:
        known = ", ".join(sorted(f"{n} v{v}" for n, v in contracts)) or "none"
        raise DecodeError(
            Reasons.UNKNOWN_TASK,
            f"no handler for task {name!r} v{version} here (handled: {known})",
            body=body,
        )
    data = _decoded_body(delivery.content_encoding, body)
    try:
        return contract, contract.input.model_validate_json(data)
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise DecodeError(
                Reasons.UNDECODABLE_BODY, f"the body is not valid JSON: {exc}", body=body
            ) from None
        raise DecodeError(
            Reasons.INVALID_PAYLOAD,
            f"the body does not fit {contract.input.__name__}: {exc}",
            body=body,
        ) from None


@dataclass(slots=True)
class Envelope:
    """A delivery decoded once: what the worker's pipeline reads, whatever the message held.

    `problem` is set when the message cannot become a task (then `contract` and `payload` are
    None); `task` is the task header as text, for logs, even for an unknown task.
    """

    delivery: Delivery
    queue: str  # the work queue it belongs to (dead letters and retries are routed by it)
    task: str | None
    attempt: int
    contract: Contract[Any, Any] | None = None
    payload: BaseModel | None = None
    problem: DecodeError | None = None

    @property
    def message_id(self) -> str | None:
        return self.delivery.message_id

    @property
    def is_call(self) -> bool:
        return bool(self.delivery.reply_to)


def open_envelope(
    delivery: Delivery, queue: str, contracts: Mapping[tuple[str, int], Contract[Any, Any]]
) -> Envelope:
    """Decode `delivery` for `queue`'s worker. Never raises: a message that is not a task of
    `contracts` comes back with its `problem`."""
    headers = delivery.headers or {}
    envelope = Envelope(
        delivery, queue, task=header_text(headers.get(TASK)), attempt=attempt_of(delivery)
    )
    try:
        envelope.contract, envelope.payload = decode_task(delivery, contracts)
    except DecodeError as exc:
        envelope.problem = exc
    except Exception as exc:  # a validator or decoder failing in a way of its own
        envelope.problem = DecodeError(
            Reasons.UNDECODABLE_BODY, f"decoding failed: {describe(exc)}", body=delivery.body
        )
    return envelope


def attempt_of(delivery: Delivery) -> int:
    """Which attempt this delivery is (1 for a task never retried or with an unreadable count)."""
    attempt = header_int((delivery.headers or {}).get(ATTEMPT), 1)
    return max(attempt or 1, 1)


# --- failures, written so that they cannot fail -----------------------------------------------


def safe_text(value: Any, limit: int = _MAX_HEADER_TEXT) -> str:
    """`value` as text for a header or a log line, at most `limit` characters; never raises.

    Lone surrogates (as in `FileNotFoundError("caf\\udce9")`) are escaped, so the text always
    encodes as UTF-8; a `__str__` that raises or returns a non-string reads as the type's name.
    """
    try:
        text = value if isinstance(value, str) else str(value)
        if not isinstance(text, str):
            raise TypeError("__str__ returned a non-string")
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def type_name(exc: BaseException) -> str:
    """The qualified class name of `exc` (`builtins.KeyError`)."""
    kind = type(exc)
    return safe_text(f"{kind.__module__}.{kind.__qualname__}")


def describe(exc: BaseException) -> str:
    """`Type: message`, safe for any exception."""
    return f"{safe_text(type(exc).__name__)}: {safe_text(exc)}"


def trimmed_traceback(exc: BaseException, limit: int = _MAX_HEADER_TEXT) -> str:
    """The exception's traceback, keeping its end (where it was raised) within `limit`."""
    try:
        text = "".join(tb.format_exception(exc))
    except Exception:  # a traceback object of an unusual kind: the message at least
        text = describe(exc)
    text = safe_text(text, limit=len(text))
    return text if len(text) <= limit else "...\n" + text[-(limit - 4) :]


def failure_headers(exc: BaseException, error: str | None = None) -> dict[str, Any]:
    """What a dead letter or an error reply says of a failure: message, type, traceback."""
    return {
        ERROR: safe_text(describe(exc) if error is None else error),
        ERROR_TYPE: type_name(exc),
        TRACEBACK: trimmed_traceback(exc),
    }


# Headers the broker adds when it dead-letters. A copy we publish again must not carry them: the
# broker drops a message dead-lettered into a queue already in its x-death history (cycle
# detection), which a retry passing the same delay level a second time would trigger.
_BROKER_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


def sendable_header(value: Any) -> Any:
    """A header value as it was received, in a form the client can encode again.

    pamqp decodes a long string that is not UTF-8 as `bytes`, which it cannot encode: it goes back
    as a byte array, byte for byte. It encodes every float as a 32-bit float: a double beyond that
    range goes back as its text rather than failing the replay.
    """
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, float):
        try:
            struct.pack(">f", value)
        except (OverflowError, struct.error):
            return repr(value)
        return value
    if isinstance(value, dict):
        return {key: sendable_header(item) for key, item in value.items()}
    if isinstance(value, list):
        return [sendable_header(item) for item in value]
    return value


def _copy(delivery: Delivery, ours: dict[str, Any]) -> Outgoing:
    """A copy of `delivery` to publish again: body, message id, content type and encoding
    kept byte for byte; the broker's death headers dropped; `ours` set over the rest."""
    headers = {
        key: sendable_header(value)
        for key, value in (delivery.headers or {}).items()
        if isinstance(key, str) and not key.startswith(_BROKER_DEATH_HEADERS)
    }
    headers.update(ours)
    # Within the worker's process span, the copy carries its context: the retry's next attempt
    # (or a dead letter's replay) continues that trace. Without a span, the received one stays.
    _tracing.inject(headers)
    return Outgoing(
        body=delivery.body,
        message_id=delivery.message_id or new_message_id(),
        headers=headers,
        content_type=delivery.content_type,
        content_encoding=delivery.content_encoding,
        correlation_id=delivery.correlation_id,
        type=header_text(getattr(delivery, "type", None)),
    )


def _first_failed_at(delivery: Delivery, now: str) -> str:
    return header_text((delivery.headers or {}).get(FIRST_FAILED_AT)) or now


def retry_copy(delivery: Delivery, *, attempt: int, exc: BaseException) -> Outgoing:
    """A copy of a failed delivery for attempt number `attempt`, with the failure recorded.

    Body and message id are kept, so the retried task is the same task to an idempotent handler.
    """
    now = _wallclock.utc_now().isoformat()
    ours = {
        **failure_headers(exc),
        FIRST_FAILED_AT: _first_failed_at(delivery, now),
        FAILED_AT: now,
        ATTEMPT: attempt,
    }
    return _copy(delivery, ours)


def dead_letter(
    delivery: Delivery,
    *,
    queue: str,
    reason: str,
    error: str,
    exc: BaseException | None = None,
) -> Outgoing:
    """A copy of `delivery` for its dead-letter queue, with why it failed in the headers.

    The body and message id are kept byte for byte, so it can be inspected and replayed. With
    `exc`, the headers also hold its type and traceback, the attempt count and the first and
    last failure times.
    """
    now = _wallclock.utc_now().isoformat()
    ours: dict[str, Any] = {}
    if exc is not None:
        ours.update(failure_headers(exc))
        ours[FIRST_FAILED_AT] = _first_failed_at(delivery, now)
        ours[ATTEMPT] = attempt_of(delivery)
    ours.update(
        {REASON: safe_text(reason), ERROR: safe_text(error), FAILED_AT: now, ORIGIN_QUEUE: queue}
    )
    return _copy(delivery, ours)


def _encoded_size(value: Any) -> int | None:
    """Bytes `value` takes in an AMQP field table, or None if it cannot be encoded."""
    try:
        return len(field_table({"k": value}))
    except Exception:
        return None


_INT64 = range(-(2**63), 2**63)


def _surely_fits(headers: Mapping[str, Any], budget: int) -> bool:
    """Whether `headers` certainly encode within `budget` bytes, told without encoding them:
    ASCII keys and texts, 64-bit integers and booleans only (anything else: not known)."""
    total = 4  # the table's length
    for key, value in headers.items():
        if not (type(key) is str and key.isascii() and len(key) <= 128):  # pamqp cuts longer
            return False
        if type(value) is str and value.isascii():
            total += len(key) + len(value) + 6  # key length, key, type, value length, value
        elif (type(value) is int and value in _INT64) or type(value) is bool:
            total += len(key) + 10
        else:
            return False
    return total <= budget


def fit_headers(message: Outgoing, budget: int) -> Outgoing:
    """Make `message`'s headers encodable within `budget` bytes (the frame they travel in).

    The broker closes the whole connection for a header frame over the negotiated `frame_max`,
    so a copy of a message with huge headers would fail every delivery of that connection.
    Headers that do not encode, then the largest ones not amqtask's own, are left off, and their
    names listed in `amqtask-dropped-headers`. Changes `message` in place and returns it.
    """
    if _surely_fits(message.headers, budget):
        return message  # a reply's or a task's few short headers: nothing to measure
    sizes = {key: _encoded_size(value) for key, value in message.headers.items()}
    dropped = [key for key, size in sizes.items() if size is None]
    total = sum(size for size in sizes.values() if size is not None)
    if total > budget:
        foreign = sorted(
            (key for key, size in sizes.items() if size is not None and not key.startswith(_OURS)),
            key=lambda key: sizes[key] or 0,
            reverse=True,
        )
        for key in foreign:
            if total <= budget:
                break
            total -= sizes[key] or 0
            dropped.append(key)
    if not dropped:
        return message
    for key in dropped:
        del message.headers[key]
    message.headers[DROPPED_HEADERS] = safe_text(",".join(dropped), limit=1000)
    if total + 1100 > budget:  # a tiny frame_max: even amqtask's own texts must be cut short
        for key in (TRACEBACK, ERROR):
            if key in message.headers:
                message.headers[key] = safe_text(message.headers[key], limit=200)
    return message


_OURS = "amqtask-"


# --- calls and replies ----------------------------------------------------------------------


def encode_call(
    contract: Contract[Any, Any],
    payload: BaseModel | Mapping[str, Any],
    *,
    reply_to: str,
    timeout: float,
) -> Outgoing:
    """A task message that asks for a reply: its message id doubles as the correlation id.
    A contract with transient calls (`calls="transient"`) gets a transient message.

    Raises `ValidationError`, publishing nothing.
    """
    message = encode_task(contract, payload)
    message.persistent = contract.calls is not Calls.TRANSIENT
    message.correlation_id = message.message_id
    message.reply_to = reply_to
    message.expiration = timeout
    message.headers[DEADLINE] = int((_wallclock.now() + timeout) * 1000)
    return message


def call_expired(delivery: Delivery, now: float | None = None) -> bool:
    """Whether a request's caller has stopped waiting (its `amqtask-deadline` has passed).

    Only a delivery with `reply_to` is a pending call: a dead letter replayed as a plain task
    keeps the header but has no caller left, so it runs.
    """
    if not delivery.reply_to:
        return False
    deadline_ms = header_int((delivery.headers or {}).get(DEADLINE))
    if deadline_ms is None:
        return False
    return (_wallclock.now() if now is None else now) * 1000 > deadline_ms


_adapters: dict[Any, TypeAdapter[Any]] = {}


def _adapter(output: Any) -> TypeAdapter[Any]:
    """A validator for an output model (or any type pydantic knows), built once per type."""
    adapter = _adapters.get(output)
    if adapter is None:
        adapter = _adapters[output] = TypeAdapter(output)
    return adapter


def result_json(contract: Contract[Any, Any], result: Any) -> bytes:
    """A task's result as the output model's JSON (`null` for a contract without one).

    Raises `ValidationError` when the result does not fit the contract's output model.
    """
    if contract.output is None:
        return b"null"
    adapter = _adapter(contract.output)
    return adapter.dump_json(adapter.validate_python(result))


def encode_reply(contract: Contract[Any, Any], result: Any, *, request: Delivery) -> Outgoing:
    """The reply to a call: the result as JSON. Raises `ValidationError` (see `result_json`)."""
    return Outgoing(
        body=result_json(contract, result),
        message_id=new_message_id(),
        headers={TASK: contract.name, VERSION: contract.version},
        correlation_id=request.correlation_id,
    )


def error_reply(
    request: Delivery,
    *,
    reason: str,
    error: str,
    exc: BaseException | None = None,
    traceback: bool = True,
) -> Outgoing:
    """The reply to a call that failed: why in the headers (the same as a dead letter's), no body.

    `error` is the message; with `exc`, its type and (unless `traceback` is false) its trimmed
    traceback are added.
    """
    headers: dict[str, Any] = {REASON: safe_text(reason), ERROR: safe_text(error)}
    task = header_text((request.headers or {}).get(TASK))
    if task is not None:
        headers[TASK] = safe_text(task)
    if exc is not None:
        headers[ERROR_TYPE] = type_name(exc)
        if traceback:
            headers[TRACEBACK] = trimmed_traceback(exc)
    return Outgoing(
        body=b"",
        message_id=new_message_id(),
        headers=headers,
        content_type=None,
        correlation_id=request.correlation_id,
    )


def decode_reply(contract: Contract[Any, Any], delivery: Delivery) -> Any:
    """The call's result from its reply, as the contract's output model (None without one).

    Raises `RemoteError` for an error reply, `InvalidReply` when the result does not fit.
    """
    headers = delivery.headers or {}
    correlation_id = delivery.correlation_id or ""
    reason = header_text(headers.get(REASON))
    if reason is not None:
        error = InvalidReply if reason == Reasons.INVALID_RESULT else RemoteError
        raise error(
            task=contract.name,
            correlation_id=correlation_id,
            reason=reason,
            remote_type=header_text(headers.get(ERROR_TYPE)) or "unknown",
            remote_message=header_text(headers.get(ERROR)) or "",
            remote_traceback=header_text(headers.get(TRACEBACK)) or "",
        )
    if contract.output is None:
        return None
    try:
        return _adapter(contract.output).validate_json(delivery.body)
    except ValidationError as exc:
        raise InvalidReply(
            task=contract.name,
            correlation_id=correlation_id,
            reason=Reasons.INVALID_RESULT,
            remote_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            remote_message=f"the reply does not fit {_name(contract.output)}: {exc}",
        ) from None


def _name(output: Any) -> str:
    return getattr(output, "__name__", repr(output))
