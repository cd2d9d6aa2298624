"""Operator tools for a work queue's dead-letter queue: list, replay, purge.

Listing takes one message at a time and keeps only a preview of its body (and its size), so
dead letters of any size and number list in bounded memory. Nothing is acked: the messages return
to the queue, in order, when the channel closes.

Replay publishes each message back to its work queue and waits for the broker's confirm before it
acks (removes) the dead letter, so a crash mid-replay can duplicate a message but never lose one.

The dashboard pages through a queue at an offset (`page_dead_letters`), shows one letter in full
(`find_dead_letter`) and deletes some by id (`delete_dead_letters`): consumers without acks, one
per window of `WINDOW` (1,000) letters, each on a channel of its own, each message dropped once
read; the channels' close returns them, in order. Only a deletion acks, and only the messages it
names.

All read headers defensively: a dead letter is often the message that was malformed in the first
place, and one bad header must not stop the tool for the whole queue. Any value of any AMQP type
shows as text.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Self

import aio_pika
import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from amqtask import _codec
from amqtask._app import App
from amqtask._contract import Contract
from amqtask._exceptions import PublishError, TopologyMissing
from amqtask._transport import open_connection
from amqtask.routing import dead_letter_queue_name

# Headers of a failure that a replayed message must not carry into its fresh start.
_FAILURE_HEADERS = (
    _codec.REASON,
    _codec.ERROR,
    _codec.ERROR_TYPE,
    _codec.TRACEBACK,
    _codec.FAILED_AT,
    _codec.FIRST_FAILED_AT,
    _codec.ORIGIN_QUEUE,
    _codec.ATTEMPT,
)

PREVIEW_BYTES = 1024  # how much of each body a listing keeps and shows
_MAX_TEXT = 4000  # characters kept of a header's text (amqtask writes errors up to this length)
_MAX_NAME = 256  # characters kept of a task name or a timestamp: longer is not one of ours


def _clip(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit] + "..."


def last_death_reason(headers: Mapping[str, Any]) -> str | None:
    """Why the message died the last time: amqtask's `amqtask-reason`, else the broker's.

    The broker's `x-death` lists one entry per queue and reason, the newest first. Its
    `x-first-death-reason` is not the answer: for a task that waited in a delay level before it
    was rejected, that is `expired`.
    """
    reason = _codec.header_text(headers.get(_codec.REASON))
    if reason:
        return reason
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return _codec.header_text(deaths[0].get("reason"))
    return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered message as an operator sees it: its headers as text, clipped, and the
    first `PREVIEW_BYTES` of its body with the body's size."""

    message_id: str | None
    task: str | None
    reason: str | None
    error: str | None
    attempts: int | str | None  # the header's text when it is not a number
    first_failed_at: str | None
    failed_at: str | None
    body_size: int
    body_preview: bytes
    digest: str = ""  # tells apart copies that share a message id (`letter_digest`)

    @classmethod
    def of(cls, message: _codec.Delivery, *, preview: int = PREVIEW_BYTES) -> DeadLetter:
        """Read `message`; never raises, whatever its headers hold."""
        raw = message.headers
        headers: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}

        def text(name: str, limit: int = _MAX_NAME) -> str | None:
            return _clip(_codec.header_text(headers.get(name)), limit)

        attempts: int | str | None = _codec.header_int(headers.get(_codec.ATTEMPT))
        if attempts is None:
            attempts = text(_codec.ATTEMPT)
        return cls(
            # Not clipped: AMQP bounds it (255 bytes), and an action names a letter by it.
            message_id=_codec.header_text(message.message_id),
            task=text(_codec.TASK),
            reason=_clip(last_death_reason(headers), _MAX_NAME),
            error=text(_codec.ERROR, _MAX_TEXT),
            attempts=attempts,
            first_failed_at=text(_codec.FIRST_FAILED_AT),
            failed_at=text(_codec.FAILED_AT),
            body_size=len(message.body),
            body_preview=bytes(message.body[:preview]),
            digest=letter_digest(message),
        )

    @property
    def body_truncated(self) -> bool:
        return self.body_size > len(self.body_preview)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; `body` is the preview as text (invalid UTF-8 replaced)."""
        return {
            "message_id": self.message_id,
            "task": self.task,
            "reason": self.reason,
            "error": self.error,
            "attempts": self.attempts,
            "first_failed_at": self.first_failed_at,
            "failed_at": self.failed_at,
            "body": self.body_preview.decode("utf-8", "replace"),
            "body_size": self.body_size,
            "body_truncated": self.body_truncated,
            "digest": self.digest,
        }


def letter_digest(message: _codec.Delivery) -> str:
    """A short hash of a dead letter's id, body and headers: two copies with the same message
    id (a message dead-lettered twice, or sent twice) differ in it unless they are identical,
    so an action can name one copy (`Selection`)."""
    raw = message.headers
    headers = raw if isinstance(raw, Mapping) else {}
    digest = hashlib.sha256()
    digest.update((message.message_id or "").encode())
    digest.update(b"\0")
    digest.update(bytes(message.body))
    for name in sorted(headers, key=str):
        if name == "x-delivery-count":
            continue  # a quorum queue counts every read in it: not part of the letter
        digest.update(f"\0{name}={headers[name]!r}".encode("utf-8", "replace"))
    return digest.hexdigest()[:16]


class Selection:
    """Dead letters named one copy each, by (message id, `letter_digest`): each pair matches
    one letter only, so of two copies sharing an id, naming one acts on one."""

    def __init__(self, letters: Iterable[tuple[str, str]]) -> None:
        self._left = Counter(letters)

    def take(self, message: _codec.Delivery) -> bool:
        """Whether `message` is one of those named (and not yet taken): counts it taken."""
        key = (message.message_id or "", letter_digest(message))
        if self._left[key] <= 0:
            return False
        self._left[key] -= 1
        return True

    @property
    def done(self) -> bool:
        return not any(n > 0 for n in self._left.values())


# Headers the broker adds when it dead-letters: a replayed message starts afresh without them.
_BROKER_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


async def _dead_letter_queue(
    channel: AbstractChannel, contract: Contract[Any, Any]
) -> AbstractQueue:
    name = dead_letter_queue_name(contract.queue)
    try:
        return await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise TopologyMissing([f"queue {name!r}"]) from None


@asynccontextmanager
async def browse_dead_letters(
    app: App, contract: Contract[Any, Any], *, limit: int = 100, preview: int = PREVIEW_BYTES
) -> AsyncIterator[tuple[int, AsyncIterator[DeadLetter]]]:
    """The dead-letter queue's message count, and its first `limit` messages one at a time.

    Only the message being read is in memory in full; each yields a `DeadLetter` holding
    `preview` bytes of its body. Removes nothing: the messages go back to the queue, in order,
    when the block ends.
    """
    connection = await open_connection(app.urls, name="amqtask-dlq", timeout=app.connect_timeout)
    async with connection:
        channel = await connection.channel()
        queue = await _dead_letter_queue(channel, contract)
        count = queue.declaration_result.message_count or 0

        async def letters() -> AsyncIterator[DeadLetter]:
            for _ in range(min(limit, count)):
                # basic.get without ack: the message stays unacked on this channel, the next get
                # returns the one after it, and none of their bodies is kept here.
                message = await queue.get(fail=False)
                if message is None:
                    return
                yield DeadLetter.of(message, preview=preview)

        yield count, letters()
        # Nothing is acked: closing the channel returns every message to the queue, in order.
        await channel.close()


async def list_dead_letters(
    app: App, contract: Contract[Any, Any], *, limit: int = 100, preview: int = PREVIEW_BYTES
) -> tuple[int, list[DeadLetter]]:
    """The dead-letter queue's message count and up to `limit` of its messages, each with a
    `preview` of its body. Removes nothing."""
    async with browse_dead_letters(app, contract, limit=limit, preview=preview) as (count, each):
        return count, [letter async for letter in each]


async def replay(
    app: App,
    contract: Contract[Any, Any],
    *,
    ids: Collection[str] | None = None,
    selection: Selection | None = None,
) -> int:
    """Move dead letters back to the work queue (all, those whose message id is in `ids`, or
    the copies `selection` names).

    Each is published to the work queue, persistent, and confirmed before its dead letter is
    acked. Returns how many were replayed. Raises `PublishError` if a publish is refused; what was
    replayed until then stays replayed, the rest stays dead-lettered.
    """
    replayed = 0
    connection = await open_connection(app.urls, name="amqtask-dlq", timeout=app.connect_timeout)
    async with connection:
        getter = await connection.channel()
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await _dead_letter_queue(getter, contract)
        count = queue.declaration_result.message_count or 0
        for _ in range(count):
            message = await queue.get(fail=False)
            if message is None:
                break
            if ids is not None and message.message_id not in ids:
                continue  # left unacked: back in the queue when the channel closes
            if selection is not None and not selection.take(message):
                continue
            headers = {
                key: _codec.sendable_header(value)
                for key, value in (message.headers or {}).items()
                if key not in _FAILURE_HEADERS and not key.startswith(_BROKER_DEATH_HEADERS)
            }
            try:
                # Straight to the work queue through the default exchange: not to other queues
                # that may be bound to the task's routing key.
                await publisher.default_exchange.publish(
                    aio_pika.Message(
                        message.body,
                        headers=headers,
                        content_type=message.content_type,
                        content_encoding=message.content_encoding,
                        type=message.type,
                        message_id=message.message_id,
                        correlation_id=message.correlation_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=contract.queue,
                    mandatory=True,
                )
            except aio_pika.exceptions.DeliveryError as exc:
                raise PublishError(
                    f"replay of {message.message_id} to queue {contract.queue!r} was refused "
                    f"({type(exc).__name__}); {replayed} replayed so far, the rest kept",
                    task=contract.name,
                    message_id=message.message_id or "",
                ) from None
            await message.ack()
            replayed += 1
            if selection is not None and selection.done:
                break
        await getter.close()
        await _returned(connection, queue.name, count - replayed)
    return replayed


class MoreThanSeen(Exception):
    """A purge of "all" was asked with the count seen, and the queue holds more now."""

    def __init__(self, count: int, seen: int) -> None:
        super().__init__(
            f"the dead-letter queue holds {count} letters now, not {seen} as seen: "
            "nothing purged; look again and confirm"
        )
        self.count = count
        self.seen = seen


async def purge(app: App, contract: Contract[Any, Any], *, seen: int | None = None) -> int:
    """Delete every message of the dead-letter queue; returns how many there were.

    With `seen` (the count the user saw when confirming), raises `MoreThanSeen` and deletes
    nothing if the queue holds more: "all" means what was seen, not what arrived since."""
    connection = await open_connection(app.urls, name="amqtask-dlq", timeout=app.connect_timeout)
    async with connection:
        channel = await connection.channel()
        queue = await _dead_letter_queue(channel, contract)
        count = queue.declaration_result.message_count or 0
        if seen is not None and count > seen:
            raise MoreThanSeen(count, seen)
        result = await queue.purge()
        return int(result.message_count or 0)


# --- paging, one letter in full, deleting some (the dashboard) --------------------------------

DETAIL_PREVIEW_BYTES = 64 * 1024  # how much of one letter's body its detail view shows
WINDOW = 1000  # letters a scan lets the broker send ahead of its reading, at most
_MAX_WINDOWS = 1000  # channels a scan opens at most (one per window): deeper, windows grow
_QUIET = 1.0  # seconds without a delivery after which a scan ends (the queue shrank meanwhile)
_RETURN_WAIT = 2.0  # seconds a scan waits for the queue to take its unacked messages back


@dataclass(frozen=True, slots=True)
class DeadLetterDetail:
    """One dead letter in full: every header as clipped text, the traceback, the body's first
    `DETAIL_PREVIEW_BYTES`."""

    letter: DeadLetter
    headers: dict[str, str]
    traceback: str | None
    error_type: str | None
    content_type: str | None
    content_encoding: str | None

    @classmethod
    def of(cls, message: _codec.Delivery, *, preview: int = DETAIL_PREVIEW_BYTES) -> Self:
        raw = message.headers
        headers: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        return cls(
            letter=DeadLetter.of(message, preview=preview),
            headers={
                str(name)[:_MAX_NAME]: _clip(_codec.header_text(value), _MAX_TEXT) or ""
                for name, value in headers.items()
            },
            traceback=_clip(_codec.header_text(headers.get(_codec.TRACEBACK)), _MAX_TEXT * 4),
            error_type=_clip(_codec.header_text(headers.get(_codec.ERROR_TYPE)), _MAX_NAME),
            content_type=_clip(message.content_type, _MAX_NAME),
            content_encoding=_clip(message.content_encoding, _MAX_NAME),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.letter.to_dict(),
            "headers": self.headers,
            "traceback": self.traceback,
            "error_type": self.error_type,
            "content_type": self.content_type,
            "content_encoding": self.content_encoding,
        }


class _Letter:
    """A delivery as aiormq hands it over, read as a `_codec.Delivery`: aio-pika's message
    wrapper would double the cost of skipping thousands of letters to reach a page."""

    __slots__ = ("_message", "acked")

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._message = message
        self.acked = False

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def headers(self) -> Mapping[str, Any]:
        return self._message.header.properties.headers or {}

    @property
    def message_id(self) -> str | None:
        return self._message.header.properties.message_id

    @property
    def content_type(self) -> str | None:
        return self._message.header.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self._message.header.properties.content_encoding

    @property
    def correlation_id(self) -> str | None:
        return self._message.header.properties.correlation_id

    @property
    def reply_to(self) -> str | None:
        return self._message.header.properties.reply_to

    @property
    def redelivered(self) -> bool | None:
        return self._message.redelivered

    async def ack(self) -> None:
        tag = self._message.delivery_tag
        assert tag is not None  # consumed with manual acks
        await self._message.channel.basic_ack(tag)
        self.acked = True


async def _scan(
    app: App,
    contract: Contract[Any, Any],
    visit: Callable[[int, _Letter], Awaitable[bool]],
    *,
    first: int | None = None,
) -> int:
    """Deliver the dead-letter queue's messages in order to `visit(index, message)` until it
    returns True, `first` messages were seen, or the queue ran out; returns the queue's count.

    A consumer without acks, its prefetch the number of messages wanted up to `WINDOW`: the
    broker sends no more than those, and each is dropped once visited (a visit keeps what it
    needs, not the body), so memory stays bounded by the window, not by the queue. Nothing
    being acked, a full window never slides: once it is read, the consumer is cancelled (its
    messages stay unacked on its channel) and a consumer on a new channel takes the next
    window. What `visit` does not ack returns to the queue when the channels close, in order:
    they are closed first to last (a quorum queue, 3.10.8 here, took back the letters of one
    channel's many consumers in no set order past 32 of them, but each channel's in turn).
    """
    connection = await open_connection(app.urls, name="amqtask-dlq", timeout=app.connect_timeout)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        queue = await _dead_letter_queue(channel, contract)
        count = queue.declaration_result.message_count or 0
        wanted = count if first is None else min(first, count)
        if wanted == 0:
            await channel.close()
            return count
        window = min(wanted, max(WINDOW, -(-wanted // _MAX_WINDOWS)))
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seen = acked = visiting = 0
        progress = asyncio.Event()  # a delivery came, or the scan finished
        idle = asyncio.Event()  # no visit running
        idle.set()

        async def deliver(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal seen, acked, visiting
            if finished.done() or seen >= wanted:
                return
            index, seen = seen, seen + 1
            progress.set()
            visiting += 1
            idle.clear()
            letter = _Letter(message)
            try:
                stop = await visit(index, letter)
                acked += letter.acked
                if (stop or seen >= wanted) and not finished.done():
                    finished.set_result(None)
            except Exception as exc:
                if not finished.done():
                    finished.set_exception(exc)
            finally:
                visiting -= 1
                if visiting == 0:
                    idle.set()
                progress.set()

        await channel.close()
        channels = [await connection.channel(publisher_confirms=False)]
        quiet = False
        try:
            while not finished.done() and not quiet:
                raw = await channels[-1].get_underlay_channel()
                await raw.basic_qos(prefetch_count=min(window, wanted - seen))
                start = seen
                consumer = await raw.basic_consume(queue.name, deliver, no_ack=False)
                while not finished.done() and seen - start < window:
                    progress.clear()
                    try:
                        await asyncio.wait_for(progress.wait(), _QUIET)
                    except TimeoutError:
                        quiet = True  # fewer messages than counted: others took some meanwhile
                        break
                # Cancelled before its channel closes, as every other: a quorum queue (3.10.8
                # here) took back a live consumer's letters after the cancelled ones'.
                assert consumer.consumer_tag is not None
                await raw.basic_cancel(consumer.consumer_tag)
                if finished.done() or quiet:
                    break
                # The window is full and stays so (nothing is acked): once its letters are
                # visited, a consumer on the next channel gets the next window.
                await idle.wait()
                channels.append(await connection.channel(publisher_confirms=False))
        finally:
            for each in channels:  # in order: the queue takes the letters back in order
                with suppress(Exception):
                    await each.close()
        await _returned(connection, queue.name, count - acked)
        if finished.done():
            finished.result()  # a visit's error
        return count


async def _returned(connection: AbstractConnection, queue: str, expected: int) -> None:
    """Wait (up to `_RETURN_WAIT` seconds) until `queue` counts `expected` ready messages again.

    A quorum queue takes back the messages of a closed channel after the close completed: a
    listing right after a scan would miss them for a moment, and a page would come up short.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _RETURN_WAIT
    while True:
        async with connection.channel(publisher_confirms=False) as channel:
            declared = await channel.declare_queue(queue, passive=True)
        if (declared.declaration_result.message_count or 0) >= expected or loop.time() > deadline:
            return
        await asyncio.sleep(0.01)


