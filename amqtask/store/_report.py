"""What `amqtask task`, `amqtask tasks` and `amqtask status` print of the store. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson

from amqtask.store._model import TaskInfo, TaskState

STATES = tuple(state.value for state in TaskState)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="milliseconds")


def _printable(text: str) -> str:
    """One line, control characters escaped: errors and results come from handlers."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def render_task(info: TaskInfo) -> str:
    """One task, a field per line."""
    subject = "?" if info.task is None else f"{info.task} v{info.version}"
    pending = info.revoke_requested and info.state is not TaskState.REVOKED
    lines = [
        f"id          {info.id}",
        f"task        {_printable(subject)}",
        f"state       {info.state.value}" + ("  (revoke requested)" if pending else ""),
        f"attempts    {info.attempts}",
        f"queued      {_when(info.queued_at)}",
    ]
    if info.due_at is not None:
        lines.append(f"due         {_when(info.due_at)}")
    lines += [
        f"started     {_when(info.started_at)}",
        f"finished    {_when(info.finished_at)}",
        f"worker      {_printable(info.worker or '-')}",
    ]
    if info.error is not None or info.error_type is not None:
        reason = f" (reason {info.reason})" if info.reason else ""
        error = f"{info.error_type or '?'}: {info.error or ''}"
        lines.append(f"error       {_printable(error)}{reason}")
    if info.result_json is not None:
        lines.append(f"result      {_printable(info.result_json)}")
    if info.traceback:
        lines.append("traceback:")
        lines += [f"    {_printable(line)}" for line in info.traceback.rstrip().splitlines()]
    lines.append(f"kept until  {_when(info.expires_at)}")
    return "\n".join(lines)


def render_tasks(infos: Sequence[TaskInfo]) -> str:
    """One line per task, newest change first."""
    if not infos:
        return "no task matches"
    rows = []
    for info in infos:
        subject = "?" if info.task is None else f"{info.task} v{info.version}"
        detail = ""
        if info.state is TaskState.SUCCEEDED and info.result_json is not None:
            detail = info.result_json[:60]
        elif info.error is not None:
            detail = f"{info.error_type or '?'}: {info.error}"[:60]
        rows.append(
            (
                info.id,
                _printable(subject),
                info.state.value,
                str(info.attempts),
                _when(info.updated_at),
                _printable(detail),
            )
        )
    headers = ("id", "task", "state", "attempts", "updated", "result / error")
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    )


def tasks_json(infos: Iterable[TaskInfo]) -> bytes:
    return orjson.dumps([info.to_dict() for info in infos])


def state_counts(
    rows: Iterable[tuple[str | None, int | None, str, int]],
) -> dict[str, dict[str, int]]:
    """`{"task vN": {state: count}}` from the store's (task, version, state, count) rows.
    Revocations of ids no worker has seen yet have no task: they count under `?`."""
    counts: dict[str, dict[str, int]] = {}
    for task, version, state, count in rows:
        key = "?" if task is None else f"{task} v{version}"
        counts.setdefault(key, {})[state] = counts.get(key, {}).get(state, 0) + count
    return dict(sorted(counts.items()))


def render_counts(url: str, counts: dict[str, dict[str, int]]) -> str:
    """The task store's lines of `amqtask status`: a row per task, a column per state."""
    lines = [f"task store {url}:"]
    if not counts:
        return "\n".join([*lines, "  no task recorded"])
    rows = [(task, *(str(by_state.get(s, 0)) for s in STATES)) for task, by_state in counts.items()]
    headers = ("task", *STATES)
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]
    for row in (headers, *rows):
        cells: list[Any] = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)
