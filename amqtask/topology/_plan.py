"""Compare the desired topology with what the broker holds. Pure: observations come in as values."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from amqtask._exceptions import Conflict
from amqtask.topology._model import (
    CREATION_ONLY,
    DEAD_LETTER_DELIVERY_LIMIT,
    Binding,
    Entity,
    Exchange,
    Queue,
    Topology,
)


class State(StrEnum):
    MISSING = "missing"  # will be created
    UP_TO_DATE = "up-to-date"  # exists with the same type and arguments
    CONFLICT = "conflict"  # exists with another type or other arguments; never touched
    # AMQP 0-9-1 cannot list bindings; declaring one that exists is a no-op, so it is re-asserted.
    UNVERIFIED = "unverified"
    # A retired binding (`Topology.retired`) that may exist: unbound, a no-op when it does not.
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class Observation:
    """What the broker said about one exchange or queue."""

    exists: bool
    conflicts: tuple[Conflict, ...] = ()


ObservationKey = tuple[str, str]  # (kind, name)


@dataclass(frozen=True, slots=True)
class Step:
    entity: Entity
    state: State
    conflicts: tuple[Conflict, ...] = ()
    # Differences in arguments that only placed the queue when it was created (`CREATION_ONLY`):
    # reported, never a conflict, and left as they are.
    placed_otherwise: tuple[Conflict, ...] = ()
    # Differences only a policy settles on an existing queue: a dead-letter queue declared before
    # amqtask set its delivery limit (`DEAD_LETTER_DELIVERY_LIMIT`). Reported, never a conflict,
    # and left as they are: redeclaring would fail, and the queue holds letters.
    by_policy: tuple[Conflict, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = self.entity.to_dict()
        data["state"] = self.state.value
        if self.entity.kind == "queue":
            data["bindings"] = []  # filled by Plan.to_dict, which sees every binding
        for key, found in (
            ("conflicts", self.conflicts),
            ("placed_otherwise", self.placed_otherwise),
            ("by_policy", self.by_policy),
        ):
            if found:
                data[key] = [
                    {"argument": c.argument, "expected": c.expected, "actual": c.actual}
                    for c in found
                ]
        return data


@dataclass(frozen=True, slots=True)
class Plan:
    """Each desired entity with its state on the broker."""

    steps: tuple[Step, ...]

    @property
    def conflicts(self) -> tuple[Conflict, ...]:
        return tuple(conflict for step in self.steps for conflict in step.conflicts)

    @property
    def to_apply(self) -> tuple[Entity, ...]:
        """What `apply` declares: missing entities and every binding (idempotent)."""
        return tuple(
            step.entity for step in self.steps if step.state in (State.MISSING, State.UNVERIFIED)
        )

    @property
    def to_remove(self) -> tuple[Binding, ...]:
        """Retired bindings `apply` removes, after declaring everything else."""
        return tuple(
            step.entity
            for step in self.steps
            if step.state is State.REMOVED and isinstance(step.entity, Binding)
        )

    @property
    def missing(self) -> tuple[Entity, ...]:
        return tuple(step.entity for step in self.steps if step.state is State.MISSING)

    @property
    def up_to_date(self) -> bool:
        return not self.missing and not self.conflicts

    def to_dict(self) -> dict[str, Any]:
        entities = [step.to_dict() for step in self.steps]
        by_queue = {e["name"]: e for e in entities if e["kind"] == "queue"}
        for step in self.steps:
            binding = step.entity
            if (
                isinstance(binding, Binding)
                and not binding.to_exchange
                and binding.queue in by_queue
                and step.state is not State.REMOVED
            ):
                by_queue[binding.queue]["bindings"].append(
                    {"exchange": binding.exchange, "routing_key": binding.routing_key}
                )
        return {
            "entities": entities,
            "summary": {
                "missing": len(self.missing),
                "conflicts": sum(step.state is State.CONFLICT for step in self.steps),
                "removed": len(self.to_remove),
                "up_to_date": self.up_to_date,
            },
        }

    def render(self) -> str:
        """Human-readable plan, one entity per line, like a migration tool's."""
        marks = {
            State.MISSING: "+",
            State.UP_TO_DATE: "=",
            State.CONFLICT: "!",
            State.UNVERIFIED: "~",
            State.REMOVED: "-",
        }
        lines = []
        for step in self.steps:
            entity = step.entity
            detail = "" if isinstance(entity, Binding) else f" ({entity.type})"
            line = f"{marks[step.state]} {entity.kind:<8} {entity.name}{detail}  [{step.state}]"
            for conflict in step.conflicts:
                line += f"\n      {conflict.describe()}"
            for difference in step.placed_otherwise:
                line += (
                    f"\n      note: {difference.describe()}; it only placed the queue when it "
                    "was created: left as is"
                )
            for difference in step.by_policy:
                line += (
                    f"\n      note: {difference.describe()}; left as is: set it with a policy "
                    "(README: upgrading dead-letter queues) so that reading never drops a letter"
                )
            lines.append(line)
        conflicting = sum(step.state is State.CONFLICT for step in self.steps)
        removed = f", {len(self.to_remove)} to remove" if self.to_remove else ""
        lines.append(
            f"{len(self.missing)} to create, {conflicting} conflicting, "
            f"{sum(s.state is State.UP_TO_DATE for s in self.steps)} up to date{removed}"
        )
        return "\n".join(lines)