async def page_dead_letters(
    app: App,
    contract: Contract[Any, Any],
    *,
    offset: int = 0,
    limit: int = 50,
    preview: int = PREVIEW_BYTES,
) -> tuple[int, list[DeadLetter]]:
    """The dead-letter queue's message count and its messages `offset` to `offset + limit`,
    each with a `preview` of its body. Removes nothing; keeps only the page in memory."""
    page: list[DeadLetter] = []

    async def visit(index: int, message: _Letter) -> bool:
        if index >= offset:
            page.append(DeadLetter.of(message, preview=preview))
        return False

    count = await _scan(app, contract, visit, first=offset + limit)
    return count, page


async def find_dead_letter(
    app: App, contract: Contract[Any, Any], message_id: str, *, preview: int = DETAIL_PREVIEW_BYTES
) -> DeadLetterDetail | None:
    """The first dead letter whose message id is `message_id`, in full (headers clipped, a
    `preview` of the body); None if there is none. Removes nothing."""
    found: list[DeadLetterDetail] = []

    async def visit(_index: int, message: _Letter) -> bool:
        if message.message_id == message_id:
            found.append(DeadLetterDetail.of(message, preview=preview))
            return True
        return False

    await _scan(app, contract, visit)
    return found[0] if found else None


async def delete_dead_letters(
    app: App,
    contract: Contract[Any, Any],
    ids: Collection[str] = (),
    *,
    selection: Selection | None = None,
) -> int:
    """Delete the dead letters whose message id is in `ids`, or the copies `selection` names
    (acks only those); returns how many were deleted. The others stay, in order."""
    wanted = set(ids)
    deleted = 0

    async def visit(_index: int, message: _Letter) -> bool:
        nonlocal deleted
        if message.message_id in wanted or (selection is not None and selection.take(message)):
            await message.ack()
            deleted += 1
        return selection is not None and selection.done and not wanted

    if wanted or (selection is not None and not selection.done):
        await _scan(app, contract, visit)
    return deleted
