"""The example's contracts: imported by the producer and the worker alike. No handler code here."""

from pydantic import BaseModel, Field

import amqtask


class Resize(BaseModel):
    path: str
    width: int = Field(gt=0, le=10_000)


class Resized(BaseModel):
    path: str
    size: int


class Notify(BaseModel):
    user: str
    text: str


resize = amqtask.contract("images.resize", Resize, returns=Resized, queue="images")
# Retried (1 s, 2 s apart) only when the mail server is unreachable; any other error, such as an
# unknown user, goes straight to the dead-letter queue.
notify = amqtask.contract(
    "users.notify",
    Notify,
    queue="notifications",
    max_length=10_000,
    retry=amqtask.Retry(attempts=3, initial=1.0, on=(ConnectionError,)),
)

CONTRACTS = [resize, notify]
