"""OpenTelemetry spans by the messaging semantic conventions, when OpenTelemetry is installed.

`send` and `call` run in a PRODUCER span, `send {destination}`, whose context travels in the
message headers (`traceparent`, `tracestate`); the worker runs each delivery, handler and
settling both, in a CONSUMER span, `process {destination}`, in that trace and linked to the
producer's span. `{destination}` is the task's routing key (`images.resize.v1`), whatever
exchange a delay or a retry routes it through. Retries, dead letters and releases are events on
the process span; a retried or dead-lettered copy carries the process span's context, so the next
attempt (or a replay) continues the same trace.

Attributes follow the conventions for RabbitMQ: `messaging.system`, `messaging.destination.name`
(the exchange, empty for the default one), `messaging.rabbitmq.destination.routing_key`,
`messaging.operation.type` and `.name`, `messaging.message.id`,
`messaging.message.conversation_id` (calls), `messaging.destination.subscription.name` (the work
queue) and `error.type` on failure; amqtask adds `amqtask.task.name`, `amqtask.task.version` and
`amqtask.attempt`.

Without the `opentelemetry-api` package (the `otel` extra) nothing here runs. Without an SDK
(no tracer provider configured) no span is made: `send` only passes on a context already
current, and the worker makes a span only to carry a received context on to the handler.
When `opentelemetry-instrumentation-aio-pika` wraps the consumer callback, its CONSUMER span is
current when a delivery arrives; amqtask's process span then becomes its child, so one delivery
makes one trace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised where OpenTelemetry is absent
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]
    otel_context = None  # type: ignore[assignment]

ENABLED = propagate is not None
# Tracer providers of a process without an OpenTelemetry SDK: their spans record nothing.
_NO_SDK = () if trace is None else (trace.ProxyTracerProvider, trace.NoOpTracerProvider)

# Attribute names of the messaging conventions (not imported: the semconv package is optional).
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
SUBSCRIPTION = "messaging.destination.subscription.name"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
BODY_SIZE = "messaging.message.body.size"
ERROR_TYPE = "error.type"
TASK_NAME = "amqtask.task.name"
TASK_VERSION = "amqtask.task.version"
ATTEMPT = "amqtask.attempt"

_tracers: dict[object, Any] = {}


def _tracer() -> Any:
    """amqtask's tracer of the current provider (set once per process, usually)."""
    provider = trace.get_tracer_provider()
    tracer = _tracers.get(provider)
    if tracer is None:
        try:
            from importlib.metadata import version

            ours = version("amqtask")
        except Exception:
            ours = None
        tracer = _tracers[provider] = trace.get_tracer("amqtask", ours)
    return tracer


# `trace.get_tracer_provider()` looks the environment up on each call while no provider is set
# (about 1 us, on every send and task); the API's global is read directly where it exists.
_GLOBAL = trace is not None and hasattr(trace, "_TRACER_PROVIDER")
_FROM_ENVIRONMENT = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def recording() -> bool:
    """Whether spans record: OpenTelemetry is installed and an SDK tracer provider is set."""
    if trace is None:
        return False
    provider = trace._TRACER_PROVIDER if _GLOBAL else None
    if provider is None:
        if _GLOBAL and not _FROM_ENVIRONMENT:
            return False  # none set: the proxy provider, which records nothing
        provider = trace.get_tracer_provider()
    return not isinstance(provider, _NO_SDK)


_fields: tuple[object, tuple[str, ...]] = (None, ())


def _context_fields() -> tuple[str, ...]:
    """The header names the global propagator reads (`traceparent`, `tracestate`, `baggage`)."""
    global _fields
    textmap = propagate.get_global_textmap()
    if _fields[0] is not textmap:
        _fields = (textmap, tuple(textmap.fields))
    return _fields[1]


