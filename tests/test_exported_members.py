"""The curated public API: `amqtask.__all__` is exactly what the package exposes."""

from __future__ import annotations

import types

import amqtask


def test_every_name_in_all_exists_on_the_package() -> None:
    missing = [name for name in amqtask.__all__ if not hasattr(amqtask, name)]

    assert missing == []


def test_all_lists_each_name_once() -> None:
    assert len(amqtask.__all__) == len(set(amqtask.__all__))


def test_every_public_attribute_of_the_package_is_in_all() -> None:
    public = {
        name
        for name, value in vars(amqtask).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }

    assert public - set(amqtask.__all__) == set()


def test_exported_objects_say_they_belong_to_amqtask() -> None:
    foreign = [
        name
        for name in amqtask.__all__
        if not getattr(amqtask, name).__module__.startswith("amqtask.")
    ]

    assert foreign == []


def test_every_connect_failure_is_an_exported_connect_error() -> None:
    cases = [
        amqtask.BrokerUnreachable,
        amqtask.ConnectTimeout,
        amqtask.AuthenticationFailed,
        amqtask.VhostRefused,
        amqtask.InvalidURL,
    ]

    assert all(issubclass(case, amqtask.ConnectError) for case in cases)
    assert issubclass(amqtask.ConnectError, amqtask.AmqtaskError)
