"""Dramatiq's side: one worker process with its threads, and `send` from threads.

`RabbitmqBroker(confirm_delivery=True)`: persistent messages and publisher confirms. Dramatiq
declares its queue (classic: its arguments are its own) with a delay queue (`.DQ`) and a dead
letter queue (`.XQ`), which the benchmark deletes afterwards. The worker runs in this process
(`dramatiq.Worker`, as the `dramatiq` command's worker processes do) with `--prefetch` / 2
threads: Dramatiq prefetches two messages per thread, so `--prefetch` messages in all (its
default is 8 threads). It acks after the actor returns.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.peers import _common

args = _common.parse()
broker = RabbitmqBroker(url=_common.URL, confirm_delivery=True)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=args.queue, actor_name="noop", max_retries=0)
def noop(n: int, user: str, text: str) -> None:
    _common.timeline.tick()


@dramatiq.actor(queue_name=args.queue, actor_name="cpu", max_retries=0)
def cpu(n: int, user: str, text: str) -> None:
    _common.burn_cpu()
    _common.timeline.tick()


def main() -> None:
    actor = cpu if args.workload == "cpu" else noop
    if args.mode == "produce":
        send = lambda n: actor.send(**_common.payload(n))  # noqa: E731
        if args.warmup:
            _common.threaded_sends(args.warmup, args.in_flight, send)
        _common.report(rate=_common.threaded_sends(args.count, args.in_flight, send))
        broker.close()
        return
    if args.mode != "work":
        raise SystemExit(f"dramatiq_peer: {args.mode} is not measured for Dramatiq")
    stop = _common.until_signalled()
    worker = dramatiq.Worker(broker, worker_threads=max(1, args.prefetch // 2))
    worker.start()
    stop.wait()
    worker.stop()
    broker.close()


if __name__ == "__main__":
    main()
