"""Contract evolution: export the contracts as data, and check a new set against a saved export.

Pure functions; `amqtask contracts export|check` (in `_cli`) only read and write files.

**Directions.** A change is judged twice, as two deployments meet it:

* *old producer -> new worker*: workers were upgraded first; producers still send the old shape.
* *new producer -> old worker*: producers were upgraded first; old workers still read.

For a task's **input** the producer writes and the worker reads (it validates every message); for
its **output** the worker writes and the caller (the producer) reads. A change is compatible in a
direction when everything the writer may send is accepted by the reader.

Both sides are JSON Schemas (what pydantic's `model_json_schema()` makes), compared structurally:
`$ref`s are resolved against `$defs`, `anyOf`/`oneOf` are treated as unions (so `Optional[X]` is
X or null), and a property missing on one side is a removed or added field. Pydantic models
ignore unknown fields unless they forbid them (`additionalProperties: false`), so a field the
reader does not know is harmless to it; a field the reader requires and the writer does not send
is not. A rename is a removal plus an addition, and so breaks both directions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter

from amqtask._contract import Calls, Contract, Retry
from amqtask._schedule import Schedule, schedule_dict

EXPORT_FORMAT = 1
"""Version of the export's layout (`format` in the file), raised if it ever changes."""

JsonSchema = dict[str, Any]


# --- export -------------------------------------------------------------------------------------


def _exception_name(exc: type[BaseException]) -> str:
    return (
        exc.__qualname__ if exc.__module__ == "builtins" else f"{exc.__module__}.{exc.__qualname__}"
    )


def _retry_dict(retry: Retry) -> dict[str, Any]:
    return {
        "attempts": retry.attempts,
        "backoff": float(retry.backoff),
        "initial": float(retry.initial),
        "max_delay": float(retry.max_delay),
        "on": [_exception_name(exc) for exc in retry.on],
    }


def output_schema(output: Any) -> JsonSchema | None:
    """JSON Schema of a contract's output type (None for a contract without one)."""
    if output is None:
        return None
    if isinstance(output, type) and issubclass(output, BaseModel):
        return output.model_json_schema()
    return TypeAdapter(output).json_schema()


def contract_dict(contract: Contract[Any, Any]) -> dict[str, Any]:
    """One contract as plain data: identity, routing, queue settings, retry policy, schemas;
    `calls` only for transient calls (absent: durable, as in exports made before it existed)."""
    transient = {"calls": contract.calls.value} if contract.calls is Calls.TRANSIENT else {}
    return {
        **transient,
        "name": contract.name,
        "version": contract.version,
        "queue": contract.queue,
        "queue_type": contract.queue_type.value,
        "routing_key": contract.routing_key,
        "max_length": contract.max_length,
        "overflow": contract.overflow.value,
        "delivery_limit": contract.delivery_limit,
        "retry": _retry_dict(contract.retry),
        "input": contract.input.model_json_schema(),
        "output": output_schema(contract.output),
    }


def export(
    contracts: Iterable[Contract[Any, Any]],
    *,
    namespace: str,
    schedules: Iterable[Schedule] = (),
) -> dict[str, Any]:
    """The contracts as one document, ordered by task name and version, and the app's schedules
    (expression, time zone, policy, payload), ordered by name."""
    ordered = sorted(contracts, key=lambda c: (c.name, c.version))
    return {
        "format": EXPORT_FORMAT,
        "namespace": namespace,
        "contracts": [contract_dict(contract) for contract in ordered],
        "schedules": [schedule_dict(item) for item in sorted(schedules, key=lambda s: s.name)],
    }


def dumps(document: Mapping[str, Any]) -> bytes:
    """Stable, diff-friendly JSON: sorted keys, 2-space indent, a trailing newline."""
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"


class ExportError(ValueError):
    """A file that is not an `amqtask contracts export`."""