def error_type(exc: BaseException) -> str:
    """`error.type` of an exception: its qualified class name (`amqtask.QueueFull`, `KeyError`)."""
    kind = type(exc)
    module = kind.__module__
    if module.startswith("amqtask._"):
        module = "amqtask"  # the public name, not the private module
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the current trace context into `headers` (nothing without an active span)."""
    if propagate is not None:
        propagate.inject(headers)


def start_send(
    headers: MutableMapping[str, Any],
    *,
    exchange: str,
    routing_key: str,
    destination: str,
    message_id: str,
    correlation_id: str | None,
    task: str,
    version: int,
    body_size: int,
) -> Any:
    """Start the PRODUCER span of a send or a call and write its context into `headers`.

    Without an SDK, no span: the current context (if any) is written and None returned. End the
    span with `end`.
    """
    if not recording():
        propagate.inject(headers)
        return None
    attributes: dict[str, Any] = {
        SYSTEM: "rabbitmq",
        DESTINATION: exchange,
        ROUTING_KEY: routing_key,
        OPERATION_TYPE: "send",
        OPERATION_NAME: "send",
        MESSAGE_ID: message_id,
        BODY_SIZE: body_size,
        TASK_NAME: task,
        TASK_VERSION: version,
    }
    if correlation_id is not None:
        attributes[CONVERSATION_ID] = correlation_id
    span = _tracer().start_span(
        f"send {destination}", kind=trace.SpanKind.PRODUCER, attributes=attributes
    )
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return span


def end(span: Any, exc: BaseException | None = None) -> None:
    """End a span from `start_send`; with `exc`, as failed (`error.type`, the exception)."""
    if span is None:
        return
    if exc is not None:
        fail(span, error_type(exc), exc)
    span.end()


def fail(span: Any, kind: str, exc: BaseException | None = None, detail: str = "") -> None:
    """Mark `span` failed with `error.type` `kind`, recording `exc` when given."""
    span.set_attribute(ERROR_TYPE, kind)
    if exc is not None:
        span.record_exception(exc)
    description = detail or (f"{type(exc).__name__}: {exc}" if exc is not None else kind)
    span.set_status(trace.Status(trace.StatusCode.ERROR, description[:1000]))


def wanted(headers: Mapping[str, Any] | None) -> bool:
    """Whether a delivery with `headers` gets a process span: spans record, or the message
    carries a trace context to pass on to the handler."""
    if not ENABLED:
        return False
    return recording() or bool(headers and any(key in headers for key in _context_fields()))


def _carrier(headers: Mapping[str, Any]) -> dict[str, str]:
    # Only the text values a propagator can read: a header of any other AMQP type (a table, a
    # number) is left out rather than handed to code that expects a string.
    carrier = {}
    for key in _context_fields():
        value = headers.get(key)
        if isinstance(value, bytes | bytearray):
            carrier[key] = bytes(value).decode("utf-8", "replace")
        elif isinstance(value, str):
            carrier[key] = value
    return carrier


@contextlib.contextmanager
def processing(
    headers: Mapping[str, Any],
    *,
    destination: str,
    queue: str,
    exchange: str | None,
    routing_key: str | None,
    message_id: str | None,
    correlation_id: str | None,
    task: str | None,
    version: int | None,
    attempt: int,
    body_size: int,
) -> Iterator[Any]:
    """Run the body (handler and settling) in the CONSUMER span `process {destination}`,
    current, so the handler's own spans are its children; yields the span, or None.

    Its parent is the context the message carries, or the CONSUMER span of an instrumentation
    that wraps the consumer callback (same trace); it is linked to the producer's span. Without
    an SDK and with no context in the message, no span at all (its cost is several microseconds
    a task).
    """
    if not wanted(headers):
        yield None
        return
    sdk = recording()
    carried = propagate.extract(_carrier(headers))
    sent = trace.get_current_span(carried).get_span_context()
    current = trace.get_current_span()
    around = current.get_span_context()
    parent = carried
    if (
        around.is_valid
        and getattr(current, "kind", None) is trace.SpanKind.CONSUMER
        and (not sent.is_valid or sent.trace_id == around.trace_id)
    ):
        parent = otel_context.get_current()  # the instrumentation's receive span
    if not sdk:
        # Nothing records: only carry the received context on to what the handler sends.
        token = otel_context.attach(parent)
        try:
            yield None
        finally:
            otel_context.detach(token)
        return
    attributes: dict[str, Any] = {
        SYSTEM: "rabbitmq",
        SUBSCRIPTION: queue,
        OPERATION_TYPE: "process",
        OPERATION_NAME: "process",
        BODY_SIZE: body_size,
        ATTEMPT: attempt,
    }
    optional = {
        DESTINATION: exchange,
        ROUTING_KEY: routing_key or None,
        MESSAGE_ID: message_id,
        CONVERSATION_ID: correlation_id,
        TASK_NAME: task,
        TASK_VERSION: version,
    }
    attributes.update((key, value) for key, value in optional.items() if value is not None)
    links = [trace.Link(sent)] if sent.is_valid else None
    with _tracer().start_as_current_span(
        f"process {destination}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def settled(
    span: Any,
    outcome: str,
    details: Mapping[str, Any],
    *,
    error: str | None = None,
    exc: BaseException | None = None,
) -> None:
    """Record on a process span how its delivery ended: an event for a retry, a dead letter, a
    release or an expired call, and the error (`error.type` is `error`, the failure's type or
    reason code) for every outcome but success."""
    if span is None:
        return
    if outcome not in ("succeeded", "expired") and error is not None:
        fail(span, error, exc, str(details.get("error", "")))
    if outcome == "retried":
        span.add_event(
            "amqtask.retry",
            {
                "amqtask.retry.attempt": int(details.get("attempt", 0)) + 1,
                "amqtask.retry.delay_s": float(details.get("retry_in_s", 0)),
            },
        )
    elif outcome in ("failed", "rejected"):
        span.add_event(
            "amqtask.dead_letter", {"amqtask.reason": str(details.get("reason", "unknown"))}
        )
    elif outcome == "released":
        span.add_event("amqtask.released")
    elif outcome == "expired":
        span.add_event("amqtask.call_expired")
