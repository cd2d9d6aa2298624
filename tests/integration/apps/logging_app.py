"""A worker app whose handlers log through the standard library, as most handlers do: an async
handler with `logging.info` and `logging.warning`, and a thread handler that logs a traceback.

`build(unique, url)` makes it; the module-level `app` is built from TEST_UNIQUE and
TEST_BROKER_URL when they are set, so tests can import `build` without them.
"""

import logging
import os

from pydantic import BaseModel

import amqtask

log = logging.getLogger("logging_app")


class Job(BaseModel):
    n: int


def build(unique: str, url: str) -> amqtask.App:
    chatty = amqtask.contract(f"{unique}.chatty", Job)
    troubled = amqtask.contract(f"{unique}.troubled", Job)
    app = amqtask.App(url, [chatty, troubled], namespace=unique)

    @app.handler(chatty)
    async def talk(task: Job) -> None:
        logging.info("handler_info n=%d", task.n)  # the root logger, as a quick script does
        log.warning("handler_warning n=%d", task.n, extra={"n": task.n})

    @app.handler(troubled)
    def struggle(task: Job) -> None:  # a plain def: runs in a worker thread
        try:
            raise ValueError(f"handled inside the handler: {task.n}")
        except ValueError:
            log.exception("handler_recovered n=%d", task.n)

    return app


if "TEST_UNIQUE" in os.environ:
    app = build(os.environ["TEST_UNIQUE"], os.environ["TEST_BROKER_URL"])
