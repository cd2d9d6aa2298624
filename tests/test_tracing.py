"""Unit tests of `amqtask._tracing`: what it costs and writes without an OpenTelemetry SDK.

The spans themselves are tested against the broker (tests/integration/test_tracing.py); the
tracer provider there is set for the whole process, so these tests replace it for their time.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import context, trace

from amqtask import _tracing
from amqtask._exceptions import QueueFull

REMOTE = trace.SpanContext(
    trace_id=0x1234, span_id=0x5678, is_remote=True, trace_flags=trace.TraceFlags(1)
)
TRACEPARENT = "00-00000000000000000000000000001234-0000000000005678-01"


@pytest.fixture(autouse=True)
def no_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process with the OpenTelemetry API and no SDK (whatever other tests set)."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "get_tracer_provider", trace.NoOpTracerProvider)


def send(headers: dict[str, Any]) -> Any:
    return _tracing.start_send(
        headers,
        exchange="amqtask.tasks",
        routing_key="jobs.run.v1",
        destination="jobs.run.v1",
        message_id="m1",
        correlation_id=None,
        task="jobs.run",
        version=1,
        body_size=7,
    )


def test_without_an_sdk_a_send_outside_any_span_makes_no_span_and_adds_no_header() -> None:
    headers: dict[str, Any] = {}

    assert send(headers) is None
    assert headers == {}
    assert not _tracing.recording()


def test_without_an_sdk_a_send_passes_on_the_current_context() -> None:
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(REMOTE)))
    try:
        headers: dict[str, Any] = {}
        assert send(headers) is None
    finally:
        context.detach(token)

    assert headers["traceparent"] == TRACEPARENT


def test_without_an_sdk_a_delivery_gets_a_context_only_when_it_carries_one() -> None:
    assert not _tracing.wanted({"amqtask-task": "jobs.run"})
    assert not _tracing.wanted(None)
    assert _tracing.wanted({"traceparent": TRACEPARENT})


def test_without_an_sdk_the_handler_runs_in_the_context_the_message_carries() -> None:
    with _tracing.processing(
        {"traceparent": TRACEPARENT.encode()},  # AMQP long strings may arrive as bytes
        destination="jobs.run.v1",
        queue="jobs",
        exchange="amqtask.tasks",
        routing_key="jobs.run.v1",
        message_id="m1",
        correlation_id=None,
        task="jobs.run",
        version=1,
        attempt=1,
        body_size=7,
    ) as span:
        inside = trace.get_current_span().get_span_context()

    assert span is None  # nothing records
    assert (inside.trace_id, inside.span_id) == (0x1234, 0x5678)
    assert not trace.get_current_span().get_span_context().is_valid  # detached after


class Boom(Exception):
    pass


def test_error_type_is_the_public_qualified_class_name() -> None:
    assert _tracing.error_type(KeyError("k")) == "KeyError"
    assert _tracing.error_type(QueueFull("full", task="t", message_id="m")) == "amqtask.QueueFull"
    assert _tracing.error_type(Boom()) == f"{__name__}.Boom"
