"""OpenTelemetry spans by the messaging conventions, from send and call to the handler and its
retries, with and without opentelemetry-instrumentation-aio-pika."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.aio_pika import AioPikaInstrumentor
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import ReadableSpan, export
from opentelemetry.sdk.trace.export import in_memory_span_exporter as in_memory
from pydantic import BaseModel

import amqtask

from .conftest import AppFactory, dead_letters, running, wait_for

_EXPORTER = in_memory.InMemorySpanExporter()
_PROVIDER = sdk_trace.TracerProvider()
_PROVIDER.add_span_processor(export.SimpleSpanProcessor(_EXPORTER))


class Job(BaseModel):
    n: int


@pytest.fixture
def spans() -> Iterator[in_memory.InMemorySpanExporter]:
    """The process's tracer provider (set once: OpenTelemetry refuses to replace it), with the
    spans of this test only."""
    if trace.get_tracer_provider() is not _PROVIDER:
        trace.set_tracer_provider(_PROVIDER)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def named(exporter: in_memory.InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def context(span: ReadableSpan) -> Any:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx


async def test_send_makes_a_producer_span_and_the_worker_a_linked_process_span_in_its_trace(
    make_app: AppFactory, unique: str, spans: in_memory.InMemorySpanExporter
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    tracer = trace.get_tracer("test")
    seen: dict[int, Any] = {}

    @app.handler(job)
    def handle(task: Job) -> None:  # a thread: the context must follow it there
        with tracer.start_as_current_span("work") as work:
            seen[task.n] = work.get_span_context()

    await app.declare()
    async with running(app), make_app([job]) as producer:
        with tracer.start_as_current_span("checkout") as parent:
            message_id = await producer.send(job, Job(n=1))
        await producer.send(job, Job(n=2))  # outside any span: still one trace
        await wait_for(lambda: len(named(spans, f"process {job.routing_key}")) == 2)

    (send_1, send_2) = named(spans, f"send {job.routing_key}")
    assert send_1.kind is trace.SpanKind.PRODUCER
    assert send_1.parent is not None
    assert send_1.parent.span_id == parent.get_span_context().span_id
    assert send_2.parent is None  # a root: a send outside any span starts the trace
    assert dict(send_1.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": app.names.task_exchange,
        "messaging.rabbitmq.destination.routing_key": job.routing_key,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.message.id": message_id,
        "messaging.message.body.size": len(b'{"n":1}'),
        "amqtask.task.name": job.name,
        "amqtask.task.version": 1,
    }
    by_trace = {context(s).trace_id: s for s in named(spans, f"process {job.routing_key}")}
    for send, n in ((send_1, 1), (send_2, 2)):
        process = by_trace[context(send).trace_id]
        assert process.kind is trace.SpanKind.CONSUMER
        assert process.parent is not None
        assert process.parent.span_id == context(send).span_id
        assert [link.context.span_id for link in process.links] == [context(send).span_id]
        assert seen[n].trace_id == context(send).trace_id  # the handler's span, in the trace
        (work,) = [s for s in named(spans, "work") if context(s).span_id == seen[n].span_id]
        assert work.parent is not None
        assert work.parent.span_id == context(process).span_id
        attributes = process.attributes or {}
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.subscription.name"] == job.queue
        assert attributes["messaging.rabbitmq.destination.routing_key"] == job.routing_key
        assert attributes["amqtask.attempt"] == 1
        assert "messaging.operation" not in attributes  # deprecated
        assert "error.type" not in attributes
    assert by_trace[context(send_1).trace_id].attributes["messaging.message.id"] == message_id


async def test_a_call_is_one_producer_span_around_the_workers_process_span(
    make_app: AppFactory, unique: str, spans: in_memory.InMemorySpanExporter
) -> None:
    double = amqtask.contract(f"{unique}.double", Job, returns=int)
    broken = amqtask.contract(f"{unique}.broken", Job, returns=int)
    app = make_app([double, broken])

    @app.handler(double)
    async def twice(task: Job) -> int:
        return task.n * 2

    @app.handler(broken)
    async def fail(task: Job) -> int:
        raise KeyError("missing")

    await app.declare()
    async with running(app), make_app([double, broken]) as caller:
        assert await caller.call(double, Job(n=21), timeout=10) == 42
        with pytest.raises(amqtask.RemoteError):
            await caller.call(broken, Job(n=1), timeout=10)

    (call,) = named(spans, f"send {double.routing_key}")
    (process,) = named(spans, f"process {double.routing_key}")
    assert call.kind is trace.SpanKind.PRODUCER
    conversation = (call.attributes or {})["messaging.message.conversation_id"]
    assert conversation == (call.attributes or {})["messaging.message.id"]
    assert process.parent is not None
    assert process.parent.span_id == context(call).span_id
    assert (process.attributes or {})["messaging.message.conversation_id"] == conversation
    # The call's span lasts until the reply, sent while the worker's span is still open.
    assert call.end_time is not None
    assert process.start_time is not None
    assert call.end_time > process.start_time

    (failed_call,) = named(spans, f"send {broken.routing_key}")
    (failed,) = named(spans, f"process {broken.routing_key}")
    assert (failed.attributes or {})["error.type"] == "KeyError"
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception", "amqtask.dead_letter"]
    assert (failed_call.attributes or {})["error.type"] == "amqtask.RemoteError"
    assert failed_call.status.status_code is trace.StatusCode.ERROR


async def test_retries_and_the_dead_letter_appear_in_the_senders_trace(
    make_app: AppFactory, unique: str, spans: in_memory.InMemorySpanExporter, amqp: Any
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=2, initial=1.0))
    app = make_app([job])

    @app.handler(job)
    async def handle(task: Job) -> None:
        raise RuntimeError("always fails")

    await app.declare()
    async with running(app), make_app([job]) as producer:
        await producer.send(job, Job(n=1))
        await wait_for(lambda: len(named(spans, f"process {job.routing_key}")) == 2)
    await dead_letters(amqp, job.queue, 1)

    (send,) = named(spans, f"send {job.routing_key}")
    first, second = sorted(
        named(spans, f"process {job.routing_key}"),
        key=lambda s: (s.attributes or {})["amqtask.attempt"],
    )
    assert {context(s).trace_id for s in (send, first, second)} == {context(send).trace_id}
    retry = next(e for e in first.events if e.name == "amqtask.retry")
    assert dict(retry.attributes or {}) == {
        "amqtask.retry.attempt": 2,
        "amqtask.retry.delay_s": 1.0,
    }
    assert (first.attributes or {})["error.type"] == "RuntimeError"
    # The retry carries the first attempt's context: the second is its child.
    assert second.parent is not None
    assert second.parent.span_id == context(first).span_id
    dead = next(e for e in second.events if e.name == "amqtask.dead_letter")
    assert dict(dead.attributes or {}) == {"amqtask.reason": "handler_error"}
    assert (second.attributes or {})["amqtask.attempt"] == 2


async def test_with_the_aio_pika_instrumentation_one_delivery_makes_one_trace(
    make_app: AppFactory, unique: str, spans: in_memory.InMemorySpanExporter
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    tracer = trace.get_tracer("test")
    seen: list[Any] = []

    @app.handler(job)
    async def handle(task: Job) -> None:
        with tracer.start_as_current_span("work") as work:
            seen.append(work.get_span_context())

    await app.declare()
    instrumentor = AioPikaInstrumentor()
    instrumentor.instrument(tracer_provider=_PROVIDER)
    try:
        async with running(app), make_app([job]) as producer:
            await producer.send(job, Job(n=1))  # no span around it
            await wait_for(lambda: len(seen) == 1)
            await wait_for(lambda: named(spans, f"process {job.routing_key}"))
    finally:
        instrumentor.uninstrument()

    (send,) = named(spans, f"send {job.routing_key}")
    (process,) = named(spans, f"process {job.routing_key}")
    received = [
        s
        for s in spans.get_finished_spans()
        if s.instrumentation_scope is not None
        and s.instrumentation_scope.name == "opentelemetry.instrumentation.aio_pika"
    ]
    assert received, "the instrumentation made no span: is it still wrapping Queue.consume?"
    traces = {context(s).trace_id for s in [send, process, *received]} | {seen[0].trace_id}
    assert traces == {context(send).trace_id}  # one trace, started by the send
    (receive,) = received
    assert receive.kind is trace.SpanKind.CONSUMER
    # amqtask's process span is the one around the handler, inside the instrumentation's.
    assert process.parent is not None
    assert process.parent.span_id == context(receive).span_id
    (work,) = named(spans, "work")
    assert work.parent is not None
    assert work.parent.span_id == context(process).span_id
