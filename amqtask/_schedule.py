"""Schedules as code: what fires when, and what a scheduler does with ticks it is late for. Pure.

A `Schedule` names a contract and a payload (validated when the schedule is made) and when its
ticks fall due: a cron expression in an IANA time zone, or a fixed interval. Due times are whole
milliseconds since the Unix epoch (UTC) throughout: exact, ordered, and the same number on every
replica, so that a tick's message id (`tick_message_id`) is too.

Cron expressions are evaluated by cronsim (see the README for why that library), with Debian
cron's daylight-saving rules: a job at a fixed local time that falls in the skipped hour runs once,
when the clock jumps (a 02:30 job on the night clocks go from 02:00 to 03:00 runs at 03:00); one in
the repeated hour runs once, at its first occurrence; jobs whose minute or hour is a wildcard
(`*/15 * * * *`, `0 * * * *`) follow real time, and so run in both copies of a repeated hour.

`decide` is the whole misfire policy, for one schedule at one moment: which ticks fire now, and
which are given up.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ValidationError

from amqtask._contract import Contract
from amqtask._exceptions import ScheduleError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")

DEFAULT_CATCH_UP = timedelta(seconds=60)
"""How late a tick may still fire: long enough for a failover or a broker restart."""

MIN_INTERVAL = timedelta(seconds=1)

# The usual named forms, as cron(8) defines them.
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

MAX_BATCH = 1000
"""Ticks of one schedule fired in one go at most; the rest follow in the next round."""

_COUNT_CAP = 10_000  # missed ticks of a cron schedule counted one by one at most
_LOOK_AHEAD = 16  # results cronsim may return at or before the start (DST) before one is after it
_ID_SPACE = uuid.UUID("6b1f5c2e-8a37-4d0e-9c52-2f3b9d7e1a40")  # the uuid5 namespace of tick ids


class Misfire(StrEnum):
    """What happens to ticks older than the catch-up window (a scheduler was down, or late)."""

    LATEST = "latest"  # fire the most recent of them once, unless a newer tick fires anyway
    SKIP = "skip"  # fire none of them


def ms(moment: datetime) -> int:
    """An aware datetime as whole milliseconds since the epoch."""
    return round(moment.timestamp() * 1000)


def iso(due: int) -> str:
    """Milliseconds since the epoch as ISO 8601 in UTC (`2025-03-30T01:00:00Z`)."""
    moment = datetime.fromtimestamp(due // 1000, UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{due % 1000:03d}Z" if due % 1000 else f"{text}Z"


def tick_message_id(schedule: str, due: int) -> str:
    """The message id of `schedule`'s tick due at `due`: the same on every replica and on every
    takeover, so a tick published twice reaches the handler twice under one id."""
    return uuid.uuid5(_ID_SPACE, f"{schedule}\n{due}").hex


def _local(due: int, zone: ZoneInfo) -> datetime:
    moment = datetime.fromtimestamp(due // 1000, zone)
    return moment.replace(microsecond=(due % 1000) * 1000)


@dataclass(frozen=True, slots=True, eq=False)
class Schedule:
    """A contract, a payload and when it fires. Build one with `amqtask.schedule(...)`.

    Exactly one of `cron` (five fields, normalised from the `@daily` forms) and `every` is set.
    """

    name: str
    contract: Contract[Any, Any]
    payload: BaseModel
    cron: str | None = None
    every: timedelta | None = None
    tz: str = "UTC"
    misfire: Misfire = Misfire.LATEST
    catch_up: timedelta = DEFAULT_CATCH_UP
    jitter: timedelta = timedelta(0)
    start: datetime | None = None  # the first due time of an interval schedule

    @property
    def expression(self) -> str:
        """The cron expression, or `every 30s` for an interval."""
        if self.cron is not None:
            return self.cron
        assert self.every is not None
        return f"every {_seconds_text(self.every)}"

    @property
    def window(self) -> int:
        """Milliseconds after its due time during which a tick still fires: the catch-up
        window, counted from the latest moment the jitter may put it at."""
        return _millis(self.catch_up) + _millis(self.jitter)

    def fire_at(self, due: int) -> int:
        """When the tick due at `due` is published: `due` plus its jitter, drawn from a hash of
        the schedule's name and the due time, so that every replica draws the same."""
        spread = _millis(self.jitter)
        if not spread:
            return due
        digest = hashlib.blake2b(f"{self.name}\n{due}".encode(), digest_size=8).digest()
        return due + int.from_bytes(digest, "big") % (spread + 1)

    def next_due(self, after: int) -> int | None:
        """The first due time strictly after `after` (None when the expression never fires
        again)."""
        if self.every is not None:
            step = _millis(self.every)
            anchor = 0 if self.start is None else ms(self.start)
            if after < anchor:
                return anchor
            return anchor + ((after - anchor) // step + 1) * step
        assert self.cron is not None
        zone = ZoneInfo(self.tz)
        found = CronSim(self.cron, _local(after, zone))
        for _ in range(_LOOK_AHEAD):
            try:
                due = ms(next(found))
            except StopIteration:
                return None
            # At a repeated hour cronsim's local time may land before `after` (the first copy
            # of the hour, after a start in the second): that tick already fell due.
            if due > after:
                return due
        return None

    def last_due_before(self, before: int) -> int | None:
        """The last due time strictly before `before` (None when there is none)."""
        if self.every is not None:
            step = _millis(self.every)
            anchor = 0 if self.start is None else ms(self.start)
            if before <= anchor:
                return None
            return anchor + ((before - anchor - 1) // step) * step
        assert self.cron is not None
        zone = ZoneInfo(self.tz)
        found = CronSim(self.cron, _local(before, zone), reverse=True)
        for _ in range(_LOOK_AHEAD):
            try:
                due = ms(next(found))
            except StopIteration:
                return None
            if due < before:
                return due
        return None

    def count_dues(self, first: int, last: int) -> int:
        """How many due times lie in [first, last], both due times (capped for cron at 10,000)."""
        if last < first:
            return 0
        if self.every is not None:
            return (last - first) // _millis(self.every) + 1
        count, due = 1, first
        while count < _COUNT_CAP:
            following = self.next_due(due)
            if following is None or following > last:
                break
            count, due = count + 1, following
        return count


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one schedule now: the ticks to fire, oldest first, and the ticks given up.

    `skip_to` is where the schedule's cursor goes before the fired ticks (every due time at or
    before it is handled); `missed` ticks were given up, the first and last of them as given.
    """

    fire: tuple[int, ...] = ()
    skip_to: int | None = None
    missed: int = 0
    first_missed: int | None = None
    last_missed: int | None = None


def decide(schedule: Schedule, cursor: int, now: int) -> Decision:
    """The ticks of `schedule` after `cursor` (every tick due at or before it is handled) that
    fire at `now`, and those given up.

    A tick fires once `now` reaches its `fire_at`, as long as it is no older than the window
    (`catch_up` plus `jitter`); every such tick fires, each once, in order. Older ticks are
    missed: with `Misfire.SKIP` none of them fires; with `Misfire.LATEST` the most recent of them
    fires once, unless a tick inside the window fires now anyway (several missed runs become
    one).
    """
    horizon = now - schedule.window
    first = schedule.next_due(cursor)
    if first is None or first > now:
        return Decision()
    start, skip_to, missed = cursor, None, 0
    first_missed = last_missed = None
    if first < horizon:
        last_missed = schedule.last_due_before(horizon)
        if last_missed is None or last_missed < first:  # cronsim's reverse disagreeing: be safe
            last_missed = first
        first_missed, missed = first, schedule.count_dues(first, last_missed)
        start = skip_to = last_missed
    on_time: list[int] = []
    due = schedule.next_due(start)
    while due is not None and due <= now and len(on_time) < MAX_BATCH:
        if schedule.fire_at(due) > now:
            break
        on_time.append(due)
        due = schedule.next_due(due)
    if last_missed is not None and schedule.misfire is Misfire.LATEST and not on_time:
        # The latest missed tick fires: only the ones before it are given up.
        return Decision(
            fire=(last_missed,),
            skip_to=last_missed - 1,
            missed=missed - 1,
            first_missed=first_missed if missed > 1 else None,
            last_missed=schedule.last_due_before(last_missed) if missed > 1 else None,
        )
    return Decision(tuple(on_time), skip_to, missed, first_missed, last_missed)


def next_fire_at(schedule: Schedule, cursor: int) -> int | None:
    """When the schedule's next tick after `cursor` is published (None: never again)."""
    due = schedule.next_due(cursor)
    return None if due is None else schedule.fire_at(due)


# --- building a schedule ----------------------------------------------------------------------


def _millis(delta: timedelta) -> int:
    return round(delta.total_seconds() * 1000)


def _seconds_text(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _duration(owner: str, label: str, value: timedelta | float) -> timedelta:
    """A non-negative whole-millisecond duration given as a timedelta or seconds."""
    if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
        raise ScheduleError(f"{owner}: {label} must be a timedelta or seconds, got {value!r}")
    delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if delta < timedelta(0) or delta.total_seconds() * 1000 != round(delta.total_seconds() * 1000):
        raise ScheduleError(
            f"{owner}: {label} must be zero or more, in whole milliseconds, got {delta}"
        )
    return delta


def _cron(owner: str, expression: str, tz: str) -> str:
    text = " ".join(expression.split())
    text = ALIASES.get(text.lower(), text)
    if len(text.split()) != 5:
        raise ScheduleError(
            f"{owner}: cron {expression!r} needs five fields (minute hour day-of-month month "
            f"day-of-week) or one of {', '.join(ALIASES)}"
        )
    try:
        CronSim(text, datetime.now(ZoneInfo(tz)))
    except CronSimError as exc:
        raise ScheduleError(f"{owner}: invalid cron {expression!r}: {exc}") from None
    return text


def _zone(owner: str, tz: str) -> str:
    if not isinstance(tz, str) or not tz:
        raise ScheduleError(f"{owner}: tz must be an IANA time zone name, got {tz!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"{owner}: unknown time zone {tz!r} (an IANA name such as 'Europe/Berlin')"
        ) from None
    return tz


def schedule(
    name: str,
    contract: Contract[Any, Any],
    payload: BaseModel | Mapping[str, Any],
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    tz: str | None = None,
    misfire: Misfire | str = Misfire.LATEST,
    catch_up: timedelta | float = DEFAULT_CATCH_UP,
    jitter: timedelta | float = timedelta(0),
    start: datetime | None = None,
) -> Schedule:
    """A periodic task: `contract` with `payload`, at each tick of `cron` or `every`.

    `name` is the schedule's stable identity (letters, digits and `._:-`): the broker keeps its
    last fired tick under it, and each tick's message id derives from it and the due time.
    `cron` takes five fields or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`, evaluated
    in `tz` (an IANA name, default UTC) with cron's daylight-saving rules; `every` (a timedelta
    or seconds, at least 1 s) fires at `start` (an aware datetime; default the Unix epoch) plus
    whole multiples of it. `catch_up` is how late a tick may still fire (default 60 s);
    `misfire` decides about older ones: `"latest"` fires the most recent once, `"skip"` none.
    `jitter` delays each tick's publish by up to that much (the same on every replica).

    Raises `ScheduleError` naming the schedule for a bad name, expression, time zone, duration
    or policy, and for a payload that does not fit the contract's input model (the pydantic
    `ValidationError` is its cause).
    """
    owner = f"schedule {name!r}"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ScheduleError(
            f"invalid schedule name {name!r}: use letters, digits and '._:-', starting alphanumeric"
        )
    if not isinstance(contract, Contract):
        raise ScheduleError(f"{owner}: expected an amqtask contract, got {contract!r}")
    try:
        model = contract.input.model_validate(payload)
    except ValidationError as exc:
        raise ScheduleError(
            f"{owner}: the payload does not fit {contract.input.__name__} (task "
            f"{contract.name!r}): {exc}"
        ) from exc
    if (cron is None) == (every is None):
        raise ScheduleError(f"{owner}: give either cron= or every=")
    try:
        misfire = Misfire(misfire)
    except ValueError:
        raise ScheduleError(
            f"{owner}: misfire must be one of {', '.join(m.value for m in Misfire)}, "
            f"got {misfire!r}"
        ) from None
    catch_up = _duration(owner, "catch_up", catch_up)
    jitter = _duration(owner, "jitter", jitter)
    interval = None
    if every is not None:
        if tz is not None:
            raise ScheduleError(f"{owner}: tz applies to cron schedules; an interval is absolute")
        interval = _duration(owner, "every", every)
        if interval < MIN_INTERVAL:
            raise ScheduleError(f"{owner}: every must be at least 1 s, got {interval}")
        if jitter >= interval:
            raise ScheduleError(f"{owner}: jitter ({jitter}) must be shorter than every")
        if start is not None and (not isinstance(start, datetime) or start.tzinfo is None):
            raise ScheduleError(f"{owner}: start must be an aware datetime, got {start!r}")
    elif start is not None:
        raise ScheduleError(f"{owner}: start applies to interval schedules (every=)")
    zone = _zone(owner, "UTC" if tz is None else tz)
    expression = None if cron is None else _cron(owner, cron, zone)
    return Schedule(
        name=name,
        contract=contract,
        payload=model,
        cron=expression,
        every=interval,
        tz=zone,
        misfire=misfire,
        catch_up=catch_up,
        jitter=jitter,
        start=start,
    )


def schedule_dict(item: Schedule) -> dict[str, Any]:
    """One schedule as plain data, for `contracts export`, AsyncAPI and `amqtask schedules`."""
    return {
        "name": item.name,
        "task": item.contract.name,
        "version": item.contract.version,
        "cron": item.cron,
        "every_seconds": None if item.every is None else item.every.total_seconds(),
        "start": None if item.start is None else iso(ms(item.start)),
        "tz": item.tz,
        "misfire": item.misfire.value,
        "catch_up_seconds": item.catch_up.total_seconds(),
        "jitter_seconds": item.jitter.total_seconds(),
        "payload": item.payload.model_dump(mode="json"),
    }
