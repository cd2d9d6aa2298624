"""OpenTelemetry trace context travels from send and call to the handler."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import export
from opentelemetry.sdk.trace.export import in_memory_span_exporter as in_memory
from pydantic import BaseModel

import amqtask

from .conftest import AppFactory, running, wait_for


class Job(BaseModel):
    n: int


async def test_the_handler_runs_in_a_span_of_the_senders_trace(
    make_app: AppFactory, unique: str
) -> None:
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    seen: dict[int, int] = {}

    @app.handler(job)
    def handle(task: Job) -> None:  # a thread: the context must follow it there
        seen[task.n] = trace.get_current_span().get_span_context().trace_id

    trace.set_tracer_provider(provider)
    await app.declare()
    async with running(app), make_app([job]) as producer:
        with tracer.start_as_current_span("checkout") as parent:
            await producer.send(job, Job(n=1))
        await wait_for(lambda: 1 in seen)

    assert seen[1] == parent.get_span_context().trace_id
    consumer = next(s for s in exporter.get_finished_spans() if s.name == f"{job.name} process")
    assert consumer.parent is not None
    assert consumer.parent.span_id == parent.get_span_context().span_id
    assert consumer.kind == trace.SpanKind.CONSUMER
