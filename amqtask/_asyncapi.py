"""An AsyncAPI 3.0.0 document of an app's contracts. Pure: no broker, no I/O.

What the document says, in AsyncAPI's terms:

* a **channel per task** (`task.{name}.v{version}`): the routing key on the task exchange that
  producers publish to (AMQP binding `is: routingKey`);
* a **channel per work queue** (`queue.{queue}`): what workers consume (`is: queue`); contracts
  that share a queue share its channel;
* a `replies` channel for tasks with a result: RabbitMQ's direct reply-to, whose address is the
  caller's `reply_to` property (null: known only at run time);
* **operations** `send.*` (producers) and `receive.*` (workers), with a `reply` where the task
  has a result;
* **messages** in `components.messages` (the task's input, its headers, and its result) and their
  payloads' JSON Schemas, from pydantic, in `components.schemas`.

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
from amqtask._urls import vhost_of
from amqtask.routing import dead_letter_queue_name

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
    exchange = {
        "name": names.task_exchange,
        "type": "direct",
        "durable": True,
        "autoDelete": False,
        "vhost": vhost,
    }

    for contract in contracts:
        task_id = _task_id(contract)
        message_id, result_id = task_id, f"{task_id}.result"
        messages[message_id] = {
            "name": contract.name,
            "title": f"{contract.name} v{contract.version}",
            "summary": f"A {contract.name} task (input model {contract.input.__name__}).",
            "contentType": _codec.CONTENT_TYPE,
            "headers": {
                "type": "object",
                "properties": {
                    _codec.TASK: {"type": "string", "const": contract.name},
                    _codec.VERSION: {"type": "integer", "const": contract.version},
                },
                "required": [_codec.TASK, _codec.VERSION],
            },
            "payload": payloads[((task_id, "input"), "validation")],
            "bindings": {
                "amqp": {"messageType": contract.name, "bindingVersion": AMQP_BINDING_VERSION}
            },
        }
        if contract.output is not None:
            messages[result_id] = {
                "name": f"{contract.name}.result",
                "title": f"{contract.name} v{contract.version} result",
                "summary": f"The reply to a {contract.name} call, sent to the caller's reply_to "
                "with the request's correlation_id.",
                "contentType": _codec.CONTENT_TYPE,
                "payload": payloads[((task_id, "output"), "validation")],
            }
            replies[result_id] = {"$ref": f"#/components/messages/{result_id}"}

        send_channel = f"task.{task_id}"
        channels[send_channel] = {
            "address": contract.routing_key,
            "title": f"{contract.name} v{contract.version}",
            "description": f"Routing key {contract.routing_key!r} on the direct exchange "
            f"{names.task_exchange!r}, bound to the work queue {contract.queue!r}.",
            "messages": {message_id: {"$ref": f"#/components/messages/{message_id}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": exchange,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }

        queue_channel = f"queue.{_id(contract.queue)}"
        channel = channels.setdefault(
            queue_channel,
            {
                "address": contract.queue,
                "title": f"queue {contract.queue}",
                "description": f"The {contract.queue_type.value} work queue {contract.queue!r}; "
                f"what its workers reject goes to {dead_letter_queue_name(contract.queue)!r}.",
                "messages": {},
                "bindings": {
                    "amqp": {
                        "is": "queue",
                        "queue": {
                            "name": contract.queue,
                            "durable": True,
                            "exclusive": False,
                            "autoDelete": False,
                            "vhost": vhost,
                        },
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
            },
        )
        channel["messages"][message_id] = {"$ref": f"#/components/messages/{message_id}"}

        reply = None
        if contract.output is not None:
            reply = {
                "channel": {"$ref": "#/channels/replies"},
                "messages": [{"$ref": f"#/channels/replies/messages/{result_id}"}],
            }
        operations[f"send.{task_id}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{send_channel}"},
            "title": f"Send {contract.name} v{contract.version}",
            "summary": "Published persistent and mandatory, with publisher confirms.",
            "messages": [{"$ref": f"#/channels/{send_channel}/messages/{message_id}"}],
            "bindings": {
                "amqp": {
                    "deliveryMode": 2,
                    "mandatory": True,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
            **({"reply": reply} if reply else {}),
        }
        operations[f"receive.{task_id}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{queue_channel}"},
            "title": f"Run {contract.name} v{contract.version}",
            "summary": f"Acked after the handler returned; retried up to "
            f"{contract.retry.attempts} attempt(s), then dead-lettered.",
            "messages": [{"$ref": f"#/channels/{queue_channel}/messages/{message_id}"}],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
            **({"reply": reply} if reply else {}),
        }

    if replies:
        channels["replies"] = {
            "address": None,
            "title": "direct reply-to",
            "description": "RabbitMQ direct reply-to (amq.rabbitmq.reply-to): a worker replies "
            "through the default exchange to the request's reply_to property, with its "
            "correlation_id.",
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
