"""Unit tests of the worker's metrics (`amqtask._metrics`): label values from fixed sets only."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest
from pydantic import BaseModel

import amqtask
from amqtask._metrics import WorkerMetrics


class Job(BaseModel):
    n: int


JOB = amqtask.contract("jobs.run", Job)
OTHER = amqtask.contract("jobs.other", Job, version=2)


def metrics() -> WorkerMetrics:
    return WorkerMetrics(amqtask.App("amqp://guest:guest@127.0.0.1:5672/", [JOB, OTHER]))


def scrape(metrics: WorkerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_task_names_of_the_apps_contracts_are_labels_of_their_own() -> None:
    m = metrics()
    m.received.labels("jobs.run").inc()
    m.outcome("succeeded", "jobs.other", 0.1, None)
    text = scrape(m)
    assert 'amqtask_tasks_received_total{task="jobs.run"} 1.0' in text
    assert 'amqtask_tasks_succeeded_total{task="jobs.other"} 1.0' in text


def test_every_other_task_name_is_counted_as_unknown() -> None:
    m = metrics()
    for n in range(500):
        m.received.labels(f"made.up.{n}").inc()
        m.outcome("rejected", f"made.up.{n}", 0.0, "unknown_task")
    m.outcome("failed", None, 0.1, None)
    text = scrape(m)
    assert 'amqtask_tasks_received_total{task="unknown"} 500.0' in text
    assert 'amqtask_tasks_dead_lettered_total{reason="unknown_task",task="unknown"} 500.0' in text
    assert 'amqtask_tasks_dead_lettered_total{reason="handler_error",task="unknown"} 1.0' in text
    assert "made.up" not in text


def test_a_reason_amqtask_does_not_define_is_counted_as_other() -> None:
    m = metrics()
    m.outcome("rejected", "jobs.run", 0.0, "anything at all")
    m.outcome("rejected", "jobs.run", 0.0, "rejected")
    text = scrape(m)
    assert 'amqtask_tasks_dead_lettered_total{reason="other",task="jobs.run"} 1.0' in text
    assert 'amqtask_tasks_dead_lettered_total{reason="rejected",task="jobs.run"} 1.0' in text
