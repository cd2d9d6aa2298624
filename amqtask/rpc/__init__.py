"""Request/response over RabbitMQ direct reply-to (`App.call`)."""
