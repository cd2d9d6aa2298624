"""Compare the desired topology with what the broker holds. Pure: observations come in as values."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from amqtask._exceptions import Conflict
from amqtask.topology._model import Binding, Entity, Exchange, Queue, Topology


class State(StrEnum):
    MISSING = "missing"  # will be created
    UP_TO_DATE = "up-to-date"  # exists with the same type and arguments
    CONFLICT = "conflict"  # exists with another type or other arguments; never touched
    # AMQP 0-9-1 cannot list bindings; declaring one that exists is a no-op, so it is re-asserted.
    UNVERIFIED = "unverified"


@dataclass(frozen=True, slots=True)
class Observation:
    """What the broker said about one exchange or queue."""

    exists: bool
    conflict: Conflict | None = None


ObservationKey = tuple[str, str]  # (kind, name)


@dataclass(frozen=True, slots=True)
class Step:
    entity: Entity
    state: State
    conflict: Conflict | None = None

    def to_dict(self) -> dict[str, Any]:
        data = self.entity.to_dict()
        data["state"] = self.state.value
        if self.entity.kind == "queue":
            data["bindings"] = []  # filled by Plan.to_dict, which sees every binding
        if self.conflict is not None:
            data["conflict"] = {
                "argument": self.conflict.argument,
                "expected": self.conflict.expected,
                "actual": self.conflict.actual,
            }
        return data


@dataclass(frozen=True, slots=True)
class Plan:
    """Each desired entity with its state on the broker."""

    steps: tuple[Step, ...]

    @property
    def conflicts(self) -> tuple[Conflict, ...]:
        return tuple(step.conflict for step in self.steps if step.conflict is not None)

    @property
    def to_apply(self) -> tuple[Entity, ...]:
        """What `apply` declares: missing entities and every binding (idempotent)."""
        return tuple(
            step.entity for step in self.steps if step.state in (State.MISSING, State.UNVERIFIED)
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
            if isinstance(step.entity, Binding) and step.entity.queue in by_queue:
                by_queue[step.entity.queue]["bindings"].append(
                    {"exchange": step.entity.exchange, "routing_key": step.entity.routing_key}
                )
        return {
            "entities": entities,
            "summary": {
                "missing": len(self.missing),
                "conflicts": len(self.conflicts),
                "up_to_date": self.up_to_date,
            },
        }

    def render(self) -> str:
        """Human-readable plan, one entity per line, like a migration tool's."""
        marks = {State.MISSING: "+", State.UP_TO_DATE: "=", State.CONFLICT: "!", State.UNVERIFIED: "~"}
        lines = []
        for step in self.steps:
            entity = step.entity
            detail = "" if isinstance(entity, Binding) else f" ({entity.type})"
            line = f"{marks[step.state]} {entity.kind:<8} {entity.name}{detail}  [{step.state}]"
            if step.conflict is not None:
                line += f"\n      {step.conflict.describe()}"
            lines.append(line)
        lines.append(
            f"{len(self.missing)} to create, {len(self.conflicts)} conflicting, "
            f"{sum(s.state is State.UP_TO_DATE for s in self.steps)} up to date"
        )
        return "\n".join(lines)


def make_plan(topology: Topology, observed: Mapping[ObservationKey, Observation]) -> Plan:
    """Give every desired entity its state from what was observed on the broker.

    An exchange or queue that was not observed counts as missing. A binding is missing when one
    of its ends is, and otherwise unverified (AMQP cannot tell whether it exists).
    """
    steps: list[Step] = []
    absent: set[str] = set()
    for entity in (*topology.exchanges, *topology.queues):
        seen = observed.get((entity.kind, entity.name), Observation(exists=False))
        if not seen.exists:
            absent.add(entity.name)
            steps.append(Step(entity, State.MISSING))
        elif seen.conflict is not None:
            steps.append(Step(entity, State.CONFLICT, seen.conflict))
        else:
            steps.append(Step(entity, State.UP_TO_DATE))
    for binding in topology.bindings:
        missing_end = binding.exchange in absent or binding.queue in absent
        steps.append(Step(binding, State.MISSING if missing_end else State.UNVERIFIED))
    return Plan(tuple(steps))


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<argument>[^']+)' for (?P<kind>queue|exchange) '(?P<entity>[^']+)'"
    r" in vhost '[^']*': received (?P<received>.+?) but current is (?P<current>.+?)\"?$"
)
_TYPED_VALUE = re.compile(r"^the value '(?P<value>.*)' of type '[^']*'$")


def _broker_value(text: str) -> Any:
    if text == "none":
        return None
    typed = _TYPED_VALUE.match(text)
    value = typed["value"] if typed else text.strip("'")
    if value in ("true", "false"):
        return value == "true"
    return int(value) if re.fullmatch(r"-?\d+", value) else value


def parse_precondition(
    text: str, expected: Exchange | Queue | None = None
) -> Conflict | None:
    """Read RabbitMQ's PRECONDITION_FAILED text for a redeclare into a `Conflict`.

    RabbitMQ names the first differing argument and both values; `expected` (the entity that was
    declared) supplies the exact desired value where the broker's rendering lost its type.
    """
    match = _INEQUIVALENT.search(text)
    if match is None:
        return None
    argument = match["argument"]
    wanted = _broker_value(match["received"])
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
        actual=_broker_value(match["current"]),
    )
