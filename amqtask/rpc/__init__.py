"""Request/response over RabbitMQ direct reply-to (`App.call`)."""

from amqtask.rpc._caller import Caller

__all__ = ["Caller"]