def loads(data: bytes | str) -> dict[str, Any]:
    """Read an export back. Raises `ExportError` when it is not one."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ExportError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("contracts"), list):
        raise ExportError("not an amqtask contracts export (no 'contracts' list)")
    if document.get("format") != EXPORT_FORMAT:
        raise ExportError(
            f"export format {document.get('format')!r} is not supported (expected {EXPORT_FORMAT})"
        )
    for entry in document["contracts"]:
        if not isinstance(entry, dict) or not {"name", "version", "input"} <= entry.keys():
            raise ExportError(f"not a contract entry: {str(entry)[:80]}")
    return document


# --- schema comparison --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SchemaChange:
    """One difference between two schemas at `path`.

    `old_in_new`: every value the old schema accepts, the new one accepts too (a writer on the old
    schema is safe with a reader on the new one). `new_in_old`: the reverse.
    """

    path: str
    change: str
    old_in_new: bool
    new_in_old: bool


_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
_EXACT = ("pattern", "multipleOf", "format")
_ANY = "any"


def _pointer(root: JsonSchema, ref: str) -> JsonSchema:
    if not ref.startswith("#"):
        raise ExportError(f"cannot resolve the external $ref {ref!r}")
    node: Any = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise ExportError(f"dangling $ref {ref!r}")
        node = node[part]
    if not isinstance(node, dict):
        raise ExportError(f"$ref {ref!r} is not a schema")
    return node


@dataclass(frozen=True, slots=True)
class _Variant:
    """One alternative of a (union) schema, resolved; `ref` names the model it came from."""

    node: JsonSchema
    ref: str | None

    @property
    def kind(self) -> str:
        kind = self.node.get("type")
        if isinstance(kind, str):
            return kind
        values = _enum(self.node)
        if values:
            kinds = {_json_kind(orjson.loads(v)) for v in values}
            return kinds.pop() if len(kinds) == 1 else _ANY
        if "properties" in self.node:
            return "object"
        return _ANY


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _enum(node: JsonSchema) -> frozenset[str] | None:
    """The allowed values (as JSON text, so they hash) of an enum or const, else None."""
    if "const" in node:
        return frozenset({orjson.dumps(node["const"]).decode()})
    if isinstance(node.get("enum"), list):
        return frozenset(orjson.dumps(v).decode() for v in node["enum"])
    return None


def _variants(node: Any, root: JsonSchema, ref: str | None = None) -> list[_Variant]:
    """Resolve `$ref`s and split unions (`anyOf`, `oneOf`, a list of types) into alternatives."""
    if node is True or not isinstance(node, dict):
        return [_Variant({}, ref)]
    seen: set[str] = set()
    while "$ref" in node and node["$ref"] not in seen:
        ref = node["$ref"]
        seen.add(ref)
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        node = {**_pointer(root, ref), **siblings}
    if isinstance(node.get("allOf"), list):
        merged = {k: v for k, v in node.items() if k != "allOf"}
        for part in node["allOf"]:
            for variant in _variants(part, root):
                merged = {**variant.node, **merged}
                ref = ref or variant.ref
        node = merged
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            return [v for sub in node[key] for v in _variants(sub, root)]
    if isinstance(node.get("type"), list):
        return [_Variant({**node, "type": kind}, ref) for kind in node["type"]]
    return [_Variant(node, ref)]


def _fmt(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def _allows_extra(node: JsonSchema) -> bool:
    """Whether an object schema accepts properties it does not list (pydantic: unless forbid)."""
    extra = node.get("additionalProperties", True)
    return extra is True or extra == {}


class _SchemaDiff:
    """Walks two schemas side by side and collects `SchemaChange`s."""

    def __init__(self, old_root: JsonSchema, new_root: JsonSchema) -> None:
        self.old_root = old_root
        self.new_root = new_root
        self.changes: list[SchemaChange] = []

    def add(self, path: str, change: str, old_in_new: bool, new_in_old: bool) -> None:
        self.changes.append(SchemaChange(path, change, old_in_new, new_in_old))

    def compare(self, old: Any, new: Any, path: str, seen: frozenset[tuple[str, str]]) -> None:
        old_vs = _variants(old, self.old_root)
        new_vs = _variants(new, self.new_root)
        old_null = any(v.kind == "null" for v in old_vs)
        new_null = any(v.kind == "null" for v in new_vs)
        if old_null and not new_null:
            self.add(path, "no longer accepts null", False, True)
        elif new_null and not old_null:
            self.add(path, "now accepts null", True, False)
        old_vs = [v for v in old_vs if v.kind != "null"]
        new_vs = [v for v in new_vs if v.kind != "null"]
        if not old_vs or not new_vs:
            if old_vs or new_vs:
                kinds = _fmt({v.kind for v in old_vs or new_vs})
                if old_vs:  # old accepted values besides null, new only null
                    self.add(path, f"type changed: {kinds} -> null", False, old_null)
                else:
                    self.add(path, f"type changed: null -> {kinds}", new_null, False)
            return
        old_any = any(v.kind == _ANY for v in old_vs)
        new_any = any(v.kind == _ANY for v in new_vs)
        if old_any or new_any:
            if old_any and new_any:
                return
            if new_any:
                self.add(path, "now accepts any value", True, False)
            else:
                kinds = _fmt({v.kind for v in new_vs})
                self.add(path, f"restricted from any value to {kinds}", False, True)
            return
        self._compare_unions(old_vs, new_vs, path, seen)

    def _compare_unions(
        self,
        old_vs: list[_Variant],
        new_vs: list[_Variant],
        path: str,
        seen: frozenset[tuple[str, str]],
    ) -> None:
        pairs: list[tuple[_Variant, _Variant]] = []
        old_left, new_left = list(old_vs), list(new_vs)
        for old_v in list(old_left):  # same kind and, for models, the same title first
            match = next(
                (
                    n
                    for n in new_left
                    if n.kind == old_v.kind and n.node.get("title") == old_v.node.get("title")
                ),
                None,
            ) or next((n for n in new_left if n.kind == old_v.kind), None)
            if match is not None:
                pairs.append((old_v, match))
                old_left.remove(old_v)
                new_left.remove(match)
        if len(old_left) == 1 and len(new_left) == 1:
            old_kind, new_kind = old_left[0].kind, new_left[0].kind
            widened = (old_kind, new_kind) == ("integer", "number")
            narrowed = (old_kind, new_kind) == ("number", "integer")
            self.add(path, f"type changed: {old_kind} -> {new_kind}", widened, narrowed)
        else:
            for old_v in old_left:
                self.add(path, f"no longer accepts {self._label(old_v)}", False, True)
            for new_v in new_left:
                self.add(path, f"now also accepts {self._label(new_v)}", True, False)
        for old_v, new_v in pairs:
            self._compare_same_kind(old_v, new_v, path, seen)

    @staticmethod
    def _label(variant: _Variant) -> str:
        title = variant.node.get("title")
        return f"{variant.kind} {title!r}" if variant.kind == "object" and title else variant.kind

    def _compare_same_kind(
        self, old: _Variant, new: _Variant, path: str, seen: frozenset[tuple[str, str]]
    ) -> None:
        if old.ref is not None and new.ref is not None:
            if (old.ref, new.ref) in seen:  # a recursive model: this pair is being compared
                return
            seen = seen | {(old.ref, new.ref)}
        o, n = old.node, new.node
        self._compare_enum(o, n, path)
        self._compare_bounds(o, n, path)
        if old.kind == "object":
            self._compare_objects(o, n, path, seen)
        elif old.kind == "array":
            self._compare_arrays(o, n, path, seen)

    def _compare_enum(self, o: JsonSchema, n: JsonSchema, path: str) -> None:
        old_values, new_values = _enum(o), _enum(n)
        if old_values is None and new_values is None:
            return
        if old_values is None:
            self.add(path, f"restricted to the values {_fmt(new_values or ())}", False, True)
        elif new_values is None:
            self.add(path, f"no longer restricted to the values {_fmt(old_values)}", True, False)
        else:
            if removed := old_values - new_values:
                self.add(path, f"enum narrowed: {_fmt(removed)} removed", False, True)
            if added := new_values - old_values:
                self.add(path, f"enum widened: {_fmt(added)} added", True, False)

    def _compare_bounds(self, o: JsonSchema, n: JsonSchema, path: str) -> None:
        for key in (*_LOWER_BOUNDS, *_UPPER_BOUNDS):
            before, after = o.get(key), n.get(key)
            if before == after:
                continue
            lower = key in _LOWER_BOUNDS
            if after is None:
                tighter = False
            elif before is None:
                tighter = True
            else:
                tighter = after > before if lower else after < before
            what = "tightened" if tighter else "relaxed"
            self.add(path, f"{key} {what}: {before} -> {after}", not tighter, tighter)
        for key in _EXACT:
            before, after = o.get(key), n.get(key)
            if before == after:
                continue
            if before is None:
                self.add(path, f"{key} added: {after!r}", False, True)
            elif after is None:
                self.add(path, f"{key} removed (was {before!r})", True, False)
            else:
                self.add(path, f"{key} changed: {before!r} -> {after!r}", False, False)
        if bool(o.get("uniqueItems")) != bool(n.get("uniqueItems")):
            tighter = bool(n.get("uniqueItems"))
            self.add(path, f"uniqueItems {'added' if tighter else 'removed'}", not tighter, tighter)

    def _compare_objects(
        self, o: JsonSchema, n: JsonSchema, path: str, seen: frozenset[tuple[str, str]]
    ) -> None:
        old_props: dict[str, Any] = o.get("properties") or {}
        new_props: dict[str, Any] = n.get("properties") or {}
        old_required, new_required = set(o.get("required") or ()), set(n.get("required") or ())
        removed = [name for name in old_props if name not in new_props]
        added = [name for name in new_props if name not in old_props]
        # One field out and one in, in the same object: most likely a rename. It is judged as
        # what it is on the wire (a removal and an addition); the hint only helps the reader.
        renamed = len(removed) == 1 and len(added) == 1
        for name in removed:
            required = name in old_required
            hint = f" (renamed to {added[0]!r}?)" if renamed else ""
            self.add(
                f"{path}.{name}",
                f"{'required' if required else 'optional'} field removed{hint}",
                _allows_extra(n),  # an old writer still sends it: harmless unless forbidden
                not required,  # a new writer omits it: fine only if the old reader has a default
            )
        for name in added:
            required = name in new_required
            hint = f" (renamed from {removed[0]!r}?)" if renamed else ""
            self.add(
                f"{path}.{name}",
                f"{'required' if required else 'optional'} field added{hint}",
                not required,
                _allows_extra(o),
            )
        for name, old_prop in old_props.items():
            if name not in new_props:
                continue
            new_prop, field = new_props[name], f"{path}.{name}"
            if name in old_required and name not in new_required:
                self.add(field, "field became optional", True, False)
            elif name in new_required and name not in old_required:
                self.add(field, "field became required", False, True)
            if isinstance(old_prop, dict) and isinstance(new_prop, dict):
                before, after = old_prop.get("default"), new_prop.get("default")
                if before != after and name not in new_required and name not in old_required:
                    self.add(field, f"default changed: {before!r} -> {after!r}", True, True)
            self.compare(old_prop, new_prop, field, seen)
        old_extra = o.get("additionalProperties", True)
        new_extra = n.get("additionalProperties", True)
        if isinstance(old_extra, dict) and isinstance(new_extra, dict):
            self.compare(old_extra, new_extra, f"{path}.*", seen)
        elif old_extra != new_extra:
            old_open, new_open = _allows_extra(o), _allows_extra(n)
            if old_open and not new_open:
                self.add(path, "unknown fields now refused", False, True)
            elif new_open and not old_open:
                self.add(path, "unknown fields now accepted", True, False)
            elif new_extra is False:
                self.add(path, "extra entries now refused", False, True)
            elif old_extra is False:
                self.add(path, "extra entries now accepted", True, False)

    def _compare_arrays(
        self, o: JsonSchema, n: JsonSchema, path: str, seen: frozenset[tuple[str, str]]
    ) -> None:
        old_prefix: list[Any] = o.get("prefixItems") or []
        new_prefix: list[Any] = n.get("prefixItems") or []
        for index in range(min(len(old_prefix), len(new_prefix))):
            self.compare(old_prefix[index], new_prefix[index], f"{path}[{index}]", seen)
        if "items" in o or "items" in n:
            self.compare(o.get("items", True), n.get("items", True), f"{path}[]", seen)


def compare_schemas(old: JsonSchema, new: JsonSchema, path: str = "") -> list[SchemaChange]:
    """Every difference between two JSON Schemas that changes which values they accept.

    Titles and descriptions are ignored; a changed default is reported (compatible both ways).
    """
    diff = _SchemaDiff(old, new)
    diff.compare(old, new, path, frozenset())
    return diff.changes


# --- contract comparison ------------------------------------------------------------------------


class Verdict(StrEnum):
    COMPATIBLE = "compatible"
    BREAKING = "breaking"


def _verdict(ok: bool) -> Verdict:
    return Verdict.COMPATIBLE if ok else Verdict.BREAKING


class DeployOrder(StrEnum):
    """Which directions a check gates on: the order new workers and producers go out in."""

    ANY = "any"  # either may go first (or both roll at once): both directions must hold
    WORKERS_FIRST = "workers-first"  # old producers meet new workers, never the reverse
    PRODUCERS_FIRST = "producers-first"  # new producers meet old workers, never the reverse


@dataclass(frozen=True, slots=True)
class Change:
    """A difference between a saved export and today's contracts, judged in both directions.

    `old_to_new`: a producer on the old contracts sending to a worker on the new ones (workers
    deployed first). `new_to_old`: a producer on the new contracts sending to an old worker.
    """

    task: str
    version: int | None
    path: str
    change: str
    old_to_new: Verdict
    new_to_old: Verdict
    note: str = ""

    @property
    def breaking(self) -> bool:
        """Breaking in either direction."""
        return Verdict.BREAKING in (self.old_to_new, self.new_to_old)

    def breaks(self, order: DeployOrder = DeployOrder.ANY) -> bool:
        """Whether this change breaks a deployment done in `order`."""
        if order is DeployOrder.WORKERS_FIRST:
            return self.old_to_new is Verdict.BREAKING
        if order is DeployOrder.PRODUCERS_FIRST:
            return self.new_to_old is Verdict.BREAKING
        return self.breaking

    @property
    def subject(self) -> str:
        return self.task if self.version is None else f"{self.task} v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "version": self.version,
            "path": self.path,
            "change": self.change,
            "old_producer_to_new_worker": self.old_to_new.value,
            "new_producer_to_old_worker": self.new_to_old.value,
            "breaking": self.breaking,
            "note": self.note,
        }


# Queue settings that are queue arguments: the broker refuses to redeclare a queue with other
# values (declare reports a conflict), so changing one means re-creating the queue.
_QUEUE_SETTINGS = ("queue_type", "max_length", "overflow", "delivery_limit")


def _contract_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> Iterator[Change]:
    task, version = str(new["name"]), int(new["version"])

    def change(path: str, text: str, old_to_new: bool, new_to_old: bool, note: str = "") -> Change:
        return Change(task, version, path, text, _verdict(old_to_new), _verdict(new_to_old), note)

    for key, note in (
        ("queue", "old and new workers read different queues: each side's messages strand"),
        ("routing_key", "producers and workers no longer meet on the task exchange"),
    ):
        if old.get(key) != new.get(key):
            text = f"{key} changed: {old.get(key)!r} -> {new.get(key)!r}"
            yield change(key, text, False, False, note)
    was, now = old.get("calls", "durable"), new.get("calls", "durable")
    if was != now:
        # Only a worker with the transient contract consumes the call queue.
        transient = now == Calls.TRANSIENT.value
        note = (
            "old workers do not consume the call queue: declare, deploy the workers, then callers"
            if transient
            else "new workers no longer consume the call queue: switch the callers first"
        )
        yield change("calls", f"calls changed: {was!r} -> {now!r}", transient, not transient, note)
    for key in _QUEUE_SETTINGS:
        if key in old and old.get(key) != new.get(key):
            yield change(
                key,
                f"{key} changed: {old.get(key)!r} -> {new.get(key)!r}",
                False,
                False,
                f"queue {new.get('queue')!r} must be deleted and re-created: "
                "amqtask declare reports a conflict",
            )
    if "retry" in old and old.get("retry") != new.get("retry"):
        yield change("retry", "retry policy changed", True, True, "only workers apply it")

    for schema_change in compare_schemas(old["input"], new["input"], "input"):
        # The producer writes the input, the worker reads it.
        yield change(
            schema_change.path,
            schema_change.change,
            schema_change.old_in_new,
            schema_change.new_in_old,
        )

    old_out, new_out = old.get("output"), new.get("output")
    if old_out is None and new_out is not None:
        # An old caller ignores the result; a new caller expects one an old worker never sends.
        yield change("output", "result added", True, False)
    elif old_out is not None and new_out is None:
        yield change("output", "result removed", False, True)
    elif old_out is not None and new_out is not None:
        for schema_change in compare_schemas(old_out, new_out, "output"):
            # The worker writes the output, the caller reads it: the directions swap.
            yield change(
                schema_change.path,
                schema_change.change,
                schema_change.new_in_old,
                schema_change.old_in_new,
            )


def check(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every change from the export `old` to the export `new`, judged in both directions.

    Tasks are matched by name and version: a new version is an added task (see the README on
    running two versions side by side), and dropping one is a removed task.
    """
    changes: list[Change] = []
    if old.get("namespace") != new.get("namespace"):
        changes.append(
            Change(
                "*",
                None,
                "namespace",
                f"namespace changed: {old.get('namespace')!r} -> {new.get('namespace')!r}",
                Verdict.BREAKING,
                Verdict.BREAKING,
                "every exchange name changes",
            )
        )
    old_tasks = {(c["name"], int(c["version"])): c for c in old["contracts"]}
    new_tasks = {(c["name"], int(c["version"])): c for c in new["contracts"]}
    for name, version in sorted(old_tasks.keys() | new_tasks.keys()):
        if (name, version) not in new_tasks:
            changes.append(
                Change(
                    name,
                    version,
                    "task",
                    "task removed",
                    Verdict.BREAKING,
                    Verdict.COMPATIBLE,
                    "old producers still send it and nothing consumes it",
                )
            )
        elif (name, version) not in old_tasks:
            changes.append(
                Change(
                    name,
                    version,
                    "task",
                    "task added",
                    Verdict.COMPATIBLE,
                    Verdict.COMPATIBLE,
                    "deploy its workers (and run amqtask declare) before producers send it",
                )
            )
        else:
            changes.extend(_contract_changes(old_tasks[name, version], new_tasks[name, version]))
    changes.extend(_schedule_changes(old.get("schedules") or [], new.get("schedules") or []))
    return changes


