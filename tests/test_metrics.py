"""Unit tests of the worker's metrics (`amqtask._metrics`): label values from fixed sets only."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.exposition import generate_latest
from pydantic import BaseModel

import amqtask
from amqtask._metrics import MetricsServer, WorkerMetrics


class Job(BaseModel):
    n: int


JOB = amqtask.contract("jobs.run", Job)
OTHER = amqtask.contract("jobs.other", Job, version=2)


def metrics() -> WorkerMetrics:
    app = amqtask.App("amqp://guest:guest@127.0.0.1:5672/", [JOB, OTHER])

    @app.handler(JOB)
    def run(job: Job) -> None: ...

    return WorkerMetrics(app)


def scrape(metrics: WorkerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_task_names_of_the_apps_contracts_are_labels_of_their_own() -> None:
    m = metrics()
    m.received.labels("jobs.run", "1").inc()
    m.outcome("succeeded", "jobs.other", "2", 0.1, None)
    text = scrape(m)
    assert 'amqtask_tasks_received_total{task="jobs.run",version="1"} 1.0' in text
    assert 'amqtask_tasks_succeeded_total{task="jobs.other",version="2"} 1.0' in text


def test_every_other_task_name_is_counted_as_unknown() -> None:
    m = metrics()
    for n in range(500):
        m.received.labels(f"made.up.{n}", str(100 + n)).inc()
        m.outcome("rejected", f"made.up.{n}", str(100 + n), 0.0, "unknown_task")
    m.outcome("failed", None, None, 0.1, None)
    text = scrape(m)
    assert 'amqtask_tasks_received_total{task="unknown",version="unknown"} 500.0' in text
    dead = 'amqtask_tasks_dead_lettered_total{reason="%s",task="unknown",version="unknown"}'
    assert dead % "unknown_task" + " 500.0" in text
    assert dead % "handler_error" + " 1.0" in text
    assert "made.up" not in text


def test_a_reason_amqtask_does_not_define_is_counted_as_other() -> None:
    m = metrics()
    m.outcome("rejected", "jobs.run", "1", 0.0, "anything at all")
    m.outcome("rejected", "jobs.run", "1", 0.0, "rejected")
    text = scrape(m)
    dead = 'amqtask_tasks_dead_lettered_total{reason="%s",task="jobs.run",version="1"} 1.0'
    assert dead % "other" in text
    assert dead % "rejected" in text


def test_the_series_of_each_handled_contract_exist_at_zero_before_its_first_task() -> None:
    text = scrape(metrics())

    for name in ("received", "succeeded", "failed", "retried"):
        assert f'amqtask_tasks_{name}_total{{task="jobs.run",version="1"}} 0.0' in text
    assert 'amqtask_task_duration_seconds_count{task="jobs.run",version="1"} 0.0' in text
    for reason in ("handler_error", "rejected", "time_limit", "crashed"):
        dead = f'amqtask_tasks_dead_lettered_total{{reason="{reason}",task="jobs.run",version="1"}}'
        assert f"{dead} 0.0" in text
    assert 'task="jobs.other"' not in text  # no handler here: not this worker's to report


def test_two_versions_of_a_task_are_counted_apart() -> None:
    v2 = amqtask.contract("jobs.run", Job, version=2)
    app = amqtask.App("amqp://guest:guest@127.0.0.1:5672/", [JOB, v2])
    m = WorkerMetrics(app)
    m.outcome("succeeded", "jobs.run", "1", 0.1, None)
    m.outcome("succeeded", "jobs.run", "2", 0.1, None)
    m.outcome("succeeded", "jobs.run", "2", 0.1, None)
    text = scrape(m)

    assert 'amqtask_tasks_succeeded_total{task="jobs.run",version="1"} 1.0' in text
    assert 'amqtask_tasks_succeeded_total{task="jobs.run",version="2"} 2.0' in text


def test_the_scrape_has_the_process_metrics() -> None:
    text = scrape(metrics())

    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert re.search(rf"^{name} \d", text, re.MULTILINE), name
    assert "python_info{" in text


def head(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes, str | None]:
    request = urllib.request.Request(f"http://{host}:{port}{path}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read(), response.headers["Content-Length"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Length"]


def test_head_answers_health_and_metrics_without_a_body() -> None:
    m = metrics()
    server = MetricsServer(m, 0, host="127.0.0.1")
    server.start()
    try:
        status, body, length = head(server.port, "/health")
        assert (status, body, length) == (200, b"", "3")
        status, body, length = head(server.port, "/metrics")
        assert status == 200
        assert body == b""
        assert int(length or 0) > 1000
        m.set_connected(False)
        assert head(server.port, "/health")[0] == 200  # within the grace period
        m._lost_since = 0.0  # lost long ago
        assert head(server.port, "/health")[0] == 503
        assert head(server.port, "/nothing")[0] == 404
    finally:
        server.stop()


def test_the_server_binds_the_host_given_ipv6_too() -> None:
    if not socket.has_ipv6:
        raise AssertionError("this machine has no IPv6 support")
    server = MetricsServer(metrics(), 0, host="::1")
    server.start()
    try:
        assert head(server.port, "/health", host="[::1]")[0] == 200
    finally:
        server.stop()


DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana-dashboard.json"


def test_the_grafana_dashboard_queries_only_metrics_the_worker_serves() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    text = scrape(metrics())
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [var["definition"] for var in dashboard["templating"]["list"] if "definition" in var]
    used = {name for expr in exprs for name in re.findall(r"\b(?:amqtask|process)_\w+", expr)}

    assert len(exprs) > 20
    for name in used:
        family = re.sub(r"_(total|bucket|count|sum)$", "", name)
        served = name in families or family in families
        assert served, f"the dashboard queries {name}, which the worker does not serve"
    assert {"amqtask_tasks_succeeded_total", "amqtask_tasks_dead_lettered_total"} <= used
    assert "process_resident_memory_bytes" in used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dashboard["panels"])
