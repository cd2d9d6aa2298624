"""Topology as code: the desired exchanges, queues and bindings (pure), a plan against the broker,
and the one module that reads and changes the broker (`_broker`)."""

from amqtask.topology._broker import apply, ensure_exists, observe
from amqtask.topology._model import (
    CREATION_ONLY,
    Binding,
    Exchange,
    Placement,
    Queue,
    Topology,
    derive,
)
from amqtask.topology._plan import Observation, Plan, State, Step, make_plan, parse_precondition

__all__ = [
    "CREATION_ONLY",
    "Binding",
    "Exchange",
    "Observation",
    "Placement",
    "Plan",
    "Queue",
    "State",
    "Step",
    "Topology",
    "apply",
    "derive",
    "ensure_exists",
    "make_plan",
    "observe",
    "parse_precondition",
]