def make_plan(topology: Topology, observed: Mapping[ObservationKey, Observation]) -> Plan:
    """Give every desired entity its state from what was observed on the broker.

    An exchange or queue that was not observed counts as missing. A queue whose only
    differences are in arguments that placed it at creation (`CREATION_ONLY`: replica count,
    leader locator) is up to date, with those differences noted. A binding is missing when one
    of its ends is, and otherwise unverified (AMQP cannot tell whether it exists). A retired
    binding is to be removed when both its ends exist (else it cannot exist), after the rest.
    """
    steps: list[Step] = []
    absent: set[tuple[str, str]] = set()
    declared: tuple[Exchange | Queue, ...] = (*topology.exchanges, *topology.queues)
    for entity in declared:
        seen = observed.get((entity.kind, entity.name), Observation(exists=False))
        if not seen.exists:
            absent.add((entity.kind, entity.name))
            steps.append(Step(entity, State.MISSING))
        else:
            policy = tuple(c for c in seen.conflicts if _by_policy(c))
            placed = tuple(c for c in seen.conflicts if c.argument in CREATION_ONLY)
            real = tuple(c for c in seen.conflicts if c not in policy and c not in placed)
            state = State.CONFLICT if real else State.UP_TO_DATE
            steps.append(Step(entity, state, real, placed, policy))
    for binding in topology.bindings:
        missing_end = ("exchange", binding.exchange) in absent or (
            binding.destination_kind,
            binding.queue,
        ) in absent
        steps.append(Step(binding, State.MISSING if missing_end else State.UNVERIFIED))
    for binding in topology.retired:
        ends = (("exchange", binding.exchange), (binding.destination_kind, binding.queue))
        if all(observed.get(end, Observation(exists=False)).exists for end in ends):
            steps.append(Step(binding, State.REMOVED))
    return Plan(tuple(steps))


def _by_policy(conflict: Conflict) -> bool:
    """A dead-letter queue's delivery limit, absent on a queue declared before it was set."""
    return (
        conflict.argument == "x-delivery-limit"
        and conflict.actual is None
        and conflict.expected == DEAD_LETTER_DELIVERY_LIMIT
    )


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<argument>[^']+)' for (?P<kind>queue|exchange) '(?P<entity>[^']+)'"
    r" in vhost '[^']*': received (?P<received>.+?) but current is (?P<current>.+?)\"?$"
)
_TYPED_VALUE = re.compile(r"^the value '(?P<value>.*)' of type '(?P<type>[^']*)'$")


_INTEGER_TYPES = {"byte", "short", "signedint", "long", "unsignedbyte", "unsignedshort"}


def _broker_value(text: str, like: Any = None) -> Any:
    """A value as RabbitMQ rendered it, typed by its stated type or else like `like`."""
    if text == "none":
        return None
    typed = _TYPED_VALUE.match(text)
    value = typed["value"] if typed else text.strip("'")
    kind = typed["type"] if typed else None
    if kind == "bool" or (kind is None and isinstance(like, bool)):
        return value == "true"
    if kind is None and like is None and re.fullmatch(r"-?[1-9]\d*|0", value):
        return int(value)  # nothing to go by: a number that reads back the same is one
    numeric = kind in _INTEGER_TYPES or (kind is None and type(like) is int)
    if numeric and re.fullmatch(r"-?\d+", value):
        return int(value)
    return value


def parse_precondition(text: str, expected: Exchange | Queue | None = None) -> Conflict | None:
    """Read RabbitMQ's PRECONDITION_FAILED text for a redeclare into a `Conflict`.

    RabbitMQ names the first differing argument and both values; `expected` (the entity that was
    declared) supplies the exact desired value where the broker's rendering lost its type.
    """
    match = _INEQUIVALENT.search(text)
    if match is None:
        return None
    argument = match["argument"]
    # "durable" is rendered 'true'/'false' with no type: read it as the bool it is.
    like = True if argument == "durable" else None
    wanted = _broker_value(match["received"], like)
    if expected is not None:
        desired = dict(expected.arguments)
        if argument in desired:
            wanted = desired[argument]
        elif argument in ("type", "durable"):
            wanted = getattr(expected, argument, wanted)
    return Conflict(
        kind=match["kind"],
        entity=match["entity"],
        argument=argument,
        expected=wanted,
        actual=_broker_value(match["current"], like if like is not None else wanted),
    )
