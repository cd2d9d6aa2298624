"""amqtask: typed, durable task queues and RPC for Python, RabbitMQ first."""

from amqtask._app import App
from amqtask._contract import Contract, Overflow, QueueType, contract
from amqtask._exceptions import (
    AmqtaskError,
    Conflict,
    ContractError,
    DecodeError,
    NotConnected,
    PublishError,
    PublishNacked,
    PublishTimeout,
    TopologyConflict,
    TopologyError,
    TopologyMissing,
    Unroutable,
)
from amqtask._worker import Worker, WorkerSettings

__all__ = [
    # Contracts
    "Contract",
    "Overflow",
    "QueueType",
    "contract",
    # App and worker
    "App",
    "Worker",
    "WorkerSettings",
    # Errors
    "AmqtaskError",
    "Conflict",
    "ContractError",
    "DecodeError",
    "NotConnected",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "TopologyConflict",
    "TopologyError",
    "TopologyMissing",
    "Unroutable",
]
