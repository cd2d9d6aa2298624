"""`amqtask contracts export|check|asyncapi`: no broker involved, so these run as unit tests."""

from __future__ import annotations

import json
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from amqtask._cli import cli

WriteApp = Callable[[str], str]  # writes an app module from its body, returns MODULE:app


@pytest.fixture
def write_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteApp:
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(body: str) -> str:
        module = f"contracts_app_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{module}.py").write_text(
            textwrap.dedent(
                """
                from typing import Literal
                from pydantic import BaseModel
                import amqtask
                """
            )
            + textwrap.dedent(body)
        )
        return f"{module}:app"

    return write


V1 = """
class Upload(BaseModel):
    file_path: str
    type: int
    mode: Literal["fast", "slow"] = "fast"

upload = amqtask.contract("files.upload", Upload, retry=amqtask.Retry(attempts=3))
app = amqtask.App("amqp://guest:guest@127.0.0.1:5672/", [upload], namespace="cli")
"""

V1_WIDER_ENUM = V1.replace('Literal["fast", "slow"]', 'Literal["fast", "slow", "eco"]')

V2_BREAKING = """
class Upload(BaseModel):
    file_content: str
    type: str
    mode: Literal["fast", "slow"] = "fast"

upload = amqtask.contract("files.upload", Upload, retry=amqtask.Retry(attempts=3))
app = amqtask.App("amqp://guest:guest@127.0.0.1:5672/", [upload], namespace="cli")
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_export_writes_a_stable_file_or_stdout(write_app: WriteApp, tmp_path: Path) -> None:
    target = write_app(V1)
    out = tmp_path / "contracts.json"

    written = run("contracts", "export", target, "-o", str(out))
    printed = run("contracts", "export", target)

    assert written.exit_code == 0, written.output
    assert printed.exit_code == 0
    assert out.read_text() == printed.stdout
    assert printed.stdout.endswith("}\n")
    document = json.loads(printed.stdout)
    (entry,) = document["contracts"]
    assert entry["name"] == "files.upload"
    assert entry["routing_key"] == "files.upload.v1"
    assert entry["retry"]["attempts"] == 3
    assert entry["input"]["required"] == ["file_path", "type"]
    assert document["namespace"] == "cli"


def test_check_passes_unchanged_contracts_and_exits_1_on_breaking_ones(
    write_app: WriteApp, tmp_path: Path
) -> None:
    saved = tmp_path / "contracts.json"
    run("contracts", "export", write_app(V1), "-o", str(saved))

    same = run("contracts", "check", write_app(V1), "--against", str(saved))
    changed = run("contracts", "check", write_app(V2_BREAKING), "--against", str(saved))
    as_json = run(
        "contracts",
        "check",
        write_app(V2_BREAKING),
        "--against",
        str(saved),
        "--json",
    )

    assert same.exit_code == 0, same.output
    assert same.stdout.strip() == "no changes"
    assert changed.exit_code == 1
    assert "files.upload v1  input.file_path" in changed.stdout
    assert "type changed: integer -> string" in changed.stdout
    assert changed.stdout.rstrip().endswith("3 of 3 change(s) breaking")
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    assert report["breaking"] is True
    assert {
        (c["path"], c["old_producer_to_new_worker"], c["new_producer_to_old_worker"])
        for c in report["changes"]
    } == {
        ("input.file_path", "compatible", "breaking"),
        ("input.file_content", "breaking", "compatible"),
        ("input.type", "breaking", "breaking"),
    }


def test_check_gates_on_the_deploy_order(write_app: WriteApp, tmp_path: Path) -> None:
    saved = tmp_path / "contracts.json"
    run("contracts", "export", write_app(V1), "-o", str(saved))
    wider = write_app(V1_WIDER_ENUM)

    any_order = run("contracts", "check", wider, "--against", str(saved))
    workers_first = run(
        "contracts", "check", wider, "--against", str(saved), "--order", "workers-first"
    )

    # New workers accept what old producers send; new producers may send old workers "eco".
    assert any_order.exit_code == 1
    assert workers_first.exit_code == 0, workers_first.output
    assert "enum widened" in workers_first.stdout


def test_check_refuses_a_file_that_is_not_an_export(write_app: WriteApp, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')

    result = run("contracts", "check", write_app(V1), "--against", str(bad))

    assert result.exit_code == 2
    assert "not an amqtask contracts export" in result.stderr


def test_asyncapi_writes_a_3_0_0_document(write_app: WriteApp, tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"

    result = run(
        "contracts",
        "asyncapi",
        write_app(V1),
        "-o",
        str(out),
        "--title",
        "Files",
        "--api-version",
        "3.2.1",
    )

    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["asyncapi"] == "3.0.0"
    assert document["info"] == {"title": "Files", "version": "3.2.1"}
    assert document["channels"]["task.files.upload.v1"]["address"] == "files.upload.v1"
    assert document["operations"]["receive.files.upload.v1"]["action"] == "receive"


def test_contracts_help_shows_examples() -> None:
    result = run("contracts", "--help")

    assert "amqtask contracts check examples.app:app --against contracts.json" in result.stdout
