"""Errors raised by amqtask.

The hierarchy:

    AmqtaskError
    ├── ContractError           a contract or an app is defined inconsistently
    │   └── ScheduleError       a schedule's expression, time zone, policy or payload is wrong
    ├── ConnectError            no connection to the broker (the URL is shown without password)
    │   ├── BrokerUnreachable   nothing answers there: refused, unknown host, not RabbitMQ
    │   ├── ConnectTimeout      no AMQP handshake within `connect_timeout`
    │   ├── AuthenticationFailed  the broker refused the user name or password
    │   ├── VhostRefused        the virtual host does not exist, or the user may not use it
    │   └── InvalidURL          the URL is malformed
    ├── PublishError            a message was not accepted by the broker
    │   ├── PublishNacked       the broker answered the confirm with a nack
    │   │   └── QueueFull       ...because the contract's bounded queue is full
    │   ├── Unroutable          no queue is bound for the message (returned by `mandatory`)
    │   ├── PublishTimeout      no confirm within the timeout (state unknown: may be delivered)
    │   └── PublishInterrupted  the connection dropped before the confirm (state unknown)
    ├── TopologyError           the broker's exchanges and queues are not what the contracts need
    │   ├── TopologyConflict    an entity exists with another type or other arguments
    │   └── TopologyMissing     an entity the worker needs does not exist
    ├── DecodeError             an incoming message cannot be turned into a task
    ├── TimeLimitExceeded       a task ran past its hard time limit (cancelled, or killed)
    ├── HandlerCrashed          the process running a handler died (a signal, `os._exit`)
    ├── CallError               `App.call` got no result
    │   ├── RemoteError         the handler raised, or the worker refused the request
    │   │   └── InvalidReply    the result does not fit the contract's output model
    │   ├── CallTimeout         no reply within the timeout (the request expires unprocessed)
    │   ├── ConnectionLost      the connection dropped while the call was in flight
    │   ├── TaskRevoked         `App.result`: the task was revoked
    │   └── ResultTimeout       `App.result`: the task did not finish within the timeout
    ├── StoreError              the task store cannot do what was asked
    │   ├── StoreUnavailable    the store cannot be reached (down, refused, timed out)
    │   └── StoreMissing        the store's tables are absent or of another version
    └── NotConnected            the app is used outside `async with app`

    Reject                      not an error: a handler raises it to dead-letter its task now
    SoftTimeLimitExceeded       not an error: raised inside a handler at its soft time limit

Pydantic's `ValidationError` is raised unwrapped where a payload does not fit its model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amqtask._urls import URL_FORM, safe_url


class AmqtaskError(Exception):
    """Base class of every error amqtask raises on its own."""


class ContractError(AmqtaskError):
    """A contract, or a set of contracts, is inconsistent."""


class ScheduleError(ContractError):
    """A schedule cannot run: its name, expression, time zone, durations, policy or payload (the
    message names the schedule; a payload's pydantic `ValidationError` is the cause)."""


class NotConnected(AmqtaskError):
    """The app has no open connection; use `async with app:` first."""


# --- connecting -----------------------------------------------------------------------------


class ConnectError(AmqtaskError):
    """No connection to the broker could be opened.

    `url` is the broker URL with its password replaced by `***`; no message shows the password.
    """

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = safe_url(url)


class BrokerUnreachable(ConnectError):
    """Nothing that speaks AMQP answered: connection refused, unknown host, network down, or a
    server that is not RabbitMQ. Often temporary (a broker restarting)."""

    def __init__(self, *, url: str, reason: str) -> None:
        super().__init__(
            f"cannot reach the broker at {safe_url(url)}: {reason}; check that RabbitMQ runs "
            "there and that the host and port are its AMQP listener",
            url=url,
        )
        self.reason = reason


class ConnectTimeout(ConnectError):
    """The broker did not complete the AMQP handshake within the connect timeout (a host that
    accepts TCP but never speaks AMQP, a firewall that drops packets, a broker that hangs)."""

    def __init__(self, *, url: str, timeout: float) -> None:
        super().__init__(
            f"no AMQP handshake with the broker at {safe_url(url)} within {timeout:g} s: check "
            "that the host and port are RabbitMQ's AMQP listener (5672, or 5671 for amqps), or "
            "raise App(connect_timeout=...) on a slow network",
            url=url,
        )
        self.timeout = timeout


class AuthenticationFailed(ConnectError):
    """The broker refused the user name or password (or offered no mechanism in common)."""

    def __init__(self, *, url: str, user: str) -> None:
        super().__init__(
            f"authentication failed for user {user!r} at {safe_url(url)}: the broker refused "
            "the user name or password; check the URL's credentials",
            url=url,
        )
        self.user = user


class VhostRefused(ConnectError):
    """The broker refused to open the URL's virtual host for this user.

    RabbitMQ answers the same way whether the vhost does not exist, the user has no
    permissions on it, or a connection limit is reached, so the message names all three.
    """

    def __init__(self, *, url: str, user: str, vhost: str) -> None:
        super().__init__(
            f"the broker at {safe_url(url)} refused virtual host {vhost!r} to user {user!r}: it "
            "does not exist, the user has no permissions on it, or it is at a connection limit; "
            "create it (`rabbitmqctl add_vhost VHOST`) and grant access (`rabbitmqctl "
            "set_permissions -p VHOST USER '.*' '.*' '.*'`), or fix the URL's path",
            url=url,
        )
        self.user = user
        self.vhost = vhost


class InvalidURL(ConnectError):
    """The broker URL cannot be used; nothing was connected."""

    def __init__(self, *, url: str, reason: str) -> None:
        super().__init__(
            f"invalid broker URL {safe_url(url)!r}: {reason}; expected {URL_FORM}",
            url=url,
        )
        self.reason = reason


# --- publishing -----------------------------------------------------------------------------


class PublishError(AmqtaskError):
    """The broker did not take responsibility for a message."""

    def __init__(self, message: str, *, task: str, message_id: str) -> None:
        super().__init__(message)
        self.task = task
        self.message_id = message_id


class PublishNacked(PublishError):
    """The broker nacked the publish: nothing was stored."""


class QueueFull(PublishNacked):
    """The contract's queue is at its `max_length` and refused the message (reject-publish).

    Nothing was stored. Back off, or pass `wait_if_full=` to `send` to keep trying for a while.
    """


class Unroutable(PublishError):
    """No queue is bound for the message; it was returned and not stored.

    Usually the topology was not declared: run `amqtask declare`.
    """


class PublishTimeout(PublishError):
    """No confirm arrived in time (for example while the broker blocks publishers).

    The message may or may not have been stored: sending it again can make a duplicate.
    """


class PublishInterrupted(PublishError):
    """The connection (or the publishing channel) dropped before the broker confirmed the message.

    Raised at once rather than waiting for the reconnect. The message may or may not have been
    stored: sending it again (once the connection is back) can make a duplicate.
    """


# --- topology -------------------------------------------------------------------------------


class TopologyError(AmqtaskError):
    """The broker's topology does not match what the contracts need."""


@dataclass(frozen=True, slots=True)
class Conflict:
    """One entity on the broker whose type or argument differs from the desired one."""

    kind: str  # "queue" or "exchange"
    entity: str
    argument: str
    expected: Any
    actual: Any

    def describe(self) -> str:
        return (
            f"{self.kind} {self.entity!r}: argument {self.argument!r} is "
            f"{_show(self.actual)} on the broker but the contracts want {_show(self.expected)}"
        )


def _show(value: Any) -> str:
    return "absent" if value is None else repr(value)


class TopologyConflict(TopologyError):
    """Existing entities differ from the desired ones; nothing was changed.

    Delete or migrate the entity named (or change the contract) and declare again.
    """

    def __init__(self, conflicts: Sequence[Conflict]) -> None:
        self.conflicts = tuple(conflicts)
        first = self.conflicts[0]
        self.kind, self.entity, self.argument = first.kind, first.entity, first.argument
        self.expected, self.actual = first.expected, first.actual
        lines = "\n".join(f"  - {conflict.describe()}" for conflict in self.conflicts)
        super().__init__(
            f"the broker holds {len(self.conflicts)} conflicting entit"
            f"{'y' if len(self.conflicts) == 1 else 'ies'}:\n{lines}\n"
            "RabbitMQ cannot change a declared entity's arguments: delete it (its messages too) "
            "or change the contract, then run `amqtask declare` again."
        )


class TopologyMissing(TopologyError):
    """Entities the worker or producer needs do not exist on the broker."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(
            f"missing on the broker: {', '.join(self.missing)}; "
            "run `amqtask declare MODULE:APP` to create them"
        )


# --- consuming ------------------------------------------------------------------------------


class DecodeError(AmqtaskError):
    """An incoming message could not be decoded into a task.

    `reason` is a short code (also written to the dead letter's headers), `detail` says why,
    and `body` keeps the raw bytes untouched.
    """

    def __init__(self, reason: str, detail: str, *, body: bytes) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.body = body


# --- running handlers (the exception a failed task records; retried like any failure) --------


class TimeLimitExceeded(AmqtaskError):
    """The task ran past its hard time limit: an `async def` was cancelled, a handler in a
    process pool had its process killed. Dead letters carry reason `time_limit`."""

    def __init__(self, seconds: float, *, killed: bool = False) -> None:
        how = "its process was killed" if killed else "it was cancelled"
        super().__init__(f"the task ran past its time limit of {seconds:g} s: {how}")
        self.seconds = seconds
        self.killed = killed


class HandlerCrashed(AmqtaskError):
    """The process that ran the handler died mid-task (a segfault, the OOM killer's SIGKILL,
    `os._exit`). Only that task fails; dead letters carry reason `crashed` and the exit code
    (`amqtask-exit-code`) or the signal (`amqtask-signal`)."""

    def __init__(self, *, exit_code: int | None = None, signal: str | None = None) -> None:
        how = f"was killed by {signal}" if signal else f"exited with code {exit_code}"
        super().__init__(f"the process running the handler {how} before the task finished")
        self.exit_code = exit_code
        self.signal = signal


# --- signals a handler raises on purpose (not errors: outside AmqtaskError) ----------------------


class Reject(Exception):
    """Raise from a handler to send the task straight to the dead-letter queue, never retried.

    `reason` is written to the dead letter's `amqtask-error` header.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SoftTimeLimitExceeded(Exception):
    """Raised inside a handler when its soft time limit has passed: catch it to clean up or
    return early. Uncaught, it fails the task with reason `time_limit`.

    An `async def` sees it at its current `await`; a plain `def` in a worker thread at its next
    Python instruction (a thread blocked in a C call sees it once the call returns); a handler
    in a process pool at once, also in `time.sleep` or a blocking read (SIGALRM).
    """

    def __init__(self, message: str = "the task ran past its soft time limit") -> None:
        super().__init__(message)


# --- rpc ------------------------------------------------------------------------------------


class CallError(AmqtaskError):
    """`App.call` did not produce a result; `task` names the contract called."""

    def __init__(self, message: str, *, task: str, correlation_id: str) -> None:
        super().__init__(message)
        self.task = task
        self.correlation_id = correlation_id


class RemoteError(CallError):
    """The worker answered the call with an error instead of a result.

    `remote_type` is the exception's qualified class name on the worker (for example
    `builtins.KeyError`), `remote_message` its message and `remote_traceback` its trimmed
    traceback (empty where there is none). `reason` says what failed: `handler_error` when the
    handler raised, or why the worker refused the request (`invalid_payload`, `unknown_task`, ...);
    a refused request is dead-lettered too.
    """

    def __init__(
        self,
        *,
        task: str,
        correlation_id: str,
        reason: str,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
    ) -> None:
        super().__init__(
            f"task {task!r} failed on the worker ({reason}): {remote_type}: {remote_message}",
            task=task,
            correlation_id=correlation_id,
        )
        self.reason = reason
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class InvalidReply(RemoteError):
    """The call's result does not fit the contract's output model.

    The worker checks the handler's return value before replying, and the caller checks the
    reply; a mismatch at either end (a buggy handler, or caller and worker holding different
    versions of the model) raises this, with pydantic's validation message as `remote_message`.
    """


class CallTimeout(CallError):
    """No reply arrived within the call's timeout.

    The request was published with an expiry equal to the timeout: a worker that had not started
    it drops it. One that had started it may still finish it; its late reply is discarded.
    """


class ConnectionLost(CallError):
    """The connection (or the channel the call used) closed while the call was in flight.

    Replies travel over that channel, so every call in flight on it fails at once; the request
    may or may not have been processed. Later calls use the restored connection.
    """


class TaskRevoked(CallError):
    """`App.result`: the task was revoked, so it has no result (`correlation_id` is its id)."""


class ResultTimeout(CallError):
    """`App.result`: the task did not finish within the timeout. It may still run and finish
    later; ask again, or look with `App.task`."""


# --- the task store ---------------------------------------------------------------------------


class StoreError(AmqtaskError):
    """The task store cannot do what was asked (or the app has none: `App(store=...)`)."""


class StoreUnavailable(StoreError):
    """The task store cannot be reached: down, refusing connections, or not answering in time.

    The URL in the message has no password. Workers keep running through an outage (see the
    README's "Task store"); this is raised to a caller who asked the store directly.
    """


class StoreMissing(StoreError):
    """The store's tables do not exist, or were made by another version of amqtask: run
    `amqtask declare APP`, which creates and migrates them."""
