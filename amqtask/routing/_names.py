"""Every broker name amqtask uses, computed here and nowhere else.

The convention (also in the README):

    {namespace}.tasks        direct exchange; tasks are published with routing key {task}.v{version}
    {queue}                  a contract's work queue (default: the task name, `.v{N}` from v2 on)
    {namespace}.dead         direct exchange for dead letters, routing key = the work queue's name
    {queue}.dead             the work queue's dead-letter queue
    {queue}.calls            the work queue's call queue, for contracts with transient calls:
                             classic, holding transient requests routed by
                             {task}.v{version}.call; consumed by the same workers
    {queue}.due              the work queue's due queue: delayed sends and retries whose delay is
                             over, consumed by the same workers; never bounded, so the delay
                             levels' last hop is never refused (see `amqtask.topology._model`)
    {namespace}.delay.{k}    topic exchange and quorum queue of delay level k (TTL 2**k s),
                             k = 0..19; see `amqtask.routing._delay`
    {namespace}.delay.deliver  topic exchange that hands delayed messages to their due queue
    {namespace}.scheduler    quorum queue, single active consumer: the schedulers' lease and the
                             state of the app's schedules (see `amqtask._scheduler`)
    {namespace}.revoke       fanout exchange of revocations (apps with a task store); each
                             worker binds an exclusive, auto-delete queue of its own to it
    {namespace}.control      fanout exchange of requests to running workers (`inspect`); each
                             worker binds an exclusive, auto-delete queue of its own to it and
                             answers on the requester's direct reply-to (see `amqtask._control`)

`namespace` defaults to "amqtask"; apps that share a broker but must not share exchanges (tests,
tenants) pick their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtask.routing._delay import DELAY_LEVELS

DEFAULT_NAMESPACE = "amqtask"


def routing_key(task: str, version: int) -> str:
    """Routing key of a task's messages on the task exchange."""
    return f"{task}.v{version}"


def default_queue_name(task: str, version: int) -> str:
    """Work queue of a contract that names none: version 1 keeps the bare task name."""
    return task if version == 1 else f"{task}.v{version}"


def dead_letter_queue_name(queue: str) -> str:
    """Dead-letter queue that collects what `queue` rejects."""
    return f"{queue}.dead"


def due_queue_name(queue: str) -> str:
    """Due queue of work queue `queue`: where its delayed sends and retries arrive."""
    return f"{queue}.due"


def call_queue_name(queue: str) -> str:
    """Call queue of work queue `queue`: where the requests of its transient calls wait."""
    return f"{queue}.calls"


def call_routing_key(task: str, version: int) -> str:
    """Routing key of a transient call's request on the task exchange (to the call queue)."""
    return f"{routing_key(task, version)}.call"


@dataclass(frozen=True, slots=True)
class Names:
    """Exchange names of one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def task_exchange(self) -> str:
        return f"{self.namespace}.tasks"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dead"

    def delay_level(self, level: int) -> str:
        """Name of delay level `level`'s exchange and of its queue (one of each)."""
        return f"{self.namespace}.delay.{level}"

    @property
    def delay_entry_exchange(self) -> str:
        """Where a delayed message is published: the highest level."""
        return self.delay_level(DELAY_LEVELS - 1)

    @property
    def delay_deliver_exchange(self) -> str:
        return f"{self.namespace}.delay.deliver"

    @property
    def revoke_exchange(self) -> str:
        """Fanout exchange that carries `App.revoke` to every running worker."""
        return f"{self.namespace}.revoke"

    @property
    def control_exchange(self) -> str:
        """Fanout exchange that carries requests (`inspect`) to every running worker."""
        return f"{self.namespace}.control"

    @property
    def scheduler_queue(self) -> str:
        """The schedulers' lease and the schedules' state (apps with schedules)."""
        return f"{self.namespace}.scheduler"

    def after_level(self, level: int) -> str:
        """The exchange a message goes to once level `level` is done with it."""
        return self.delay_level(level - 1) if level > 0 else self.delay_deliver_exchange
