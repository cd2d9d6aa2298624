"""Unit tests of the AsyncAPI document (`amqtask._asyncapi`).

No package on PyPI ships the official AsyncAPI 3.0.0 JSON Schema (the ones that model AsyncAPI 3
carry Python classes, not the schema), so these tests assert the structure the 3.0.0
specification requires instead: the version, `info.title`/`info.version`, channels with an
address and messages, operations whose `action` is send or receive and whose channel and
messages are `$ref`s into the document (an operation's messages must be its channel's), keys of
the allowed form, and every `$ref` resolving.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson
from pydantic import BaseModel

import amqtask
import amqtask._codec
import amqtask.routing
from amqtask._asyncapi import document, vhost_of

KEY = re.compile(r"^[\w\d.\-_]+$")  # the spec's pattern for component, channel, operation keys


class Resize(BaseModel):
    path: str
    width: int


class Resized(BaseModel):
    path: str
    size: int


class Notify(BaseModel):
    user: str
    text: str


resize = amqtask.contract("images.resize", Resize, returns=Resized, queue="images")
resize_v2 = amqtask.contract("images.resize", Resize, returns=Resized, version=2)
notify = amqtask.contract("users:notify", Notify, queue="images")  # shares the queue
count = amqtask.contract("stats.count", Notify, returns=int, queue_type="classic")

APP = amqtask.App(
    "amqp://user:secret@broker.example:5673/prod",
    [resize, resize_v2, notify, count],
    namespace="shop",
    schedules=[
        amqtask.schedule(
            "nightly:resize", resize, Resize(path="all", width=64), cron="0 3 * * *", tz="UTC"
        )
    ],
)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict)
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_the_document_has_the_structure_asyncapi_3_requires() -> None:
    doc = document(APP, version="2.1.0")

    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"] == {"title": "amqtask tasks (shop)", "version": "2.1.0"}
    assert doc["defaultContentType"] == "application/json"
    for section in ("channels", "operations"):
        assert all(KEY.match(key) for key in doc[section]), doc[section].keys()
    for section in ("schemas", "messages"):
        assert all(KEY.match(key) for key in doc["components"][section])
    for channel in doc["channels"].values():
        assert "address" in channel
        assert channel["address"] is None or isinstance(channel["address"], str)
        assert channel["messages"]
    for operation in doc["operations"].values():
        assert operation["action"] in ("send", "receive")
        channel_ref = operation["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/")
        channel = resolve(doc, channel_ref)
        # An operation's messages are references to messages of its channel.
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/")
        if "reply" in operation:
            reply_channel = operation["reply"]["channel"]["$ref"]
            for message in operation["reply"]["messages"]:
                assert message["$ref"].startswith(reply_channel + "/messages/")
        assert channel
    for key, message in doc["components"]["messages"].items():
        assert message["payload"]
        error_reply = key.endswith(".error")  # an empty body, no content type
        assert message["contentType"] == (
            "application/octet-stream" if error_reply else "application/json"
        )
        if "headers" in message:
            assert message["headers"]["type"] == "object"
    for ref in refs(doc):
        resolve(doc, ref)
    # JSON all the way (what the command writes).
    assert orjson.loads(orjson.dumps(doc)) == doc


def test_each_task_has_a_routing_key_channel_and_each_queue_one_channel() -> None:
    doc = document(APP)
    channels = doc["channels"]

    task = channels["task.images.resize.v1"]
    assert task["address"] == "images.resize.v1"
    assert task["bindings"]["amqp"] == {
        "is": "routingKey",
        "exchange": {
            "name": "shop.tasks",
            "type": "direct",
            "durable": True,
            "autoDelete": False,
            "vhost": "prod",
        },
        "bindingVersion": "0.3.0",
    }
    assert channels["task.images.resize.v2"]["address"] == "images.resize.v2"
    assert channels["task.users_notify.v1"]["address"] == "users:notify.v1"

    shared = channels["queue.images"]
    assert shared["address"] == "images"
    assert shared["bindings"]["amqp"]["is"] == "queue"
    assert shared["bindings"]["amqp"]["queue"]["name"] == "images"
    assert set(shared["messages"]) == {"images.resize.v1", "users_notify.v1"}
    assert channels["queue.images.resize.v2"]["address"] == "images.resize.v2"


def test_send_and_receive_operations_with_replies_for_results() -> None:
    doc = document(APP)
    operations = doc["operations"]

    send = operations["send.images.resize.v1"]
    assert send["action"] == "send"
    assert send["channel"] == {"$ref": "#/channels/task.images.resize.v1"}
    assert send["bindings"]["amqp"]["deliveryMode"] == 2
    assert send["reply"]["channel"] == {"$ref": "#/channels/replies"}
    assert resolve(doc, send["reply"]["messages"][0]["$ref"]) == {
        "$ref": "#/components/messages/images.resize.v1.result"
    }
    receive = operations["receive.users_notify.v1"]
    assert receive["action"] == "receive"
    assert receive["channel"] == {"$ref": "#/channels/queue.images"}
    assert "reply" not in receive  # no result
    assert doc["channels"]["replies"]["address"] is None
    tasks = ("images.resize.v1", "images.resize.v2", "users_notify.v1", "stats.count.v1")
    assert set(operations) == {
        *(f"{action}.{task}" for action in ("send", "receive", "retry") for task in tasks),
        *(f"send.{task}.delayed" for task in tasks),
        *(f"receive.{task}.due" for task in tasks),
        *(f"receive.dead.{queue}" for queue in ("images", "images.resize.v2", "stats.count")),
        "schedule.nightly_resize",
    }


def test_messages_carry_headers_and_payload_schemas_from_the_models() -> None:
    doc = document(APP)
    messages = doc["components"]["messages"]
    schemas = doc["components"]["schemas"]

    message = messages["images.resize.v1"]
    assert message["name"] == "images.resize"
    assert message["payload"] == {"$ref": "#/components/schemas/Resize"}
    assert message["headers"]["properties"]["amqtask-task"]["const"] == "images.resize"
    assert message["headers"]["properties"]["amqtask-version"]["const"] == 1
    assert schemas["Resize"] == Resize.model_json_schema()
    assert schemas["Resized"] == Resized.model_json_schema()
    assert messages["images.resize.v1.result"]["payload"] == {
        "$ref": "#/components/schemas/Resized"
    }
    # A result that is not a model is described inline.
    assert messages["stats.count.v1.result"]["payload"] == {"type": "integer"}


def test_the_server_never_shows_credentials() -> None:
    doc = document(APP, title="Shop")

    assert doc["info"]["title"] == "Shop"
    assert doc["servers"] == {
        "broker": {
            "host": "broker.example:5673",
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
            "pathname": "/prod",
        }
    }
    assert b"secret" not in orjson.dumps(doc)


def test_vhost_of_an_amqp_url() -> None:
    assert vhost_of("amqp://guest:guest@127.0.0.1:5672/") == "/"
    assert vhost_of("amqp://127.0.0.1") == "/"
    assert vhost_of("amqp://h/%2F") == "/"
    assert vhost_of("amqp://h/shop") == "shop"


def test_every_header_a_task_message_may_carry_is_described_and_only_the_task_is_required() -> None:
    messages = document(APP)["components"]["messages"]

    v1 = messages["images.resize.v1"]["headers"]
    assert set(v1["properties"]) == {
        "amqtask-task",
        "amqtask-version",
        "amqtask-deadline",
        "amqtask-attempt",
        "amqtask-first-failed-at",
        "amqtask-failed-at",
        "amqtask-error",
        "amqtask-error-type",
        "amqtask-traceback",
        "amqtask-schedule",
        "amqtask-due",
        "traceparent",
        "tracestate",
    }
    assert v1["required"] == ["amqtask-task"]  # a missing version means 1
    assert v1["properties"]["amqtask-version"]["default"] == 1
    # Version 2 must say so: without the header a worker reads version 1.
    assert messages["images.resize.v2"]["headers"]["required"] == [
        "amqtask-task",
        "amqtask-version",
    ]


def test_the_amqp_type_claimed_is_the_task_name_the_messages_carry() -> None:
    message = document(APP)["components"]["messages"]["users_notify.v1"]

    assert message["bindings"]["amqp"]["messageType"] == "users:notify"
    assert amqtask._codec.encode_task(notify, {"user": "u", "text": "t"}).type == "users:notify"


def test_a_call_is_answered_with_a_result_or_an_error_reply() -> None:
    doc = document(APP)
    send = doc["operations"]["send.images.resize.v1"]
    messages = doc["components"]["messages"]

    replies = [resolve(doc, ref["$ref"]) for ref in send["reply"]["messages"]]
    assert replies == [
        {"$ref": "#/components/messages/images.resize.v1.result"},
        {"$ref": "#/components/messages/images.resize.v1.error"},
    ]
    assert send["reply"]["address"]["location"] == "$message.header#/reply_to"
    error = messages["images.resize.v1.error"]
    assert error["headers"]["required"] == ["amqtask-reason", "amqtask-error"]
    assert "handler_error" in error["headers"]["properties"]["amqtask-reason"]["enum"]
    assert error["payload"] == {"type": "string", "maxLength": 0}
    assert messages["images.resize.v1"]["correlationId"]["location"] == (
        "$message.header#/correlation_id"
    )
    assert "users_notify.v1.error" not in messages  # no result: nobody to answer


def test_delays_retries_and_dead_letters_have_channels_of_their_own() -> None:
    doc = document(APP)
    channels = doc["channels"]

    delay = channels["delay.images"]
    assert delay["address"] == "{delay}.images"
    assert delay["bindings"]["amqp"]["exchange"]["name"] == "shop.delay.19"
    assert delay["bindings"]["amqp"]["exchange"]["type"] == "topic"
    five = delay["parameters"]["delay"]["description"].rsplit(" ", 1)[1]
    assert f"{five}.images" == amqtask.routing.delay_routing_key(5, "images")
    assert channels["due.images"]["address"] == "images.due"
    assert channels["dead.images"]["address"] == "images.dead"
    assert set(channels["dead.images"]["messages"]) == {
        "images.resize.v1.dead",
        "users_notify.v1.dead",
    }
    dead = doc["components"]["messages"]["images.resize.v1.dead"]["headers"]
    assert {"amqtask-reason", "amqtask-queue", "amqtask-failed-at"} <= set(dead["required"])
    retry = doc["operations"]["retry.images.resize.v1"]
    assert retry["action"] == "send"
    assert retry["channel"] == {"$ref": "#/channels/delay.images"}


def test_a_schedule_is_a_send_operation_on_its_task_s_channel() -> None:
    doc = document(APP)

    operation = doc["operations"]["schedule.nightly_resize"]

    assert operation["action"] == "send"
    assert operation["channel"] == {"$ref": "#/channels/task.images.resize.v1"}
    assert operation["messages"] == [
        {"$ref": "#/channels/task.images.resize.v1/messages/images.resize.v1"}
    ]
    assert operation["x-amqtask-schedule"]["cron"] == "0 3 * * *"
    assert operation["x-amqtask-schedule"]["payload"] == {"path": "all", "width": 64}
