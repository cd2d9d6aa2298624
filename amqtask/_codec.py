"""The one path of a message: encoding, header names and decoding.

Used by `App.send`, the worker and dead-lettering alike, so each header name is written once.
Header names carry no `x-` prefix: RabbitMQ reserves those for itself (4.x drops client-set ones).
"""

from __future__ import annotations

import traceback as tb
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from pydantic import BaseModel, ValidationError

from amqtask._contract import Contract
from amqtask._exceptions import DecodeError

CONTENT_TYPE = "application/json"

# Headers of a task message.
TASK = "amqtask-task"
VERSION = "amqtask-version"
# Headers amqtask adds to a dead letter.
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
    HANDLER_ERROR = "handler_error"


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
    return uuid.uuid4().hex


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
    return Outgoing(
        body=orjson.dumps(model.model_dump(mode="json")),
        message_id=message_id or new_message_id(),
        headers={TASK: contract.name, VERSION: contract.version},
    )


def header_text(value: Any) -> str | None:
    """A header value as text (AMQP long strings may arrive as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


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

    The body and message id are kept byte for byte, so it can be inspected and replayed.
    """
    headers = dict(delivery.headers or {})
    headers.update(
        {
            REASON: reason,
            ERROR: error[:_MAX_HEADER_TEXT],
            FAILED_AT: datetime.now(UTC).isoformat(),
            ORIGIN_QUEUE: queue,
        }
    )
    if exc is not None:
        headers[ERROR_TYPE] = f"{type(exc).__module__}.{type(exc).__qualname__}"
        headers[TRACEBACK] = trimmed_traceback(exc)
    return Outgoing(
        body=delivery.body,
        message_id=delivery.message_id or new_message_id(),
        headers=headers,
        content_type=delivery.content_type,
        correlation_id=delivery.correlation_id,
    )
