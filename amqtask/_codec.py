"""The one path of a message: encoding, header names and decoding.

Used by `App.send`, `App.call`, the worker and dead-lettering alike, so each header name is
written once.
Header names carry no `x-` prefix: RabbitMQ reserves those for itself (4.x drops client-set ones).
"""

from __future__ import annotations

import os
import time
import traceback as tb
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from amqtask import _tracing
from amqtask._contract import Contract
from amqtask._exceptions import DecodeError, InvalidReply, RemoteError

CONTENT_TYPE = "application/json"

# Headers of a task message.
TASK = "amqtask-task"
VERSION = "amqtask-version"
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

_MAX_HEADER_TEXT = 4000  # keeps a dead letter's headers well under the frame size


class Reasons:
    """Why a message became a dead letter (the `amqtask-reason` header)."""

    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    UNDECODABLE_BODY = "undecodable_body"
    MISSING_TASK_HEADER = "missing_task_header"
    UNKNOWN_TASK = "unknown_task"
    INVALID_PAYLOAD = "invalid_payload"
    INVALID_RESULT = "invalid_result"  # a called handler's return value does not fit `returns`
    HANDLER_ERROR = "handler_error"  # the last attempt failed, or the error is not retried
    REJECTED = "rejected"  # the handler raised `amqtask.Reject`


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
    headers: dict[str, Any] = {TASK: contract.name, VERSION: contract.version}
    _tracing.inject(headers)  # traceparent, when OpenTelemetry is installed and a span is active
    return Outgoing(
        body=orjson.dumps(model.model_dump(mode="json")),
        message_id=message_id or new_message_id(),
        headers=headers,
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


def decode_task(
    delivery: Delivery, contracts: Mapping[tuple[str, int], Contract[Any, Any]]
) -> tuple[Contract[Any, Any], BaseModel]:
    """Find the message's contract and validate its body. Raises `DecodeError`."""
    body = delivery.body
    if delivery.content_type not in (None, "", CONTENT_TYPE):
        raise DecodeError(
            Reasons.UNSUPPORTED_CONTENT_TYPE,
            f"content type {delivery.content_type!r} is not {CONTENT_TYPE!r}",
            body=body,
        )
    headers = delivery.headers or {}
    name = header_text(headers.get(TASK))
    if not name:
        raise DecodeError(
            Reasons.MISSING_TASK_HEADER, f"the message has no {TASK!r} header", body=body
        )
    try:
        version = int(headers.get(VERSION, 1))
    except (TypeError, ValueError):
        raise DecodeError(
            Reasons.UNKNOWN_TASK, f"task {name!r} has an invalid version header", body=body
        ) from None
    contract = contracts.get((name, version))
    if contract is None:
        known = ", ".join(sorted(f"{n} v{v}" for n, v in contracts)) or "none"
        raise DecodeError(
            Reasons.UNKNOWN_TASK,
            f"no handler for task {name!r} v{version} here (handled: {known})",
            body=body,
        )
    try:
        return contract, contract.input.model_validate_json(body)
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


def attempt_of(delivery: Delivery) -> int:
    """Which attempt this delivery is (1 for a task never retried)."""
    try:
        return max(int((delivery.headers or {}).get(ATTEMPT, 1)), 1)
    except (TypeError, ValueError):
        return 1


# Headers the broker adds when it dead-letters. A copy we publish again must not carry them: the
# broker drops a message dead-lettered into a queue already in its x-death history (cycle
# detection), which a retry passing the same delay level a second time would trigger.
_BROKER_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


def _fresh_headers(delivery: Delivery) -> dict[str, Any]:
    return {
        key: value
        for key, value in (delivery.headers or {}).items()
        if not key.startswith(_BROKER_DEATH_HEADERS)
    }


def _failure(headers: dict[str, Any], exc: BaseException) -> None:
    now = datetime.now(UTC).isoformat()
    headers.setdefault(FIRST_FAILED_AT, now)
    headers[FAILED_AT] = now
    headers[ERROR] = f"{type(exc).__name__}: {exc}"[:_MAX_HEADER_TEXT]
    headers[ERROR_TYPE] = f"{type(exc).__module__}.{type(exc).__qualname__}"
    headers[TRACEBACK] = trimmed_traceback(exc)


def retry_copy(delivery: Delivery, *, attempt: int, exc: BaseException) -> Outgoing:
    """A copy of a failed delivery for attempt number `attempt`, with the failure recorded.

    Body and message id are kept, so the retried task is the same task to an idempotent handler.
    """
    headers = _fresh_headers(delivery)
    _failure(headers, exc)
    headers[ATTEMPT] = attempt
    return Outgoing(
        body=delivery.body,
        message_id=delivery.message_id or new_message_id(),
        headers=headers,
        content_type=delivery.content_type,
        correlation_id=delivery.correlation_id,
    )


def trimmed_traceback(exc: BaseException, limit: int = _MAX_HEADER_TEXT) -> str:
    """The exception's traceback, keeping its end (where it was raised) within `limit`."""
    text = "".join(tb.format_exception(exc))
    return text if len(text) <= limit else "...\n" + text[-(limit - 4) :]


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
    headers = _fresh_headers(delivery)
    if exc is not None:
        _failure(headers, exc)
        headers[ATTEMPT] = attempt_of(delivery)
    headers.update(
        {
            REASON: reason,
            ERROR: error[:_MAX_HEADER_TEXT],
            FAILED_AT: datetime.now(UTC).isoformat(),
            ORIGIN_QUEUE: queue,
        }
    )
    return Outgoing(
        body=delivery.body,
        message_id=delivery.message_id or new_message_id(),
        headers=headers,
        content_type=delivery.content_type,
        correlation_id=delivery.correlation_id,
    )


# --- calls and replies ----------------------------------------------------------------------


def encode_call(
    contract: Contract[Any, Any],
    payload: BaseModel | Mapping[str, Any],
    *,
    reply_to: str,
    timeout: float,
) -> Outgoing:
    """A task message that asks for a reply: its message id doubles as the correlation id.

    Raises `ValidationError`, publishing nothing.
    """
    message = encode_task(contract, payload)
    message.correlation_id = message.message_id
    message.reply_to = reply_to
    message.expiration = timeout
    message.headers[DEADLINE] = int((time.time() + timeout) * 1000)
    return message


def call_expired(delivery: Delivery, now: float | None = None) -> bool:
    """Whether a request's caller has stopped waiting (its `amqtask-deadline` has passed).

    Only a delivery with `reply_to` is a pending call: a dead letter replayed as a plain task
    keeps the header but has no caller left, so it runs.
    """
    if not delivery.reply_to:
        return False
    try:
        deadline_ms = int((delivery.headers or {})[DEADLINE])
    except (KeyError, TypeError, ValueError):
        return False
    return (time.time() if now is None else now) * 1000 > deadline_ms


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
    headers: dict[str, Any] = {REASON: reason, ERROR: error[:_MAX_HEADER_TEXT]}
    task = (request.headers or {}).get(TASK)
    if task is not None:
        headers[TASK] = header_text(task)
    if exc is not None:
        headers[ERROR_TYPE] = f"{type(exc).__module__}.{type(exc).__qualname__}"
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
