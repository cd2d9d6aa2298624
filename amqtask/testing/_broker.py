"""The in-memory broker: the RabbitMQ behaviour amqtask relies on, for the topology it declares.

Nothing here knows about tasks, retries or delays: the broker holds exchanges, queues and
bindings as `topology.derive` made them (through `App.declare`) and acts on their arguments the
way RabbitMQ 3.10 does:

- direct and topic exchanges, exchange-to-exchange bindings (each queue gets a message once),
  the default exchange, and direct reply-to addresses;
- `mandatory` publishing (no route: `Unroutable`) and confirms (a full `reject-publish` queue:
  `PublishNacked`);
- `x-message-ttl` and a message's `expiration`, expiring at the head of the queue only;
- dead-lettering to `x-dead-letter-exchange` with `x-dead-letter-routing-key` (else the message's
  own key) for rejected, expired and `maxlen` messages, with `x-death` and `x-first-death-*`
  headers, and RabbitMQ's cycle detection;
- `x-max-length` with `x-overflow` `reject-publish` or `drop-head` (counting ready messages; a
  quorum queue refuses a publish only once it is over its limit, so it holds one more);
- consumers with manual acks and a prefetch each (0: no limit), round robin, or only the
  earliest one on an `x-single-active-consumer` queue (the next takes over when it goes);
  requeue at the head with `redelivered`; on quorum queues `x-delivery-count` and
  `x-delivery-limit`;
- fanout exchanges, and exclusive auto-delete queues that go with their connection (or AMQP
  channel).

Headers go through the AMQP field-table encoding both ways (see `_messages`). Time-based events
(TTLs) are event-loop timers, so they follow the virtual clock.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aio_pika.exceptions
import aiormq.exceptions
import structlog

from amqtask import _wallclock
from amqtask import topology as topo
from amqtask._codec import Outgoing
from amqtask._exceptions import (
    Conflict,
    PublishNacked,
    TopologyConflict,
    TopologyMissing,
    Unroutable,
)
from amqtask.testing._messages import (
    DIRECT_REPLY_TO,
    Crash,
    MemoryDelivery,
    Message,
    StoredMessage,
    wire_headers,
)

log = structlog.get_logger("amqtask.testing")

_FRAME_MAX = 131072  # RabbitMQ's default frame_max
HEADER_BUDGET = _FRAME_MAX - 4096  # what the aio-pika transport allows a message's headers


@dataclass(eq=False, slots=True)
class _Consumer:
    queue: _Queue
    deliver: Callable[[MemoryDelivery], None]
    prefetch: int
    owner: object
    unacked: dict[int, MemoryDelivery] = field(default_factory=dict)
    active: bool = True


class _Queue:
    def __init__(self, spec: topo.Queue) -> None:
        self.spec = spec
        self.name = spec.name
        args = dict(spec.arguments)
        self.quorum = args.get("x-queue-type") == "quorum"
        ttl = args.get("x-message-ttl")
        self.ttl = None if ttl is None else int(ttl) / 1000
        dlx = args.get("x-dead-letter-exchange")
        self.dead_letter_exchange = None if dlx is None else str(dlx)
        dlrk = args.get("x-dead-letter-routing-key")
        self.dead_letter_routing_key = None if dlrk is None else str(dlrk)
        max_length = args.get("x-max-length")
        self.max_length = None if max_length is None else int(max_length)
        self.overflow = str(args.get("x-overflow", "drop-head"))
        limit = args.get("x-delivery-limit")
        self.delivery_limit = None if limit is None or not self.quorum else int(limit)
        self.single_active = args.get("x-single-active-consumer") is True
        self.ready: deque[StoredMessage] = deque()
        self.consumers: list[_Consumer] = []
        self.turn = 0  # round robin over consumers
        self.timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Exchange:
    spec: topo.Exchange
    bindings: list[topo.Binding] = field(default_factory=list)


@dataclass(slots=True)
class _Failure:
    make: Callable[[str, str], BaseException]  # (task, message id) -> the error
    task: str | None
    stored: bool


@functools.lru_cache(maxsize=8192)
def topic_matches(pattern: str, key: str) -> bool:
    """Whether topic routing `key` matches binding `pattern` (`*` one word, `#` zero or more)."""
    words, parts = pattern.split("."), key.split(".")
    # reachable[j]: the pattern so far can match the first j words of the key
    reachable = [True] + [False] * len(parts)
    for word in words:
        if word == "#":
            for j in range(1, len(parts) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [
                reachable[j - 1] and (word == "*" or word == parts[j - 1])
                for j in range(1, len(parts) + 1)
            ]
    return reachable[len(parts)]


def _has_room(consumer: _Consumer) -> bool:
    """Whether `consumer` may take another delivery: a prefetch of 0 means no limit (AMQP)."""
    return consumer.prefetch == 0 or len(consumer.unacked) < consumer.prefetch


def _is_cycle(queue: str, deaths: Sequence[Mapping[str, Any]]) -> bool:
    """RabbitMQ's cycle detection: `queue` is already in the message's `x-death` history with
    no rejection since (deaths are newest first)."""
    for death in deaths:
        if death.get("reason") == "rejected":
            return False
        if death.get("queue") == queue:
            return True
    return False


class MemoryBroker:
    """Exchanges, queues and consumers in this process. One per `TestApp`, shared by its apps."""

    def __init__(self) -> None:
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, _Queue] = {}
        self.activity = 0  # bumped by every change; `TestApp` waits until it stops moving
        self.in_flight: dict[int, MemoryDelivery] = {}  # every unacked delivery, by tag
        self.published: list[Message] = []  # every message published to an exchange, in order
        self.runs: Counter[str] = Counter()  # handler runs per message id
        self._tags = itertools.count(1)
        self._failures: list[_Failure] = []
        self._crashes: dict[str, list[Crash]] = {}
        self._replies: dict[str, Callable[[StoredMessage], None]] = {}
        self._reply_owners: dict[str, object] = {}
        self._settled: dict[str, tuple[str, StoredMessage]] = {}  # message id -> last acked
        self._exclusive: dict[str, object] = {}  # exclusive queue -> the owner it goes with

    # --- topology ---------------------------------------------------------------------------

    def plan(self, topology: topo.Topology) -> topo.Plan:
        """`topology` against what this broker holds, like `topology.observe` against RabbitMQ."""
        observed: dict[tuple[str, str], topo.Observation] = {}
        declared: tuple[topo.Exchange | topo.Queue, ...] = (*topology.exchanges, *topology.queues)
        for entity in declared:
            observed[(entity.kind, entity.name)] = self._observe(entity)
        return topo.make_plan(topology, observed)

    def _observe(self, entity: topo.Exchange | topo.Queue) -> topo.Observation:
        held: topo.Exchange | topo.Queue | None
        if isinstance(entity, topo.Exchange):
            found = self.exchanges.get(entity.name)
            held = None if found is None else found.spec
        else:
            queue = self.queues.get(entity.name)
            held = None if queue is None else queue.spec
        if held is None:
            return topo.Observation(exists=False)
        conflicts = []
        if (
            isinstance(entity, topo.Exchange)
            and isinstance(held, topo.Exchange)
            and held.type != entity.type
        ):
            conflicts.append(Conflict("exchange", entity.name, "type", entity.type, held.type))
        if held.durable != entity.durable:
            conflicts.append(
                Conflict(entity.kind, entity.name, "durable", entity.durable, held.durable)
            )
        wanted, actual = dict(entity.arguments), dict(held.arguments)
        for name in sorted(wanted.keys() | actual.keys()):
            if wanted.get(name) != actual.get(name):
                conflicts.append(
                    Conflict(entity.kind, entity.name, name, wanted.get(name), actual.get(name))
                )
        return topo.Observation(exists=True, conflicts=tuple(conflicts))

    def apply(self, plan: topo.Plan) -> None:
        """Create the plan's missing entities and bindings, then remove its retired bindings."""
        if plan.conflicts:
            raise TopologyConflict(plan.conflicts)
        for entity in plan.to_apply:
            if isinstance(entity, topo.Exchange):
                self.exchanges.setdefault(entity.name, _Exchange(entity))
            elif isinstance(entity, topo.Queue):
                if entity.name not in self.queues:
                    self.queues[entity.name] = _Queue(entity)
            else:
                bindings = self.exchanges[entity.exchange].bindings
                if entity not in bindings:
                    bindings.append(entity)
        for binding in plan.to_remove:
            exchange = self.exchanges.get(binding.exchange)
            if exchange is not None and binding in exchange.bindings:
                exchange.bindings.remove(binding)
        self.activity += 1

    def declare(self, topology: topo.Topology) -> None:
        """Create what `topology` needs (as `amqtask declare` would)."""
        self.apply(self.plan(topology))

    def ensure_exists(self, topology: topo.Topology, queues: Iterable[str]) -> None:
        """Raise `TopologyMissing` unless the exchanges and the named queues exist."""
        missing = [
            f"exchange {exchange.name!r}"
            for exchange in topology.exchanges
            if exchange.name not in self.exchanges
        ]
        missing += [f"queue {name!r}" for name in queues if name not in self.queues]
        if missing:
            raise TopologyMissing(missing)

    def declare_exclusive(self, name: str, exchange: str | None, owner: object) -> None:
        """An exclusive, auto-delete queue of `owner`'s, bound to fanout `exchange` unless None
        (how a worker listens for revocations and `inspect` requests); deleted when its consumer
        is cancelled or `owner` closes.

        Raises `TopologyMissing` when the exchange does not exist (a 404, as on RabbitMQ)."""
        if exchange is not None and exchange not in self.exchanges:
            raise TopologyMissing([f"exchange {exchange!r}"])
        self.queues[name] = _Queue(topo.Queue(name, durable=False))
        self._exclusive[name] = owner
        if exchange is not None:
            self.bind_exclusive(name, exchange)
        self.activity += 1

    def bind_exclusive(self, name: str, exchange: str) -> None:
        """Bind exclusive queue `name` to fanout `exchange`. Raises `TopologyMissing` when either
        does not exist."""
        if exchange not in self.exchanges:
            raise TopologyMissing([f"exchange {exchange!r}"])
        if name not in self._exclusive:
            raise TopologyMissing([f"queue {name!r}"])
        self.exchanges[exchange].bindings.append(topo.Binding(exchange, name, ""))

    def delete_queue(self, name: str) -> None:
        """Delete queue `name` with its messages and bindings (its consumers get nothing more)."""
        queue = self.queues.pop(name, None)
        self._exclusive.pop(name, None)
        if queue is None:
            return
        if queue.timer is not None:
            queue.timer.cancel()
        for consumer in queue.consumers:
            consumer.active = False
        for exchange in self.exchanges.values():
            exchange.bindings = [b for b in exchange.bindings if b.to_exchange or b.queue != name]
        self.activity += 1

    # --- publishing -------------------------------------------------------------------------

    def fail_next_publish(
        self, make: Callable[[str, str], BaseException], *, task: str | None, stored: bool
    ) -> None:
        self._failures.append(_Failure(make, task, stored))

    def take_failure(self, task: str) -> _Failure | None:
        """The first armed failure for a publish of `task`, disarmed."""
        for failure in self._failures:
            if failure.task is None or failure.task == task:
                self._failures.remove(failure)
                return failure
        return None

    def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        *,
        task: str,
        mandatory: bool,
        reply_to: str | None = None,
    ) -> None:
        """Route and store `message`, as a confirmed publish. Raises `Unroutable` (no such
        exchange, or `mandatory` and no route) or `PublishNacked` (a full queue refused it)."""
        stored = StoredMessage(
            body=bytes(message.body),
            headers=wire_headers(message.headers),
            message_id=message.message_id,
            exchange=exchange,
            routing_key=routing_key,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            correlation_id=message.correlation_id,
            reply_to=reply_to or message.reply_to,
            expiration=None if message.expiration is None else str(int(message.expiration * 1000)),
            type=message.type,
        )
        self.activity += 1
        if exchange == "":
            self._publish_default(stored, task=task, mandatory=mandatory)
            return
        if exchange not in self.exchanges:
            raise Unroutable(
                f"task {task!r}: exchange {exchange!r} does not exist; the message was not "
                "stored. Run `amqtask declare MODULE:APP` to create the topology.",
                task=task,
                message_id=message.message_id,
            )
        self.published.append(Message.of(stored))
        queues = self._route(exchange, routing_key)
        if not queues and mandatory:
            raise Unroutable(
                f"task {task!r}: no queue is bound to exchange {exchange!r} with routing key "
                f"{routing_key!r}; the message was returned, not stored. "
                "Run `amqtask declare MODULE:APP` to create the topology.",
                task=task,
                message_id=message.message_id,
            )
        refused = [queue.name for queue in queues if not self._enqueue(queue, replace(stored))]
        if refused:
            raise PublishNacked(
                f"task {task!r}: the broker refused message {message.message_id} (Nack)",
                task=task,
                message_id=message.message_id,
            )

    def _publish_default(self, stored: StoredMessage, *, task: str, mandatory: bool) -> None:
        key = stored.routing_key
        if key.startswith(DIRECT_REPLY_TO + "."):
            deliver = self._replies.get(key)
            if deliver is not None:
                deliver(stored)
            return  # the caller has gone: dropped, as RabbitMQ drops it
        queue = self.queues.get(key)
        if queue is None:
            if mandatory:
                raise Unroutable(
                    f"task {task!r}: no queue is bound to exchange '' with routing key "
                    f"{key!r}; the message was returned, not stored.",
                    task=task,
                    message_id=stored.message_id or "",
                )
            return
        if not self._enqueue(queue, stored):
            raise PublishNacked(
                f"task {task!r}: the broker refused message {stored.message_id} (Nack)",
                task=task,
                message_id=stored.message_id or "",
            )

    def _route(self, exchange: str, routing_key: str) -> list[_Queue]:
        """The queues `exchange` routes `routing_key` to, following exchange bindings; each
        queue once."""
        found: dict[str, _Queue] = {}
        pending, visited = [exchange], set()
        while pending:
            name = pending.pop()
            source = self.exchanges.get(name)
            if name in visited or source is None:
                continue
            visited.add(name)
            for binding in source.bindings:
                if source.spec.type == "topic":
                    matched = topic_matches(binding.routing_key, routing_key)
                elif source.spec.type == "fanout":
                    matched = True
                else:
                    matched = binding.routing_key == routing_key
                if not matched:
                    continue
                if binding.to_exchange:
                    pending.append(binding.queue)
                elif binding.queue in self.queues:
                    found.setdefault(binding.queue, self.queues[binding.queue])
        return list(found.values())

    # --- queues -----------------------------------------------------------------------------

    def _enqueue(self, queue: _Queue, message: StoredMessage, at: float | None = None) -> bool:
        """Store `message` at the tail of `queue`, arrived at loop time `at` (default: now);
        False when a full `reject-publish` queue refuses it."""
        limit = queue.max_length
        if limit is not None and queue.overflow.startswith("reject-publish"):
            # A quorum queue (3.10) refuses only once it is over its limit: it takes one more.
            if len(queue.ready) > limit or (not queue.quorum and len(queue.ready) == limit):
                return False
        elif limit is not None:
            while queue.ready and len(queue.ready) >= limit:
                self._dead_letter(queue, queue.ready.popleft(), "maxlen")
        message.expires_at = self._expiry(queue, message, at)
        queue.ready.append(message)
        self.activity += 1
        self._dispatch(queue)
        return True

    def _expiry(self, queue: _Queue, message: StoredMessage, at: float | None) -> float | None:
        ttls = [] if queue.ttl is None else [queue.ttl]
        if message.expiration is not None:
            ttls.append(int(message.expiration) / 1000)
        if not ttls:
            return None
        return (asyncio.get_running_loop().time() if at is None else at) + min(ttls)

    def _dispatch(self, queue: _Queue) -> None:
        """Hand ready messages to consumers with room, round robin; expire the head first."""
        now = asyncio.get_running_loop().time()
        while queue.ready:
            head = queue.ready[0]
            if head.expires_at is not None and head.expires_at <= now:
                # Dead-lettered the moment it expired: a broker with no latency, so a chain of
                # delay levels adds up to exactly the delay, however late the clock got here.
                self._dead_letter(queue, queue.ready.popleft(), "expired", at=head.expires_at)
                continue
            consumer = self._next_consumer(queue)
            if consumer is None:
                break
            self._deliver(queue, consumer, queue.ready.popleft())
        self._schedule_expiry(queue)

    def _next_consumer(self, queue: _Queue) -> _Consumer | None:
        if queue.single_active:
            # `x-single-active-consumer`: the earliest consumer still there gets every message;
            # when it goes, the next in line takes over (with what it held, requeued).
            active = next((c for c in queue.consumers if c.active), None)
            return active if active is not None and _has_room(active) else None
        count = len(queue.consumers)
        for i in range(count):
            consumer = queue.consumers[(queue.turn + i) % count]
            if consumer.active and _has_room(consumer):
                queue.turn = (queue.turn + i + 1) % count
                return consumer
        return None

    def _deliver(self, queue: _Queue, consumer: _Consumer, message: StoredMessage) -> None:
        delivery = MemoryDelivery(self, queue, consumer, next(self._tags), message)
        task = delivery.headers.get("amqtask-task")
        armed = self._crashes.get(task) if isinstance(task, str) else None
        if armed:
            delivery.crash = armed.pop(0)
        consumer.unacked[delivery.tag] = delivery
        self.in_flight[delivery.tag] = delivery
        self.activity += 1
        consumer.deliver(delivery)

    def _schedule_expiry(self, queue: _Queue) -> None:
        """A loop timer for when the head of `queue` expires (RabbitMQ expires at the head)."""
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        if queue.ready and queue.ready[0].expires_at is not None:
            loop = asyncio.get_running_loop()
            queue.timer = loop.call_at(queue.ready[0].expires_at, self._dispatch, queue)

    def _dead_letter(
        self, queue: _Queue, message: StoredMessage, reason: str, at: float | None = None
    ) -> None:
        """Re-publish `message` to the queue's dead-letter exchange with its death recorded, or
        drop it when the queue has none."""
        self.activity += 1
        exchange = queue.dead_letter_exchange
        if exchange is None:
            return
        headers = dict(message.headers)
        raw = headers.get("x-death")
        deaths = [dict(d) for d in raw if isinstance(d, Mapping)] if isinstance(raw, list) else []
        died = datetime.fromtimestamp(int(_wallclock.now()), UTC)
        same = next(
            (d for d in deaths if d.get("queue") == queue.name and d.get("reason") == reason),
            None,
        )
        if same is not None:
            deaths.remove(same)
            same["count"] = int(same.get("count", 0)) + 1
            same["time"] = died
            deaths.insert(0, same)
        else:
            death: dict[str, Any] = {
                "count": 1,
                "reason": reason,
                "queue": queue.name,
                "time": died,
                "exchange": message.exchange,
                "routing-keys": [message.routing_key],
            }
            if message.expiration is not None:
                death["original-expiration"] = message.expiration
            deaths.insert(0, death)
        headers["x-death"] = deaths
        headers.setdefault("x-first-death-exchange", message.exchange)
        headers.setdefault("x-first-death-queue", queue.name)
        headers.setdefault("x-first-death-reason", reason)
        routing_key = queue.dead_letter_routing_key or message.routing_key
        dead = replace(
            message,
            headers=headers,
            exchange=exchange,
            routing_key=routing_key,
            expiration=None,
            redelivered=False,
            returns=0,
            expires_at=None,
        )
        for target in self._route(exchange, routing_key):
            if reason != "rejected" and _is_cycle(target.name, deaths):
                log.debug(
                    "dead_letter_cycle_dropped", queue=target.name, message_id=dead.message_id
                )
                continue
            if not self._enqueue(target, replace(dead), at):
                log.warning("dead_letter_refused", queue=target.name, message_id=dead.message_id)

    # --- consumers and settling -------------------------------------------------------------

    def consume(
        self, queue: str, deliver: Callable[[MemoryDelivery], None], *, prefetch: int, owner: object
    ) -> _Consumer:
        """Start a consumer on `queue`; raises `TopologyMissing` when it does not exist."""
        found = self.queues.get(queue)
        if found is None:
            raise TopologyMissing([f"queue {queue!r}"])
        consumer = _Consumer(found, deliver, prefetch, owner)
        found.consumers.append(consumer)
        self.activity += 1
        self._dispatch(found)
        return consumer

    def cancel(self, consumer: _Consumer) -> None:
        """No more deliveries to `consumer`; those it holds can still be settled."""
        consumer.active = False
        self.activity += 1
        self._dispatch(consumer.queue)

    def settle(self, delivery: MemoryDelivery, how: str) -> None:
        """Ack, reject (dead-letter) or requeue `delivery`, as its consumer asked."""
        if delivery.void:
            raise aiormq.exceptions.ChannelInvalidStateError(
                f"the channel of delivery {delivery.tag} is closed; the broker redelivers it"
            )
        if delivery.settled:
            raise aio_pika.exceptions.MessageProcessError(
                "Message already processed", delivery.message
            )
        self._release(delivery)
        queue = delivery._queue
        message = delivery.message
        if how == "ack":
            if message.message_id:
                self._settled[message.message_id] = (queue.name, message)
        elif how == "reject":
            self._dead_letter(queue, message, "rejected")
        else:
            self._requeue(queue, message)
        self._dispatch(queue)

    def _release(self, delivery: MemoryDelivery) -> None:
        delivery.settled = True
        delivery._consumer.unacked.pop(delivery.tag, None)
        self.in_flight.pop(delivery.tag, None)
        self.activity += 1

    def _requeue(self, queue: _Queue, message: StoredMessage) -> None:
        """Back to the head of its queue, marked redelivered; past a quorum queue's delivery
        limit, dead-lettered instead."""
        message.redelivered = True
        message.returns += 1
        if queue.delivery_limit is not None and message.returns > queue.delivery_limit:
            self._dead_letter(queue, message, "delivery_limit")
            return
        queue.ready.appendleft(message)  # keeping its expiry time, as RabbitMQ does
        self.activity += 1

    def disconnect(self, owner: object) -> None:
        """`owner`'s connection closed: its consumers stop and the deliveries they held go back
        to their queues (redelivered); its reply addresses stop receiving."""
        for queue in self.queues.values():
            mine = [consumer for consumer in queue.consumers if consumer.owner is owner]
            for consumer in mine:
                consumer.active = False
                queue.consumers.remove(consumer)
                for delivery in sorted(consumer.unacked.values(), key=lambda d: -d.tag):
                    delivery.void = True
                    self._release(delivery)
                    self._requeue(queue, delivery.message)
            if mine:
                self._dispatch(queue)
        for address, held_by in list(self._reply_owners.items()):
            if held_by is owner:
                self.close_reply(address)
        for name, held_by in list(self._exclusive.items()):
            if held_by is owner:
                self.delete_queue(name)

    def crash(self, delivery: MemoryDelivery) -> None:
        """The worker holding `delivery` died: its task is cancelled and the broker requeues the
        message (redelivered; counted against a quorum queue's delivery limit)."""
        if delivery.settled:
            return
        if delivery.worker_task is not None:
            delivery.worker_task.cancel()
        delivery.void = True
        self._release(delivery)
        self._requeue(delivery._queue, delivery.message)
        self._dispatch(delivery._queue)

    def arm_crash(self, task: str, crash: Crash) -> None:
        self._crashes.setdefault(task, []).append(crash)

    def redeliver(self, message_id: str) -> None:
        """Deliver the acked message `message_id` again, as after an ack the broker never got.

        Raises `KeyError` when no message with that id has been acked.
        """
        if message_id not in self._settled:
            raise KeyError(
                f"no acked message with id {message_id!r}: only a task that was delivered and "
                "acked can be redelivered (drain first?)"
            )
        name, message = self._settled.pop(message_id)
        queue = self.queues[name]
        self._requeue(queue, replace(message))
        self._dispatch(queue)

    # --- direct reply-to --------------------------------------------------------------------

    def open_reply(self, deliver: Callable[[StoredMessage], None], owner: object) -> str:
        """A direct reply-to address whose replies go to `deliver`."""
        address = f"{DIRECT_REPLY_TO}.{next(self._tags)}"
        self._replies[address] = deliver
        self._reply_owners[address] = owner
        return address

    def close_reply(self, address: str) -> None:
        self._replies.pop(address, None)
        self._reply_owners.pop(address, None)

    # --- looking inside ---------------------------------------------------------------------

    def messages(self, queue: str) -> list[Message]:
        """The ready messages of `queue`, head first (unacked ones are not among them)."""
        found = self.queues.get(queue)
        if found is None:
            raise KeyError(f"no queue {queue!r} on the in-memory broker")
        return [Message.of(message, queue) for message in found.ready]

    def close(self) -> None:
        """Cancel the broker's timers."""
        for queue in self.queues.values():
            if queue.timer is not None:
                queue.timer.cancel()
                queue.timer = None
