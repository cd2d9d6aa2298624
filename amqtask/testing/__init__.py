"""Test tasks without a broker: an in-memory transport with a virtual clock.

`TestApp` runs the same apps, contracts and handlers on an in-memory broker that acts on the
topology the contracts derive, with the real codec, worker and settling on top, so retries,
delays, dead letters, `Reject`, bounded queues and calls behave as they do on RabbitMQ, and a
30-minute delay takes milliseconds (`advance`). An app's schedules fire from its real scheduler
and its task store records what happened, both on the virtual clock. The pytest plugin
(installed with amqtask) gives the fixtures `amqtask_testapp` and `amqtask_clock` for an
`amqtask_app` fixture of your own.
"""

from amqtask.testing._app import DeadLetter, TestApp
from amqtask.testing._broker import MemoryBroker
from amqtask.testing._clock import VirtualClock
from amqtask.testing._messages import MemoryDelivery, Message
from amqtask.testing._transport import MemoryTransport

__all__ = [
    # Running apps in memory
    "TestApp",
    "VirtualClock",
    # What a test looks at
    "DeadLetter",
    "Message",
    # The transport and broker underneath
    "MemoryBroker",
    "MemoryDelivery",
    "MemoryTransport",
]
