"""Celery's side: a solo worker (one process) or a prefork pool, and `apply_async` sends.

Set up as the benchmark's amqtask side is: a quorum queue of its own (and a direct exchange of
the same name), persistent messages, acks after the task (`task_acks_late`), publisher confirms
(`confirm_publish`), no result backend. Celery's broadcast chatter is off (no remote control
pidbox, no events, and `work` runs without gossip, mingle and heartbeat), so it declares nothing
beyond the queue and the exchange, which the benchmark deletes afterwards (nor the native delayed
delivery exchanges, see below). The prefetch is
`--prefetch` in all: Celery counts it per pool process (`worker_prefetch_multiplier`), so the
multiplier is `--prefetch` / children, rounded up.
"""

from __future__ import annotations

import math

from celery import Celery
from celery.signals import worker_process_shutdown
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu import Exchange, Queue

from bench.peers import _common

# On quorum queues a Celery worker sets up native delayed delivery (countdown/ETA): 28 exchanges
# and queues named `celery_delayed_*`, shared by every Celery app on the broker, which would
# outlive the run. No task here has a countdown, so the worker leaves that step out.
DelayedDelivery.include_if = lambda self, c: False  # type: ignore[method-assign]

args = _common.parse()
processes = max(args.children, 1)
app = Celery("bench_peer", broker=_common.URL, set_as_current=True)
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_heartbeat=0,
    broker_pool_limit=max(args.in_flight, 10),
    broker_transport_options={"confirm_publish": True},
    task_acks_late=True,
    task_ignore_result=True,
    task_default_queue=args.queue,
    task_default_exchange=args.queue,
    task_default_routing_key=args.queue,
    task_queues=[
        Queue(
            args.queue,
            Exchange(args.queue, type="direct"),
            routing_key=args.queue,
            queue_arguments={"x-queue-type": "quorum"},
        )
    ],
    task_create_missing_queues=False,
    worker_prefetch_multiplier=math.ceil(args.prefetch / processes),
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(n: int, user: str, text: str) -> None:
    _common.timeline.tick()


@app.task(name="bench.cpu")
def cpu(n: int, user: str, text: str) -> None:
    _common.burn_cpu()
    _common.timeline.tick()


@worker_process_shutdown.connect
def _flush(**_: object) -> None:  # pool children leave with os._exit: no atexit
    _common.timeline.flush()


def main() -> None:
    task = cpu if args.workload == "cpu" else noop
    if args.mode == "produce":
        send = lambda n: task.apply_async(kwargs=_common.payload(n))  # noqa: E731
        if args.warmup:
            _common.threaded_sends(args.warmup, args.in_flight, send)
        _common.report(rate=_common.threaded_sends(args.count, args.in_flight, send))
        return
    if args.mode != "work":
        raise SystemExit(f"celery_peer: {args.mode} is not measured for Celery")
    pool = ["--pool", "prefork", "--concurrency", str(args.children)] if args.children else []
    app.worker_main(
        [
            "worker",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *(pool or ["--pool", "solo"]),
        ]
    )


if __name__ == "__main__":
    main()
