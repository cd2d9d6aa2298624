"""The example services' test setup: `amqtask_testapp` runs them in memory (amqtask.testing)."""

import pytest

import amqtask
from examples.app import app
from examples.producer import producer


@pytest.fixture
def amqtask_app() -> list[amqtask.App]:
    """The worker service and the producer service, sharing one in-memory broker."""
    return [app, producer]
