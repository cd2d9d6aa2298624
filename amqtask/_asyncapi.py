"""An AsyncAPI 3.0.0 document of an app's contracts. Pure: no broker, no I/O.

What the document says, in AsyncAPI's terms (the README's "Wire format" says the same in prose):

* a **channel per task** (`task.{name}.v{version}`): the routing key on the task exchange that
  producers publish to (AMQP binding `is: routingKey`);
* a **channel per work queue** (`queue.{queue}`): what workers consume (`is: queue`); contracts
  that share a queue share its channel; and per work queue its **delay** channel (`delay.{queue}`:
  the routing key, with the delay in binary as a parameter, on the delay levels' entry exchange,
  used by delayed sends and retries), its **due** queue (`due.{queue}`: where delayed sends and
  retries arrive) and its **dead-letter** queue (`dead.{queue}`);
* a `replies` channel for tasks with a result: RabbitMQ's direct reply-to, whose address is the
  caller's `reply_to` property;
* **operations** `send.*` (producers, with a `reply` where the task has a result),
  `send.*.delayed`, `receive.*` and `receive.*.due` (workers), `retry.*` (workers, through the
  delay levels), `receive.dead.*` (operators: `amqtask dlq`) and `schedule.*` (the active
  scheduler: a schedule's ticks, with its definition in `x-amqtask-schedule`);
* **messages** in `components.messages`: the task (its input, every header it may carry), its
  result, its error reply and its dead letter; their payloads' JSON Schemas, from pydantic, in
  `components.schemas`.

AMQP properties are not headers: where a correlation id or reply address lives in one
(`correlation_id`, `reply_to`), the document's runtime expression names it as if it were a
header, and its description says so.

Payload schemas are pydantic's JSON Schema (draft 2020-12), which AsyncAPI's default schema format
(a superset of draft 07) reads except for a few newer keywords such as `prefixItems` (tuples).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import TypeAdapter

from amqtask import _codec
from amqtask._app import App
from amqtask._contract import Contract
from amqtask._schedule import schedule_dict
from amqtask._urls import vhost_of
from amqtask.routing import (
    DELAY_LEVELS,
    dead_letter_queue_name,
    due_queue_name,
)

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"

_ID = re.compile(r"[^\w.\-]")


def _id(text: str) -> str:
    """A component or channel key AsyncAPI accepts (`^[\\w\\d.\\-_]+$`)."""
    return _ID.sub("_", text)


def _server(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    server: dict[str, Any] = {
        "host": f"{host}:{port}",  # never the credentials
        "protocol": parts.scheme or "amqp",
        "protocolVersion": "0.9.1",
    }
    vhost = vhost_of(url)
    if vhost != "/":
        server["pathname"] = f"/{vhost}"
    return server


def _task_id(contract: Contract[Any, Any]) -> str:
    return _id(f"{contract.name}.v{contract.version}")


def _reasons() -> list[str]:
    return sorted(
        value
        for name, value in vars(_codec.Reasons).items()
        if not name.startswith("_") and isinstance(value, str)
    )


_TEXT = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}


def _task_headers(contract: Contract[Any, Any]) -> dict[str, Any]:
    """Every header a task message may carry: what a producer sets, and what amqtask adds."""
    version: dict[str, Any] = {
        "type": "integer",
        "const": contract.version,
        "description": "The contract's version (an integer, or its digits as a string). "
        + ("Absent means 1." if contract.version == 1 else "Required: absent means 1."),
    }
    if contract.version == 1:
        version["default"] = 1
    return {
        "type": "object",
        "properties": {
            _codec.TASK: {
                "type": "string",
                "const": contract.name,
                "description": "The task name (an AMQP long string). Required.",
            },
            _codec.VERSION: version,
            _codec.DEADLINE: {
                "type": "integer",
                "description": "Calls only: when the caller stops waiting, in milliseconds since "
                "the Unix epoch (an integer). A worker drops a request it could not start by then.",
            },
            "traceparent": {
                "type": "string",
                "description": "W3C trace context (optional): the worker's span joins that trace.",
            },
            "tracestate": {"type": "string", "description": "W3C trace context (optional)."},
            _codec.ATTEMPT: {
                "type": "integer",
                "minimum": 1,
                "description": "Set by amqtask on a retry: which attempt this delivery is "
                "(absent: 1). Producers leave it out.",
            },
            _codec.FIRST_FAILED_AT: {**_TIME, "description": "Set by amqtask on a retry."},
            _codec.FAILED_AT: {**_TIME, "description": "Set by amqtask on a retry."},
            _codec.ERROR: {**_TEXT, "description": "Set by amqtask on a retry: the last error."},
            _codec.ERROR_TYPE: {**_TEXT, "description": "Set by amqtask on a retry."},
            _codec.TRACEBACK: {**_TEXT, "description": "Set by amqtask on a retry."},
            _codec.SCHEDULE: {
                **_TEXT,
                "description": "Set by the scheduler on a scheduled task: the schedule's name.",
            },
            _codec.DUE: {
                **_TIME,
                "description": "Set by the scheduler on a scheduled task: the tick's due time "
                "(UTC). The message id derives from it and the schedule's name.",
            },
        },
        "required": [_codec.TASK] + ([_codec.VERSION] if contract.version != 1 else []),
    }


def _failure_headers(*, dead_letter: bool) -> dict[str, Any]:
    """Why a call failed (error reply) or a message was dead-lettered (added to its headers)."""
    properties: dict[str, Any] = {
        _codec.REASON: {
            "type": "string",
            "enum": _reasons(),
            "description": "Why, as a code (see the README).",
        },
        _codec.ERROR: {**_TEXT, "description": "What went wrong, for a human."},
        _codec.ERROR_TYPE: {
            **_TEXT,
            "description": "The exception class of a failed handler (`builtins.KeyError`).",
        },
        _codec.TRACEBACK: {**_TEXT, "description": "The handler's traceback, trimmed."},
        _codec.TASK: _TEXT,
    }
    if dead_letter:
        properties.update(
            {
                _codec.VERSION: {"type": "integer"},
                _codec.ORIGIN_QUEUE: {**_TEXT, "description": "The work queue it came from."},
                _codec.FAILED_AT: _TIME,
                _codec.FIRST_FAILED_AT: _TIME,
                _codec.ATTEMPT: {"type": "integer", "description": "Attempts made."},
                _codec.EXIT_CODE: {
                    "type": "integer",
                    "description": "reason crashed: the exit code of the handler's process.",
                },
                _codec.SIGNAL: {
                    **_TEXT,
                    "description": "reason crashed: the signal that killed it (SIGKILL, ...).",
                },
                _codec.DROPPED_HEADERS: {
                    **_TEXT,
                    "description": "Headers left off to fit the frame, comma-separated.",
                },
            }
        )
    required = [_codec.REASON, _codec.ERROR] + (
        [_codec.ORIGIN_QUEUE, _codec.FAILED_AT] if dead_letter else []
    )
    return {"type": "object", "properties": properties, "required": required}


def _queue_binding(name: str, vhost: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {
                "name": name,
                "durable": True,
                "exclusive": False,
                "autoDelete": False,
                "vhost": vhost,
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(parts)}


def document(
    app: App, *, title: str | None = None, version: str = "1.0.0", description: str | None = None
) -> dict[str, Any]:
    """The app's contracts as an AsyncAPI 3.0.0 document (a JSON-ready dict)."""
    names = app.names
    vhost = vhost_of(app.url)
    contracts = sorted(app.contracts, key=lambda c: (c.name, c.version))

    # One schema generation for every payload, so models used by several tasks appear once and
    # two different models of the same name get distinct keys.
    inputs: list[tuple[tuple[str, str], Any, TypeAdapter[Any]]] = []
    for contract in contracts:
        inputs.append(((_task_id(contract), "input"), "validation", TypeAdapter(contract.input)))
        if contract.output is not None:
            output = TypeAdapter(contract.output)
            inputs.append(((_task_id(contract), "output"), "validation", output))
    payloads, definitions = TypeAdapter.json_schemas(
        inputs, ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = definitions.get("$defs", {})

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    replies: dict[str, Any] = {}

    def exchange(name: str, kind: str) -> dict[str, Any]:
        return {"name": name, "type": kind, "durable": True, "autoDelete": False, "vhost": vhost}

    for contract in contracts:
        task_id = _task_id(contract)
        message_id = task_id
        result_id, error_id, dead_id = (f"{task_id}.{kind}" for kind in ("result", "error", "dead"))
        queue_id = _id(contract.queue)
        messages[message_id] = {
            "name": contract.name,
            "title": f"{contract.name} v{contract.version}",
            "summary": f"A {contract.name} task (input model {contract.input.__name__}).",
            "description": "Body: the input model as JSON (UTF-8; gzip or deflate with "
            "content_encoding). Properties: content_type application/json, a unique message_id "
            f"(kept on retries), delivery_mode 2, type {contract.name!r}. A call also sets "
            "reply_to (amq.rabbitmq.reply-to), correlation_id, expiration (the caller's timeout "
            f"in milliseconds) and the {_codec.DEADLINE} header.",
            "contentType": _codec.CONTENT_TYPE,
            "headers": _task_headers(contract),
            "payload": payloads[((task_id, "input"), "validation")],
            "correlationId": {
                "description": "Calls: the AMQP correlation_id property (a property, not a "
                "header); amqtask uses the message id. The reply carries it back.",
                "location": "$message.header#/correlation_id",
            },
            "bindings": {
                "amqp": {"messageType": contract.name, "bindingVersion": AMQP_BINDING_VERSION}
            },
        }
        messages[dead_id] = {
            "name": f"{contract.name}.dead",
            "title": f"{contract.name} v{contract.version} dead letter",
            "summary": "The task message as it was (body, message_id, content type and "
            "encoding byte for byte), with why it failed added to its headers.",
            "contentType": _codec.CONTENT_TYPE,
            "headers": _failure_headers(dead_letter=True),
            "payload": payloads[((task_id, "input"), "validation")],
        }
        if contract.output is not None:
            messages[result_id] = {
                "name": f"{contract.name}.result",
                "title": f"{contract.name} v{contract.version} result",
                "summary": f"The reply to a {contract.name} call, sent to the caller's reply_to "
                "with the request's correlation_id.",
                "contentType": _codec.CONTENT_TYPE,
                "headers": {
                    "type": "object",
                    "properties": {
                        _codec.TASK: {"type": "string", "const": contract.name},
                        _codec.VERSION: {"type": "integer", "const": contract.version},
                    },
                },
                "payload": payloads[((task_id, "output"), "validation")],
                "correlationId": {"$ref": f"#/components/messages/{message_id}/correlationId"},
            }
            messages[error_id] = {
                "name": f"{contract.name}.error",
                "title": f"{contract.name} v{contract.version} error reply",
                "summary": f"The reply to a {contract.name} call that failed: an empty body, no "
                f"content type, and why in the headers ({_codec.REASON} is always set; a "
                f"success never carries it).",
                "contentType": "application/octet-stream",
                "headers": _failure_headers(dead_letter=False),
                "payload": {"type": "string", "maxLength": 0},
                "correlationId": {"$ref": f"#/components/messages/{message_id}/correlationId"},
            }
            replies[result_id] = _ref("components", "messages", result_id)
            replies[error_id] = _ref("components", "messages", error_id)

        send_channel = f"task.{task_id}"
        channels[send_channel] = {
            "address": contract.routing_key,
            "title": f"{contract.name} v{contract.version}",
            "description": f"Routing key {contract.routing_key!r} on the direct exchange "
            f"{names.task_exchange!r}, bound to the work queue {contract.queue!r}.",
            "messages": {message_id: _ref("components", "messages", message_id)},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": exchange(names.task_exchange, "direct"),
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }

        queue_channel = f"queue.{queue_id}"
        channel = channels.setdefault(
            queue_channel,
            {
                "address": contract.queue,
                "title": f"queue {contract.queue}",
                "description": f"The {contract.queue_type.value} work queue {contract.queue!r}; "
                f"what its workers reject goes to {dead_letter_queue_name(contract.queue)!r}.",
                "messages": {},
                "bindings": _queue_binding(contract.queue, vhost),
            },
        )
        channel["messages"][message_id] = _ref("components", "messages", message_id)

        delay_channel = f"delay.{queue_id}"
        delay = channels.setdefault(
            delay_channel,
            {
                "address": "{delay}." + contract.queue,
                "title": f"delayed to {contract.queue}",
                "description": f"Routing key on the topic exchange {names.delay_entry_exchange!r}"
                " (the delay levels' entry): the delay in whole seconds as "
                f"{DELAY_LEVELS} binary digits, most significant first, each followed by a dot, "
                f"then the work queue's name. The message waits, then arrives in "
                f"{due_queue_name(contract.queue)!r}. Delayed sends and retries go this way.",
                "parameters": {
                    "delay": {
                        "description": f"{DELAY_LEVELS} words of 0 or 1 joined by dots: 5 s is "
                        + ".".join(f"{(5 >> k) & 1}" for k in reversed(range(DELAY_LEVELS))),
                    }
                },
                "messages": {},
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": exchange(names.delay_entry_exchange, "topic"),
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
            },
        )
        delay["messages"][message_id] = _ref("components", "messages", message_id)

        due_channel = f"due.{queue_id}"
        due = channels.setdefault(
            due_channel,
            {
                "address": due_queue_name(contract.queue),
                "title": f"due queue of {contract.queue}",
                "description": "Delayed sends and retries whose delay is over; consumed by the "
                f"workers of {contract.queue!r} like the work queue itself.",
                "messages": {},
                "bindings": _queue_binding(due_queue_name(contract.queue), vhost),
            },
        )
        due["messages"][message_id] = _ref("components", "messages", message_id)

        dead_channel = f"dead.{queue_id}"
        dead = channels.setdefault(
            dead_channel,
            {
                "address": dead_letter_queue_name(contract.queue),
                "title": f"dead letters of {contract.queue}",
                "description": f"Published by the workers to the direct exchange "
                f"{names.dead_letter_exchange!r} with routing key {contract.queue!r}; "
                "read and replayed with `amqtask dlq`.",
                "messages": {},
                "bindings": _queue_binding(dead_letter_queue_name(contract.queue), vhost),
            },
        )
        dead["messages"][dead_id] = _ref("components", "messages", dead_id)

        reply = None
        if contract.output is not None:
            reply = {
                "address": {
                    "description": "The request's reply_to property (a property, not a header): "
                    "amq.rabbitmq.reply-to, consumed with no-ack on the channel that publishes "
                    "the request.",
                    "location": "$message.header#/reply_to",
                },
                "channel": _ref("channels", "replies"),
                "messages": [
                    _ref("channels", "replies", "messages", result_id),
                    _ref("channels", "replies", "messages", error_id),
                ],
            }
        publish_binding = {
            "amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": AMQP_BINDING_VERSION}
        }
        operations[f"send.{task_id}"] = {
            "action": "send",
            "channel": _ref("channels", send_channel),
            "title": f"Send {contract.name} v{contract.version}",
            "summary": "Published persistent and mandatory, with publisher confirms.",
            "messages": [_ref("channels", send_channel, "messages", message_id)],
            "bindings": publish_binding,
            **({"reply": reply} if reply else {}),
        }
        operations[f"send.{task_id}.delayed"] = {
            "action": "send",
            "channel": _ref("channels", delay_channel),
            "title": f"Send {contract.name} v{contract.version} after a delay",
            "summary": "1 s to 12 days, in whole seconds; the same message as a send.",
            "messages": [_ref("channels", delay_channel, "messages", message_id)],
            "bindings": publish_binding,
        }
        operations[f"retry.{task_id}"] = {
            "action": "send",
            "channel": _ref("channels", delay_channel),
            "title": f"Retry {contract.name} v{contract.version}",
            "summary": f"A worker re-publishes a failed task for its next attempt (up to "
            f"{contract.retry.attempts} in all) after the retry delay, with "
            f"{_codec.ATTEMPT} and the last error in its headers.",
            "messages": [_ref("channels", delay_channel, "messages", message_id)],
            "bindings": publish_binding,
        }
        ack = {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}}
        operations[f"receive.{task_id}"] = {
            "action": "receive",
            "channel": _ref("channels", queue_channel),
            "title": f"Run {contract.name} v{contract.version}",
            "summary": f"Acked after the handler returned; retried up to "
            f"{contract.retry.attempts} attempt(s), then dead-lettered.",
            "messages": [_ref("channels", queue_channel, "messages", message_id)],
            "bindings": ack,
            **({"reply": reply} if reply else {}),
        }
        operations[f"receive.{task_id}.due"] = {
            "action": "receive",
            "channel": _ref("channels", due_channel),
            "title": f"Run {contract.name} v{contract.version} when due",
            "summary": "Delayed sends and retries, run like the others.",
            "messages": [_ref("channels", due_channel, "messages", message_id)],
            "bindings": ack,
        }
        dead_operation = operations.setdefault(
            f"receive.dead.{queue_id}",
            {
                "action": "receive",
                "channel": _ref("channels", dead_channel),
                "title": f"Dead letters of {contract.queue}",
                "summary": "What operators list, replay or purge with `amqtask dlq`.",
                "messages": [],
            },
        )
        dead_operation["messages"].append(_ref("channels", dead_channel, "messages", dead_id))

    for item in sorted(app.schedules, key=lambda s: s.name):
        task_id = _task_id(item.contract)
        send_channel = f"task.{task_id}"
        zone = f" ({item.tz})" if item.cron is not None else ""
        operations[f"schedule.{_id(item.name)}"] = {
            "action": "send",
            "channel": _ref("channels", send_channel),
            "title": f"Schedule {item.name}",
            "summary": f"{item.contract.name} v{item.contract.version} at {item.expression}"
            f"{zone}, published by the active scheduler like a send.",
            "description": f"Each tick carries {_codec.SCHEDULE} and {_codec.DUE} headers and a "
            "message id derived from both: a tick published twice (a failover) has one id. "
            f"Misfire policy {item.misfire.value}, catch-up window "
            f"{item.catch_up.total_seconds():g} s.",
            "messages": [_ref("channels", send_channel, "messages", task_id)],
            "bindings": {
                "amqp": {
                    "deliveryMode": 2,
                    "mandatory": True,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
            "x-amqtask-schedule": schedule_dict(item),
        }

    if replies:
        channels["replies"] = {
            "address": None,
            "title": "direct reply-to",
            "description": "RabbitMQ direct reply-to (amq.rabbitmq.reply-to): a worker replies "
            "through the default exchange to the request's reply_to property, with its "
            f"correlation_id. A reply whose {_codec.REASON} header is set is an error reply.",
            "messages": replies,
        }

    info: dict[str, Any] = {
        "title": title or f"amqtask tasks ({names.namespace})",
        "version": version,
    }
    if description:
        info["description"] = description
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": info,
        "servers": {"broker": _server(app.url)},
        "defaultContentType": _codec.CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
