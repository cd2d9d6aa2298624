"""A scheduler app for the failover test (`test_scheduler.py`), configured by the environment:
one schedule, `beat`, every TEST_EVERY seconds (default 1), on the task `{TEST_UNIQUE}.tick`."""

import os
from datetime import timedelta

from pydantic import BaseModel

import amqtask


class Tick(BaseModel):
    pass


UNIQUE = os.environ["TEST_UNIQUE"]
EVERY = float(os.environ.get("TEST_EVERY", "1"))

tick = amqtask.contract(f"{UNIQUE}.tick", Tick)
beat = amqtask.schedule("beat", tick, Tick(), every=timedelta(seconds=EVERY))
app = amqtask.App(os.environ["TEST_BROKER_URL"], [tick], namespace=UNIQUE, schedules=[beat])