def _schedule_changes(old: Iterable[Any], new: Iterable[Any]) -> Iterator[Change]:
    """Schedules added, removed or changed: none breaks a producer or a worker, but a reviewer
    wants to see that the nightly report now runs at 07:00."""
    before = {str(s["name"]): s for s in old if isinstance(s, dict) and "name" in s}
    after = {str(s["name"]): s for s in new if isinstance(s, dict) and "name" in s}
    ok = Verdict.COMPATIBLE
    for name in sorted(before.keys() | after.keys()):
        subject = f"schedule {name}"
        if name not in after:
            yield Change(subject, None, "schedule", "schedule removed", ok, ok)
        elif name not in before:
            yield Change(subject, None, "schedule", "schedule added", ok, ok)
        else:
            for key in sorted(before[name].keys() | after[name].keys()):
                was, now = before[name].get(key), after[name].get(key)
                if was != now:
                    text = f"{key} changed: {_short(was)} -> {_short(now)}"
                    yield Change(subject, None, key, text, ok, ok)


def _short(value: Any) -> str:
    text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return text if len(text) <= 60 else f"{text[:57]}..."


def report(changes: Sequence[Change], order: DeployOrder = DeployOrder.ANY) -> dict[str, Any]:
    """The `--json` form of a check; `breaking` is judged for a deployment in `order`."""
    return {
        "order": order.value,
        "breaking": any(c.breaks(order) for c in changes),
        "changes": [c.to_dict() for c in changes],
    }


_HEADERS = ("task", "field", "change", "old producer -> new worker", "new producer -> old worker")


def render(changes: Sequence[Change], order: DeployOrder = DeployOrder.ANY) -> str:
    """A table, one row per change, and a closing line saying whether any breaks `order`."""
    if not changes:
        return "no changes"
    rows = [
        (
            c.subject,
            c.path,
            c.change,
            c.old_to_new.value.upper() if c.old_to_new is Verdict.BREAKING else c.old_to_new.value,
            c.new_to_old.value.upper() if c.new_to_old is Verdict.BREAKING else c.new_to_old.value,
        )
        for c in changes
    ]
    widths = [max(len(row[i]) for row in (_HEADERS, *rows)) for i in range(len(_HEADERS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (_HEADERS, *rows)
    ]
    for c in changes:
        if c.note:
            lines.append(f"note: {c.subject} {c.path}: {c.note}")
    breaking = sum(c.breaks(order) for c in changes)
    scope = "" if order is DeployOrder.ANY else f" when deploying {order.value}"
    lines.append(
        f"{breaking} of {len(changes)} change(s) breaking{scope}"
        if breaking
        else f"{len(changes)} change(s), none breaking{scope}"
    )
    return "\n".join(lines)
