"""Pure routing: broker names and routing keys derived from contracts. No I/O."""

from amqtask.routing._delay import (
    DELAY_LEVELS,
    MAX_DELAY_SECONDS,
    delay_routing_key,
    delay_seconds,
    deliver_pattern,
    level_pattern,
    level_ttl_ms,
)
from amqtask.routing._names import (
    DEFAULT_NAMESPACE,
    Names,
    call_queue_name,
    call_routing_key,
    dead_letter_queue_name,
    default_queue_name,
    due_queue_name,
    routing_key,
)

__all__ = [
    "DELAY_LEVELS",
    "MAX_DELAY_SECONDS",
    "delay_routing_key",
    "delay_seconds",
    "deliver_pattern",
    "level_pattern",
    "level_ttl_ms",
    "DEFAULT_NAMESPACE",
    "Names",
    "call_queue_name",
    "call_routing_key",
    "dead_letter_queue_name",
    "default_queue_name",
    "due_queue_name",
    "routing_key",
]
