"""`--url` and `AMQTASK_URL`: every command that loads an APP takes the broker's URLs from them,
over the app's own. The brokers here are closed local ports: no broker needed."""

from __future__ import annotations

import socket
import textwrap
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from amqtask._cli import _worker_options, cli


def closed_url(password: str = "s3cret") -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"amqp://guest:{password}@127.0.0.1:{port}/"


@pytest.fixture
def app_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An app module whose own URL is a closed port that no test should reach."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AMQTASK_URL", raising=False)
    module = f"urls_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel
            import amqtask

            class Job(BaseModel):
                n: int

            job = amqtask.contract("jobs.run", Job)
            app = amqtask.App("amqp://guest:apppass@127.0.0.1:9/", [job], connect_timeout=2)
            """
        )
    )
    return f"{module}:app"


def commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    found: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += commands(command, (*prefix, name))
        else:
            found.append(((*prefix, name), command))
    return found


def test_every_command_that_loads_an_app_takes_url_and_the_contracts_commands_do_not() -> None:
    taking = {}
    for path, command in commands(cli):
        names = {param.name for param in command.params}
        takes = "url" in names
        assert takes is ("app_path" in names and path[0] != "contracts"), path
        taking[path] = takes

    assert all(taking[path] for path in [("declare",), ("worker",), ("dlq", "list")])
    assert not taking[("contracts", "export")]


def test_url_replaces_the_apps_url_and_never_shows_its_password(app_target: str) -> None:
    url = closed_url()

    result = CliRunner().invoke(cli, ["send", app_target, "jobs.run", '{"n": 1}', "--url", url])

    assert result.exit_code == 1, result.output
    assert url.replace("s3cret", "***") in result.output
    assert "s3cret" not in result.output
    assert ":9/" not in result.output  # the app's own URL was not used


def test_repeated_url_options_are_the_nodes_of_a_cluster_tried_in_turn(app_target: str) -> None:
    first, second = closed_url(), closed_url()

    result = CliRunner().invoke(
        cli, ["status", app_target, "--url", first, "--url", second], catch_exceptions=False
    )

    assert result.exit_code == 1, result.output
    assert first.replace("s3cret", "***") in result.output
    assert second.replace("s3cret", "***") in result.output


def test_amqtask_url_from_the_environment_replaces_the_apps_url(app_target: str) -> None:
    first, second = closed_url(), closed_url()

    result = CliRunner().invoke(
        cli, ["dlq", "list", app_target, "jobs.run"], env={"AMQTASK_URL": f"{first};{second}"}
    )

    assert result.exit_code == 1, result.output
    assert first.replace("s3cret", "***") in result.output
    assert second.replace("s3cret", "***") in result.output


def test_url_given_wins_over_amqtask_url(app_target: str) -> None:
    given, from_env = closed_url(), closed_url("envpass")

    result = CliRunner().invoke(
        cli, ["declare", app_target, "--url", given], env={"AMQTASK_URL": from_env}
    )

    assert result.exit_code == 1, result.output
    assert given.replace("s3cret", "***") in result.output
    assert from_env.replace("envpass", "***") not in result.output


def test_worker_processes_are_given_the_same_urls() -> None:
    worker = cli.commands["worker"]
    context = worker.make_context(
        "worker", ["m:app", "-p", "2", "--url", "amqp://a/", "--url", "amqp://b/"]
    )

    with context.scope():
        options = _worker_options(("processes",))

    assert options[-4:] == ["--url", "amqp://a/", "--url", "amqp://b/"]
    assert "--processes" not in options
