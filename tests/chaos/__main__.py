"""`python -m tests.chaos --duration 180`: one chaos run, its table, exit 1 if an invariant failed.

Exit codes: 0 every invariant held, 1 one failed (the table says which), 2 usage or the run
itself could not be carried out (no RabbitMQ install for the private node, ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import shutil
import sys
import tempfile
from pathlib import Path

import click
import structlog

from .harness import Config, run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--duration",
    type=click.FloatRange(min=10),
    default=180.0,
    show_default=True,
    help="Seconds of sending and faults (the drain comes after).",
)
@click.option("--seed", type=int, default=None, help="Replay the faults' order and moments.")
@click.option(
    "--broker-restarts",
    type=click.IntRange(min=0),
    default=None,
    help="Broker kill -9 and restart [default: one a minute].",
)
@click.option(
    "--worker-kills",
    type=click.IntRange(min=0),
    default=None,
    help="kill -9 of a worker child [default: one per 30 s].",
)
@click.option(
    "--cuts",
    type=click.IntRange(min=0),
    default=None,
    help="Cuts of every TCP connection [default: one per 22 s].",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=100.0,
    show_default=True,
    help="Sends per second at most, all producer lanes together.",
)
@click.option("--short", is_flag=True, help="The short run of `make test` (ignores the above).")
@click.option("--keep", is_flag=True, help="Keep the run's files even when it passes.")
def main(
    duration: float,
    seed: int | None,
    broker_restarts: int | None,
    worker_kills: int | None,
    cuts: int | None,
    rate: float,
    short: bool,
    keep: bool,
) -> None:
    """Producers and `amqtask worker --processes 2` on a private RabbitMQ node, under random
    broker kills, worker-child kills and TCP cuts; then one table of what every send became.

    \b
    Example:
      python -m tests.chaos --duration 180
      python -m tests.chaos --duration 60 --seed 7 --cuts 10
      python -m tests.chaos --short --seed 7      # the run of `make test`
    """
    if seed is None:
        seed = random.SystemRandom().randrange(1_000_000)
    workdir = Path(tempfile.mkdtemp(prefix="amqtask-chaos-"))
    if short:
        config = dataclasses.replace(Config.short(seed), workdir=workdir)
    else:
        config = Config.long(seed, duration)
        config = dataclasses.replace(
            config,
            broker_restarts=config.broker_restarts if broker_restarts is None else broker_restarts,
            worker_kills=config.worker_kills if worker_kills is None else worker_kills,
            tcp_cuts=config.tcp_cuts if cuts is None else cuts,
            rate=rate,
            workdir=workdir,
        )
    # The producer's own logs (aio-pika's reconnect messages, amqtask's events) go to a file
    # beside the worker's, so the terminal shows the table only.
    harness_log = (workdir / "harness.log").open("a")
    logging.basicConfig(
        stream=harness_log, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(harness_log),
    )
    try:
        result = asyncio.run(run(config))
    except Exception as exc:
        click.echo(f"chaos run could not be carried out: {exc!r} (files: {workdir})", err=True)
        sys.exit(2)
    click.echo(result.report())
    if result.failures():
        sys.exit(1)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
