"""Broker URLs: shown without their password, and checked before connecting."""

from __future__ import annotations

import pytest

from amqtask._status import Management
from amqtask._urls import safe_url, url_problem, user_of, vhost_of


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:s3cret@host:5672/shop", "amqp://guest:***@host:5672/shop"),
        ("amqps://u:p%40ss@host/", "amqps://u:***@host/"),
        ("amqp://u:p@ss@host/x", "amqp://u:***@host/x"),  # an unencoded @ in the password
        ("http://admin:s3cret@host:15672", "http://admin:***@host:15672"),
        ("amqp://u:@host/", "amqp://u:***@host/"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("amqp://host", "amqp://host"),
    ],
)
def test_safe_url_replaces_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_safe_url_hides_the_user_part_of_a_url_too_broken_to_parse() -> None:
    shown = safe_url("amqp://guest:s3cret@[::1/vhost")

    assert "s3cret" not in shown
    assert shown == "amqp://***@[::1/vhost"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://guest:guest@host:5672/", "scheme 'http'"),
        ("host:5672", "scheme 'host'"),
        ("garbage", "no scheme"),
        ("amqp://guest:guest@host:abc/", "Port could not be cast"),
        ("amqp://guest:guest@host:99999/", "Port out of range"),
        ("amqp:///vhost", "no host"),
        ("amqp://guest:guest@[::1/", "Invalid IPv6 URL"),
    ],
)
def test_a_malformed_broker_url_is_named_before_connecting(url: str, problem: str) -> None:
    found = url_problem(url)

    assert found is not None
    assert problem in found


@pytest.mark.parametrize(
    "url", ["amqp://guest:guest@127.0.0.1:5672/", "amqps://h", "amqp://u:p@h/%2F", "amqp://[::1]/"]
)
def test_a_usable_broker_url_has_no_problem(url: str) -> None:
    assert url_problem(url) is None


def test_user_and_vhost_are_read_from_the_url_with_amqp_defaults() -> None:
    assert user_of("amqp://ada%40shop:pw@h/") == "ada@shop"
    assert user_of("amqp://h/") == "guest"
    assert vhost_of("amqp://h/shop%2Fa") == "shop/a"
    assert vhost_of("amqp://h") == "/"


def test_the_management_api_settings_never_show_the_password() -> None:
    management = Management.from_urls("http://admin:s3cret@host:15672", "amqp://guest:guest@h/")

    assert management.password == "s3cret"
    assert "s3cret" not in repr(management)
    assert management.base_url == "http://host:15672"
