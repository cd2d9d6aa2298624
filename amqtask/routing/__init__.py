"""Pure routing: broker names and routing keys derived from contracts. No I/O."""

from amqtask.routing._names import (
    DEFAULT_NAMESPACE,
    Names,
    dead_letter_queue_name,
    default_queue_name,
    routing_key,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "Names",
    "dead_letter_queue_name",
    "default_queue_name",
    "routing_key",
]
