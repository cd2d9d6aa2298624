"""OpenTelemetry trace context across the broker, when OpenTelemetry is installed.

`send` and `call` inject the current context (`traceparent`, `tracestate`) into the message
headers; the worker runs the handler in a consumer span whose parent is that context. Without
the `opentelemetry-api` package (the `otel` extra) both are no-ops: no hard dependency.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

try:
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised where OpenTelemetry is absent
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

ENABLED = propagate is not None
# Tracer providers of a process without an OpenTelemetry SDK: their spans record nothing.
_NO_SDK = () if trace is None else (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the current trace context into `headers` (nothing without an active span)."""
    if propagate is not None:
        propagate.inject(headers)


@contextlib.contextmanager
def consumer_span(headers: Mapping[str, Any], task: str) -> Iterator[None]:
    """Run the body in a CONSUMER span continuing the trace the message carries."""
    if propagate is None or trace is None:
        yield
        return
    no_sdk = isinstance(trace.get_tracer_provider(), _NO_SDK)
    if no_sdk and not propagate.get_global_textmap().fields & headers.keys():
        # The span would record nothing and carry no trace on: skip its cost (several
        # microseconds a task).
        yield
        return
    carrier = {
        k: bytes(v).decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else v
        for k, v in headers.items()
    }
    parent = propagate.extract(carrier)
    tracer = trace.get_tracer("amqtask")
    with tracer.start_as_current_span(
        f"{task} process",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={"messaging.system": "rabbitmq", "messaging.operation": "process"},
    ):
        yield
