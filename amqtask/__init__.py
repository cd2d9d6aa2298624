"""amqtask: typed, durable task queues and RPC for Python, RabbitMQ first."""

from amqtask._app import App
from amqtask._contract import (
    Calls,
    Contract,
    Isolation,
    LeaderLocator,
    Overflow,
    QueueType,
    Retry,
    contract,
)
from amqtask._exceptions import (
    AmqtaskError,
    AuthenticationFailed,
    BrokerUnreachable,
    CallError,
    CallTimeout,
    Conflict,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    ContractError,
    DecodeError,
    HandlerCrashed,
    InvalidReply,
    InvalidURL,
    NotConnected,
    PublishError,
    PublishInterrupted,
    PublishNacked,
    PublishTimeout,
    QueueFull,
    Reject,
    RemoteError,
    ResultTimeout,
    ScheduleError,
    SoftTimeLimitExceeded,
    StoreError,
    StoreMissing,
    StoreUnavailable,
    TaskRevoked,
    TimeLimitExceeded,
    TopologyConflict,
    TopologyError,
    TopologyMissing,
    Unroutable,
    VhostRefused,
)
from amqtask._failover import Failover
from amqtask._loops import run
from amqtask._schedule import Misfire, Schedule, schedule
from amqtask._scheduler import Scheduler
from amqtask._worker import Worker, WorkerSettings

__all__ = [
    # Contracts
    "Calls",
    "Contract",
    "Isolation",
    "LeaderLocator",
    "Overflow",
    "QueueType",
    "Retry",
    "contract",
    # App and worker
    "App",
    "Failover",
    "Worker",
    "WorkerSettings",
    "run",
    # Periodic tasks
    "Misfire",
    "Schedule",
    "Scheduler",
    "schedule",
    # Signals a handler raises, or sees
    "Reject",
    "SoftTimeLimitExceeded",
    # Errors
    "AmqtaskError",
    "Conflict",
    "ContractError",
    "DecodeError",
    "NotConnected",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "PublishInterrupted",
    "QueueFull",
    "TopologyConflict",
    "TopologyError",
    "TopologyMissing",
    "Unroutable",
    # Errors a failed task records (the process pool, time limits)
    "HandlerCrashed",
    "TimeLimitExceeded",
    # Errors of connecting
    "AuthenticationFailed",
    "BrokerUnreachable",
    "ConnectError",
    "ConnectTimeout",
    "InvalidURL",
    "VhostRefused",
    # Errors of calls
    "CallError",
    "CallTimeout",
    "ConnectionLost",
    "InvalidReply",
    "RemoteError",
    # Errors of schedules
    "ScheduleError",
    # Errors of the task store (`App(store=...)`; its types are in `amqtask.store`)
    "ResultTimeout",
    "StoreError",
    "StoreMissing",
    "StoreUnavailable",
    "TaskRevoked",
]
