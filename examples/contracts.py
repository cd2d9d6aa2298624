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
notify = amqtask.contract("users.notify", Notify, queue="notifications", max_length=10_000)

CONTRACTS = [resize, notify]
