"""Unit tests of contract export and compatibility checks (`amqtask._evolution`)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

import orjson
import pytest
from pydantic import BaseModel, ConfigDict, Field, create_model

import amqtask
from amqtask._evolution import (
    Change,
    DeployOrder,
    ExportError,
    Verdict,
    check,
    compare_schemas,
    dumps,
    export,
    loads,
    render,
    report,
)

C, B = Verdict.COMPATIBLE, Verdict.BREAKING


def job(**fields: Any) -> type[BaseModel]:
    """A model named Job with the given fields (`name=(type, default or ...)`)."""
    model: type[BaseModel] = create_model("Job", **fields)
    return model


class Owner(BaseModel):
    name: str
    age: int


class OwnerV2(BaseModel):
    model_config = ConfigDict(title="Owner")
    name: str
    age: str


class Colour(StrEnum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class FewerColours(StrEnum):
    RED = "red"
    GREEN = "green"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Job")
    keep: int


def verdicts(old: type[BaseModel], new: type[BaseModel]) -> tuple[Verdict, Verdict, set[str]]:
    """(old producer -> new worker, new producer -> old worker, changed paths) for an input."""
    changes = check(
        export([amqtask.contract("t", old)], namespace="ns"),
        export([amqtask.contract("t", new)], namespace="ns"),
    )
    old_to_new = B if any(c.old_to_new is B for c in changes) else C
    new_to_old = B if any(c.new_to_old is B for c in changes) else C
    return old_to_new, new_to_old, {c.path for c in changes}


# (old input, new input, old producer -> new worker, new producer -> old worker, changed paths)
INPUT_CHANGES: dict[str, tuple[type[BaseModel], type[BaseModel], Verdict, Verdict, set[str]]] = {
    "rename file_path to file_content": (
        job(file_path=(str, ...)),
        job(file_content=(str, ...)),
        B,  # the new worker requires file_content, which old producers never send
        B,  # the old worker requires file_path, which new producers no longer send
        {"input.file_path", "input.file_content"},
    ),
    "type int -> str": (job(type=(int, ...)), job(type=(str, ...)), B, B, {"input.type"}),
    "optional field added": (
        job(a=(int, ...)),
        job(a=(int, ...), b=(str, "x")),
        C,
        C,  # the old worker ignores the unknown field
        {"input.b"},
    ),
    "required field added": (job(a=(int, ...)), job(a=(int, ...), b=(str, ...)), B, C, {"input.b"}),
    "required field removed": (
        job(a=(int, ...), b=(str, ...)),
        job(a=(int, ...)),
        C,  # the new worker ignores what old producers still send
        B,
        {"input.b"},
    ),
    "optional field removed": (
        job(a=(int, ...), b=(str, "")),
        job(a=(int, ...)),
        C,
        C,
        {"input.b"},
    ),
    "field became required": (job(a=(int, 0)), job(a=(int, ...)), B, C, {"input.a"}),
    "field became optional": (job(a=(int, ...)), job(a=(int, 0)), C, B, {"input.a"}),
    "enum narrowed": (
        job(kind=(Literal["a", "b", "c"], ...)),
        job(kind=(Literal["a", "b"], ...)),
        B,
        C,
        {"input.kind"},
    ),
    "enum widened": (
        job(kind=(Literal["a", "b"], ...)),
        job(kind=(Literal["a", "b", "c"], ...)),
        C,
        B,  # an old worker refuses the new value
        {"input.kind"},
    ),
    "enum class narrowed, through $ref": (
        job(colour=(Colour, ...)),
        job(colour=(FewerColours, ...)),
        B,
        C,
        {"input.colour"},
    ),
    "constraint relaxed": (
        job(n=(int, Field(le=10))),
        job(n=(int, Field(le=100))),
        C,
        B,
        {"input.n"},
    ),
    "constraint tightened": (
        job(s=(str, Field(max_length=100))),
        job(s=(str, Field(max_length=10))),
        B,
        C,
        {"input.s"},
    ),
    "no longer nullable": (job(a=(str | None, ...)), job(a=(str, ...)), B, C, {"input.a"}),
    "now nullable": (job(a=(str, ...)), job(a=(str | None, ...)), C, B, {"input.a"}),
    "int widened to float": (job(a=(int, ...)), job(a=(float, ...)), C, B, {"input.a"}),
    "nested model field retyped": (
        job(owner=(Owner, ...)),
        job(owner=(OwnerV2, ...)),
        B,
        B,
        {"input.owner.age"},
    ),
    "list item type changed": (
        job(tags=(list[int], ...)),
        job(tags=(list[str], ...)),
        B,
        B,
        {"input.tags[]"},
    ),
    "dict value type changed": (
        job(m=(dict[str, int], ...)),
        job(m=(dict[str, str], ...)),
        B,
        B,
        {"input.m.*"},
    ),
    "field removed from a model that forbids extras": (
        job(keep=(int, ...), gone=(int, ...)),
        Strict,
        B,  # old producers still send `gone`, which the new model refuses
        B,
        {"input", "input.gone"},
    ),
    "default changed": (job(a=(int, 1)), job(a=(int, 2)), C, C, {"input.a"}),
    "description only": (
        job(a=(int, ...)),
        job(a=(int, Field(description="now documented", title="A number"))),
        C,
        C,
        set(),
    ),
}


@pytest.mark.parametrize(
    ("old", "new", "old_to_new", "new_to_old", "paths"),
    INPUT_CHANGES.values(),
    ids=INPUT_CHANGES.keys(),
)
def test_each_input_change_gets_its_verdict_in_both_directions(
    old: type[BaseModel],
    new: type[BaseModel],
    old_to_new: Verdict,
    new_to_old: Verdict,
    paths: set[str],
) -> None:
    assert verdicts(old, new) == (old_to_new, new_to_old, paths)


def test_a_rename_is_reported_as_a_removal_and_an_addition_with_a_hint() -> None:
    changes = compare_schemas(
        job(file_path=(str, ...)).model_json_schema(),
        job(file_content=(str, ...)).model_json_schema(),
        "input",
    )

    assert [(c.path, c.change) for c in changes] == [
        ("input.file_path", "required field removed (renamed to 'file_content'?)"),
        ("input.file_content", "required field added (renamed from 'file_path'?)"),
    ]


def test_a_type_change_names_both_types() -> None:
    (change,) = compare_schemas(
        job(type=(int, ...)).model_json_schema(), job(type=(str, ...)).model_json_schema(), "input"
    )

    assert (change.path, change.change) == ("input.type", "type changed: integer -> string")
    assert (change.old_in_new, change.new_in_old) == (False, False)


class Tree(BaseModel):
    value: int
    children: list[Tree] = []


class TreeV2(BaseModel):
    model_config = ConfigDict(title="Tree")
    value: str
    children: list[TreeV2] = []


def test_recursive_models_are_compared_once_and_terminate() -> None:
    changes = compare_schemas(Tree.model_json_schema(), TreeV2.model_json_schema(), "input")

    assert [(c.path, c.change) for c in changes] == [
        ("input.value", "type changed: integer -> string")
    ]
    assert compare_schemas(Tree.model_json_schema(), Tree.model_json_schema()) == []


class Resized(BaseModel):
    path: str
    size: int


def output_verdicts(
    old: type[Any] | None, new: type[Any] | None
) -> list[tuple[str, str, Verdict, Verdict]]:
    def contract(returns: type[Any] | None) -> amqtask.Contract[Any, Any]:
        if returns is None:
            return amqtask.contract("t", job(a=(int, ...)))
        return amqtask.contract("t", job(a=(int, ...)), returns=returns)

    changes = check(
        export([contract(old)], namespace="ns"), export([contract(new)], namespace="ns")
    )
    return [(c.path, c.change, c.old_to_new, c.new_to_old) for c in changes]


def test_for_outputs_the_caller_is_the_reader_so_the_directions_swap() -> None:
    slimmer = create_model("Resized", path=(str, ...))
    richer = create_model("Resized", path=(str, ...), size=(int, ...), format=(str, ...))

    # The new worker stops sending `size`, which old callers require.
    assert output_verdicts(Resized, slimmer) == [("output.size", "required field removed", B, C)]
    # The new worker sends an extra field old callers ignore; new callers need it from old workers.
    assert output_verdicts(Resized, richer) == [("output.format", "required field added", C, B)]
    assert output_verdicts(None, Resized) == [("output", "result added", C, B)]
    assert output_verdicts(Resized, None) == [("output", "result removed", B, C)]
    assert output_verdicts(int, str) == [("output", "type changed: integer -> string", B, B)]


def changes_between(
    old: list[amqtask.Contract[Any, Any]],
    new: list[amqtask.Contract[Any, Any]],
    *,
    old_namespace: str = "ns",
) -> list[tuple[str, str, str, Verdict, Verdict]]:
    found = check(export(old, namespace=old_namespace), export(new, namespace="ns"))
    return [(c.subject, c.path, c.change, c.old_to_new, c.new_to_old) for c in found]


Payload = job(a=(int, ...))


def test_removed_and_added_tasks() -> None:
    v1 = amqtask.contract("t", Payload)
    v2 = amqtask.contract("t", Payload, version=2)

    assert changes_between([v1], [v1, v2]) == [("t v2", "task", "task added", C, C)]
    assert changes_between([v1, v2], [v2]) == [("t v1", "task", "task removed", B, C)]


def test_queue_and_queue_settings_changes_break_both_directions() -> None:
    before = amqtask.contract("t", Payload, queue="a")

    assert changes_between([before], [amqtask.contract("t", Payload, queue="b")]) == [
        ("t v1", "queue", "queue changed: 'a' -> 'b'", B, B)
    ]
    assert changes_between([before], [amqtask.contract("t", Payload, queue="a", max_length=5)]) == [
        ("t v1", "max_length", "max_length changed: None -> 5", B, B)
    ]
    assert changes_between([before], [before], old_namespace="other") == [
        ("*", "namespace", "namespace changed: 'other' -> 'ns'", B, B)
    ]


def test_a_retry_policy_change_is_compatible() -> None:
    before = amqtask.contract("t", Payload)
    after = amqtask.contract("t", Payload, retry=amqtask.Retry(attempts=2, on=(OSError,)))

    assert changes_between([before], [after]) == [("t v1", "retry", "retry policy changed", C, C)]


def test_the_deploy_order_decides_which_direction_gates() -> None:
    widened = Change("t", 1, "input.kind", "enum widened", C, B)
    narrowed = Change("t", 1, "input.kind", "enum narrowed", B, C)

    assert widened.breaks(DeployOrder.ANY)
    assert not widened.breaks(DeployOrder.WORKERS_FIRST)
    assert widened.breaks(DeployOrder.PRODUCERS_FIRST)
    assert narrowed.breaks(DeployOrder.WORKERS_FIRST)
    assert not narrowed.breaks(DeployOrder.PRODUCERS_FIRST)
    assert report([widened], DeployOrder.WORKERS_FIRST)["breaking"] is False
    assert report([widened])["breaking"] is True


# --- the export file --------------------------------------------------------------------------


class Failure(Exception):
    pass


def test_export_holds_routing_retry_and_schemas_sorted_by_name_and_version() -> None:
    contracts = [
        amqtask.contract("b", Payload, version=2),
        amqtask.contract(
            "b",
            Payload,
            returns=Resized,
            queue="bq",
            queue_type="classic",
            retry=amqtask.Retry(attempts=3, backoff=3, initial=2, max_delay=60, on=(Failure,)),
        ),
        amqtask.contract("a", Payload),
    ]

    document = export(contracts, namespace="ns")

    assert document["format"] == 1
    assert document["namespace"] == "ns"
    assert [(c["name"], c["version"]) for c in document["contracts"]] == [
        ("a", 1),
        ("b", 1),
        ("b", 2),
    ]
    b1 = document["contracts"][1]
    assert b1["queue"] == "bq"
    assert b1["queue_type"] == "classic"
    assert b1["routing_key"] == "b.v1"
    assert b1["retry"] == {
        "attempts": 3,
        "backoff": 3.0,
        "initial": 2.0,
        "max_delay": 60.0,
        "on": [f"{__name__}.Failure"],
    }
    assert b1["input"] == Payload.model_json_schema()
    assert b1["output"] == Resized.model_json_schema()
    b2 = document["contracts"][2]
    assert (b2["queue"], b2["routing_key"], b2["output"]) == ("b.v2", "b.v2", None)
    assert b2["retry"]["on"] == ["Exception"]


def test_the_file_is_stable_sorted_indented_and_ends_with_a_newline() -> None:
    document = export([amqtask.contract("a", Payload)], namespace="ns")

    text = dumps(document)

    assert text.endswith(b"}\n")
    assert text.startswith(b'{\n  "contracts": [\n    {\n      "delivery_limit": 10,')
    assert dumps(orjson.loads(text)) == text
    assert loads(text) == document
    assert check(loads(text), document) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "no 'contracts' list"),
        (b'{"contracts": [], "format": 99}', "format 99 is not supported"),
        (b'{"contracts": [{"name": "x"}], "format": 1}', "not a contract entry"),
    ],
)
def test_a_file_that_is_not_an_export_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        loads(data)


def test_render_prints_a_row_per_change_and_a_verdict_line() -> None:
    changes = [
        Change("t", 1, "input.file_path", "required field removed", C, B),
        Change("t", 2, "task", "task added", C, C, "deploy workers first"),
    ]

    text = render(changes)

    lines = text.splitlines()
    assert lines[0].split() == [
        "task",
        "field",
        "change",
        "old",
        "producer",
        "->",
        "new",
        "worker",
        "new",
        "producer",
        "->",
        "old",
        "worker",
    ]
    assert "t v1  input.file_path  required field removed  compatible" in lines[1]
    assert lines[1].endswith("BREAKING")
    assert "note: t v2 task: deploy workers first" in lines
    assert lines[-1] == "1 of 2 change(s) breaking"
    assert render(changes, DeployOrder.WORKERS_FIRST).endswith(
        "2 change(s), none breaking when deploying workers-first"
    )
    assert render([]) == "no changes"
